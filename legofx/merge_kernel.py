"""The fused Lego merge as a PyTorch operator: ``torch.ops.legofx.lego_merge``.

``lego_merge(maps, index, coef, bias, relu, grouped)`` computes what the gather lowering's merge
does, ``out[:, j] = sum_i coef[j, i] * maps[:, index[j*o + i]] + bias[j]`` (then ``relu`` when
asked), reading the Lego conv's output directly, in one pass over memory: ``maps`` is
``(N*o, m, H, W)`` (fragments folded into the batch) or, with ``grouped``, ``(N, o*m, H, W)``
(a conv with ``groups=o``), in the layout it comes in (channels-last, as torch.compile's
convolutions give it, or contiguous); the output has the same layout.

On CPU for float32 / float64 it runs a C kernel (``lego_merge.c``), compiled on first use with
the machine's C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``, the compiler torch.compile's
CPU backend needs as well; OpenMP, ``-march=native``) and cached in ``$LEGOFX_CACHE_DIR`` or
``~/.cache/legofx``. Elsewhere (GPU tensors, other dtypes) it computes the same function with
PyTorch ops. Under ``torch.compile`` it is one opaque call between inductor's kernels, which may
hand it either layout (``flexible_layout``); ``torch.export`` keeps it as a custom op, which
ONNX and TensorRT do not know: the ``"fused"`` lowering is for eager PyTorch and torch.compile.
Gradients flow through it (recomputed with PyTorch ops), so a fused model can be fine-tuned.
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
from torch import Tensor

SOURCE = Path(__file__).with_name("lego_merge.c")
FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"),
             ("-O3", "-fopenmp", "-shared", "-fPIC"))  # the second where -march=native fails
KERNEL_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


class KernelUnavailable(RuntimeError):
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
        for layout in ("rows", "planes"):
            for suffix in KERNEL_DTYPES.values():
                function = getattr(lib, f"lego_merge_{layout}_{suffix}")
                sizes = 5 if layout == "planes" else 7  # rows: fragment and pixel strides too
                function.argtypes = [pointer] * 5 + [size] * sizes + [flag, flag]
                function.restype = None
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


def reference_merge(maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                    relu: bool, grouped: bool = False) -> Tensor:
    """The same function in PyTorch ops (for devices and dtypes the kernel does not take)."""
    n, o = coef.shape
    if not grouped:
        maps = maps.unflatten(0, (-1, o)).flatten(1, 2)
    out = maps.index_select(1, index.long())
    out = (out.unflatten(1, (n, o)) * coef.reshape(n, o, 1, 1)).sum(2)
    if bias is not None:
        out = out + bias.reshape(n, 1, 1)
    return out.relu() if relu else out


def _rows(maps: Tensor) -> bool:
    """Whether ``maps`` is channels-last (and not also contiguous, as size-1 dims allow)."""
    return maps.is_contiguous(memory_format=torch.channels_last) and not maps.is_contiguous()


def _output(maps: Tensor, n: int, o: int, grouped: bool) -> Tensor:
    fmt = torch.channels_last if _rows(maps) else torch.contiguous_format
    images = maps.shape[0] if grouped else maps.shape[0] // o
    return torch.empty((images, n, *maps.shape[2:]), dtype=maps.dtype, device=maps.device,
                       memory_format=fmt)


@torch.library.custom_op("legofx::lego_merge", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def lego_merge(maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None, relu: bool,
               grouped: bool) -> Tensor:
    n, o = coef.shape
    if maps.device.type != "cpu" or maps.dtype not in KERNEL_DTYPES or coef.dtype != maps.dtype:
        return reference_merge(maps, index, coef, bias, relu, grouped)
    if not _rows(maps):
        maps = maps.contiguous()
    out = _output(maps, n, o, grouped)
    images, _, height, width = out.shape
    m = maps.shape[1] // o if grouped else maps.shape[1]
    index, coef = index.to(torch.int64).contiguous(), coef.contiguous()
    if index.numel() != n * o or not 0 <= int(index.min()) <= int(index.max()) < o * m:
        raise IndexError(f"lego_merge: index must hold {n * o} entries in [0, {o * m}), "
                         f"got {index.numel()} in [{int(index.min())}, {int(index.max())}]")
    bias = None if bias is None else bias.to(maps.dtype).contiguous()
    pointers = (maps.data_ptr(), index.data_ptr(), coef.data_ptr(),
                None if bias is None else bias.data_ptr(), out.data_ptr())
    sizes = (images, height * width, n, o, m)
    if _rows(maps):  # and the strides of a fragment and of a pixel, in elements
        layout, sizes = "rows", sizes + ((m, o * m) if grouped else (height * width * m, m))
    else:
        layout = "planes"
    kernel = getattr(library(), f"lego_merge_{layout}_{KERNEL_DTYPES[maps.dtype]}")
    kernel(*pointers, *sizes, int(relu), torch.get_num_threads())
    return out


@lego_merge.register_fake
def _lego_merge_fake(maps, index, coef, bias, relu, grouped):
    return _output(maps, *coef.shape, grouped)


def _save(ctx, inputs, output) -> None:
    maps, index, coef, bias, relu, grouped = inputs
    ctx.save_for_backward(maps, index, coef, bias)
    ctx.relu, ctx.grouped = relu, grouped


def _backward(ctx, grad: Tensor):
    maps, index, coef, bias = ctx.saved_tensors
    wanted = (maps, coef, bias)
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in wanted]
        out = reference_merge(leaves[0], index, leaves[1], leaves[2], ctx.relu, ctx.grouped)
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, used, grad))
    g_maps, g_coef, g_bias = (None if t is None else next(grads) for t in leaves)
    return g_maps, None, g_coef, g_bias, None, None


lego_merge.register_autograd(_backward, setup_context=_save)
