"""Writing files so that a failed write leaves no partial file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path | str, data: bytes | str, mode: int | None = None) -> Path:
    """Write ``data`` to a new temporary file beside ``path``, then rename it over ``path``
    (atomic on POSIX): readers see the old file or the whole new one, never a part. The
    temporary file is created private (0600); ``mode`` sets its permissions before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
