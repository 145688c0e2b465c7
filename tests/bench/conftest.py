"""Memory an exporter leaves behind, for the peak-RSS tests."""
import ctypes
import platform
import sys

import pytest


@pytest.fixture
def heap_leftovers():
    """``make(mib)`` leaves what an exporter does: ``mib`` MiB malloc'ed in 64 KiB blocks (below glibc's mmap
    threshold, so on its heap), touched, and freed but for every 64th block, which pins the freed space between them
    below the heap's top, so glibc keeps it resident. (A freed bytearray this big is mmap'ed and handed straight back
    to the OS: it leaves nothing.) The pinned blocks are freed after the test."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's heap: Linux with glibc only")
    libc = ctypes.CDLL("libc.so.6")
    malloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t)(("malloc", libc))
    free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(("free", libc))
    pinned = []

    def make(mib: int) -> None:
        blocks = [malloc(64 * 1024) for _ in range(mib * 16)]
        for b in blocks:
            ctypes.memset(b, 1, 64 * 1024)
        for i, b in enumerate(blocks):
            if i % 64:
                free(b)
        pinned.extend(blocks[::64])

    yield make
    for b in pinned:
        free(b)
