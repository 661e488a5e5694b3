"""Build, cache and load the C merge kernel (``lego_merge.c``).

On CPU for float32 / float64 the kernel is compiled on first use with the machine's C compiler
(``$CC``, ``cc``, ``gcc`` or ``clang``; OpenMP) and cached in ``$LEGOFX_CACHE_DIR`` or
``~/.cache/legofx``. ``$LEGOFX_KERNEL`` picks the code path: ``native`` (default,
``-march=native``), ``avx512``, ``avx2`` or ``portable`` (plain C, no vector extensions).

A cached library is code this process will run, so (docs/security.md):

- the cache directory is used only when it is owned by this user and writable by nobody else
  (it is created 0700 whatever the umask); otherwise the kernel is built in a private
  temporary directory, with one warning;
- every library is written 0700 through a private scratch directory and an atomic rename, with
  its sha256 next to it; a library is loaded only when it is a regular file owned by this user,
  writable by nobody else, whose content has that sha256, else it is rebuilt (a truncated,
  replaced or empty file is never loaded);
- a lock file serialises builds: N processes starting together compile once.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from legofx.core.files import write_atomically
from legofx.lowering.registry import LoweringUnavailable

SOURCE = Path(__file__).with_name("lego_merge.c")
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
PATHS = {  # LEGOFX_KERNEL -> (CPU flags it needs, compiler flag sets tried in order)
    "native": ((), (("-march=native",), ())),  # the second where -march=native fails
    "avx512": (("avx512f", "avx2", "fma"), (("-mavx512f", "-mavx2", "-mfma"),)),
    "avx2": (("avx2", "fma"), (("-mavx2", "-mfma", "-mno-avx512f"),)),
    "portable": ((), (("-mno-avx2", "-mno-avx512f", "-mno-fma"),) if platform.machine() in (
        "x86_64", "AMD64", "i686") else ((),)),
}
KERNEL_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
SYMBOLS = (*(f"lego_merge_{suffix}" for suffix in KERNEL_DTYPES.values()), "lego_merge_vectorized")


class KernelUnavailable(LoweringUnavailable):
    """The C kernel cannot be built or loaded on this machine (the message says why)."""


def kernel_path() -> str:
    """The code path ``$LEGOFX_KERNEL`` asks for (``native`` when unset)."""
    path = os.environ.get("LEGOFX_KERNEL") or "native"
    if path not in PATHS:
        raise KernelUnavailable(f"LEGOFX_KERNEL must be one of {', '.join(PATHS)}, "
                                f"got LEGOFX_KERNEL={path!r}")
    return path


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    line = next((line for line in cpuinfo.read_text().splitlines()
                 if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def supported_paths() -> list[str]:
    """The values of ``$LEGOFX_KERNEL`` this CPU can run."""
    flags = cpu_flags()
    return [path for path, (needs, _) in PATHS.items() if set(needs) <= flags]


def _configured_dir() -> Path:
    return Path(os.environ.get("LEGOFX_CACHE_DIR") or Path.home() / ".cache" / "legofx")


def untrusted_reason(directory: Path) -> str | None:
    """Why files in ``directory`` (which exists) may have been written by someone else, or
    ``None``: it must be a real directory owned by this user, writable by nobody else."""
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory (a symbolic link or a file)"
    if info.st_uid != os.getuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


_private: Path | None = None
_warned = False


def _private_dir(why: str) -> Path:
    """A fresh directory only this process knows (0700), made once and removed when the
    process exits; warns once."""
    global _private, _warned
    if _private is None:
        _private = Path(tempfile.mkdtemp(prefix="legofx-kernel-"))
        atexit.register(shutil.rmtree, _private, ignore_errors=True)  # unlinking a loaded library is safe
    if not _warned:
        _warned = True
        warnings.warn(f"legofx: not using the kernel cache {_configured_dir()}: {why}; building "
                      f"the merge kernel in the private directory {_private} instead (rebuilt "
                      f"in every process, removed at exit)", RuntimeWarning, stacklevel=3)
    return _private


def cache_dir() -> Path:
    """Where the kernel is cached: ``$LEGOFX_CACHE_DIR`` or ``~/.cache/legofx``, created 0700,
    when it is trusted (:func:`untrusted_reason`); else a private temporary directory."""
    directory = _configured_dir()
    try:
        if not directory.exists():
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
            if directory.lstat().st_uid == os.getuid():
                os.chmod(directory, 0o700)  # whatever the umask
        why = untrusted_reason(directory)
    except OSError as error:
        why = f"it cannot be created or read ({error})"
    return directory if why is None else _private_dir(why)


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine() -> bytes:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    return f"{platform.machine()} {platform.processor()} {sorted(cpu_flags())}".encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(target: Path) -> bool:
    """Whether ``target`` is this user's regular file, writable by nobody else, with the sha256
    recorded next to it when it was built."""
    record = target.with_suffix(".sha256")
    try:
        for path in (target, record):
            info = path.lstat()
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                    or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                return False
        return record.read_text().strip() == _digest(target.read_bytes())
    except OSError:
        return False


def build(compiler: str | None = None) -> Path:
    """Compile ``lego_merge.c`` for ``$LEGOFX_KERNEL``'s code path into a shared library (once
    per source, compiler, path and CPU); returns the verified library's path."""
    path = kernel_path()
    needs, flag_sets = PATHS[path]
    missing = set(needs) - cpu_flags()
    if missing:
        raise KernelUnavailable(f"LEGOFX_KERNEL={path}: this CPU lacks {', '.join(sorted(missing))}"
                                f" (it can run {', '.join(supported_paths())})")
    compiler = compiler or find_compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler found ($CC, cc, gcc or clang): the fused Lego merge "
                                "is compiled on first use; install one, or fold with another strategy")
    try:
        return _build(compiler, path, flag_sets)
    except OSError as error:
        raise KernelUnavailable(f"the fused Lego merge kernel could not be built: {error}") from error


def _build(compiler: str, path: str, flag_sets) -> Path:
    source = SOURCE.read_bytes()
    directory, errors = cache_dir(), []
    for extra in flag_sets:
        flags = (*COMMON_FLAGS, *extra)
        key = _digest(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                  path.encode(), _machine()]))[:16]
        target = directory / f"lego_merge_{key}.so"
        with open(directory / f"lego_merge_{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others then find it
            if _verified(target):
                return target
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                built = Path(scratch) / target.name
                run = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)],
                                     capture_output=True, text=True)
                if run.returncode == 0:
                    data = built.read_bytes()
                    write_atomically(target, data, mode=0o700)
                    write_atomically(target.with_suffix(".sha256"), _digest(data), mode=0o700)
                    if _verified(target):
                        return target
                    errors.append(f"{target} changed while it was written")
                else:
                    errors.append(f"{compiler} {' '.join(flags)}: {run.stderr.strip()[-800:]}")
    raise KernelUnavailable("the fused Lego merge kernel did not compile:\n" + "\n".join(errors))


_libraries: dict[str, ctypes.CDLL] = {}  # code path -> the loaded kernel


def library() -> ctypes.CDLL:
    """The compiled kernel of ``$LEGOFX_KERNEL``'s path, loaded once per process (raises
    :class:`KernelUnavailable`)."""
    path = kernel_path()
    if path not in _libraries:
        target = build()
        try:
            lib = ctypes.CDLL(str(target))
            functions = {name: getattr(lib, name) for name in SYMBOLS}
        except (OSError, AttributeError) as error:
            raise KernelUnavailable(f"the merge kernel {target} cannot be used: {error}") from error
        pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for suffix in KERNEL_DTYPES.values():
            functions[f"lego_merge_{suffix}"].argtypes = [pointer] * 5 + [size] * 10 + [flag, flag]
            functions[f"lego_merge_{suffix}"].restype = ctypes.c_int
        functions["lego_merge_vectorized"].restype = ctypes.c_int
        _libraries[path] = lib
    return _libraries[path]


def available() -> str | None:
    """``None`` when the kernel can be used here, else the reason it cannot."""
    try:
        library()
    except KernelUnavailable as error:
        return str(error)
    return None
