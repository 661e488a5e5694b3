"""``--out``: checked before any slow work, and nothing left behind when the command fails or is
interrupted (the folders it created are removed again)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

SUFFIXES = (".onnx", ".pt2")


def check_out(out: str) -> None:
    """Refuse an ``--out`` that cannot be written: a wrong suffix, a folder, a path under a file,
    or a folder this user cannot write to (the first one that exists on the way up)."""
    path = Path(out)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out must end in .pt2 (torch.export) or .onnx (ONNX), got {out!r}")
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a folder: give a file name ending in {path.suffix}")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out!r}: {_shown(folder, path)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):  # access() says yes to root on a read-only fs
            writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        raise ValueError(f"--out {out!r}: the folder {_shown(folder, path)!r} is not writable")


def _shown(folder: Path, path: Path) -> str:
    """``folder`` as the user wrote it (relative when ``--out`` was)."""
    return str(folder) if path.is_absolute() else os.path.relpath(folder)


class CreatedFolders:
    """The folders ``out`` needs that do not exist yet, created; :meth:`remove` removes them
    again (those still empty, deepest first)."""

    def __init__(self, out: str):
        self.folders = []
        folder = Path(out).absolute().parent
        while not folder.exists():
            self.folders.append(folder)
            folder = folder.parent
        for folder in reversed(self.folders):
            folder.mkdir()

    def remove(self) -> None:
        for folder in self.folders:
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def out_folders(out: str):
    """Create the folders ``out`` needs (a :class:`CreatedFolders`); they are removed if the
    block fails or is interrupted, or if it calls ``remove()``."""
    created = CreatedFolders(out)
    try:
        yield created
    except BaseException:
        created.remove()
        raise
