"""Build, cache and load the C merge kernel (``lego_merge.c``).

On CPU for float32 / float64 the kernel is compiled on first use with the machine's C compiler
(``$CC``, ``cc``, ``gcc`` or ``clang``; OpenMP, ``-march=native``) and cached in
``$LEGOFX_CACHE_DIR`` or ``~/.cache/legofx``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from legofx.lowering.registry import LoweringUnavailable

SOURCE = Path(__file__).with_name("lego_merge.c")
FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"),
             ("-O3", "-fopenmp", "-shared", "-fPIC"))  # the second where -march=native fails
KERNEL_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


class KernelUnavailable(LoweringUnavailable):
    """The C kernel cannot be built on this machine (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("LEGOFX_CACHE_DIR") or Path.home() / ".cache" / "legofx")


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine() -> bytes:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {platform.processor()} {flags}".encode()


def build(compiler: str | None = None) -> Path:
    """Compile ``lego_merge.c`` into a shared library (once per source, compiler and CPU)."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler found ($CC, cc, gcc or clang): the fused Lego merge "
                                "is compiled on first use; install one, or fold with another strategy")
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _machine()])).hexdigest()[:16]
        target = cache_dir() / f"lego_merge_{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            run = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                os.replace(built, target)  # atomic: concurrent builds leave one complete file
                return target
            errors.append(f"{compiler} {' '.join(flags)}: {run.stderr.strip()[-800:]}")
    raise KernelUnavailable("the fused Lego merge kernel did not compile:\n" + "\n".join(errors))


_library: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The compiled kernel, loaded once per process (raises :class:`KernelUnavailable`)."""
    global _library
    if _library is None:
        lib = ctypes.CDLL(str(build()))
        pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for suffix in KERNEL_DTYPES.values():
            function = getattr(lib, f"lego_merge_{suffix}")
            function.argtypes = [pointer] * 5 + [size] * 10 + [flag, flag]
            function.restype = ctypes.c_int
        lib.lego_merge_vectorized.restype = ctypes.c_int
        _library = lib
    return _library


def available() -> str | None:
    """``None`` when the kernel can be used here, else the reason it cannot."""
    try:
        library()
    except (KernelUnavailable, OSError) as error:
        return str(error)
    return None
