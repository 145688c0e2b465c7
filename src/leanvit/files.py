"""Whether a directory can be written to, asked before the work that writes there: a path that cannot hold the
results fails in a second with the reason, not with a traceback after minutes of measuring or exporting."""
from __future__ import annotations

import tempfile
from pathlib import Path


def write_problem(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` (created if missing), or None if one can.

    A temporary file is written, not just ``os.access`` asked: an existing read-only mount, or /proc, passes mkdir
    and the permission bits. Where a part of the path is a file, it is named (mkdir's own "File exists" hides which).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        in_a_file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        return f"{in_a_file} is a file" if in_a_file is not None else (e.strerror or str(e))
    return None
