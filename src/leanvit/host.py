"""Facts about the machine and the software a benchmark or training run ran on, for every report."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path

_FLAGS_OF_INTEREST = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_bf16", "amx_int8", "amx_tile",
)
_PACKAGES = ("leanvit", "torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "nncf", "numpy")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or ``taskset`` narrows), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: /proc/cpuinfo's keys that identify the CPU (x86, then Arm), as host_info's "cpu_id" names them
_CPU_ID_KEYS = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping",
                "microcode": "microcode", "CPU implementer": "implementer", "CPU variant": "variant",
                "CPU part": "part", "CPU revision": "revision"}


def _cpuinfo() -> tuple[str, list[str], dict]:
    """The CPU's model name, flags and identity (vendor, family, model, stepping, microcode where /proc/cpuinfo
    has them, of its first CPU): a name such as "AMD EPYC" covers generations that the identity tells apart."""
    model, flags, ident = platform.processor() or "unknown", [], {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model in ("unknown", "", "x86_64"):
                model = value
            elif key == "flags" and not flags:
                flags = value.split()
            elif key in _CPU_ID_KEYS and _CPU_ID_KEYS[key] not in ident:
                ident[_CPU_ID_KEYS[key]] = int(value) if value.isdigit() else value
    except OSError:
        pass
    return model, flags, ident


def _loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages: how busy the machine was around the measurement."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on Windows; OSError where the system cannot tell
        return None


def host_info() -> dict:
    """The host's facts; ``loadavg`` is the load when called (at the end of a run, it covers the run's last
    minutes), absent where the system has none."""
    model, flags, ident = _cpuinfo()
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    info = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": model,
        "cpu_flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
        "cpu_id": ident,  # (a key of its own: readers show "cpu" as the CPU's name)
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "versions": versions,
    }
    loadavg = _loadavg()
    if loadavg is not None:
        info["loadavg"] = loadavg
        info["loadavg_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")  # (before or after the run: the caller's choice)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info
