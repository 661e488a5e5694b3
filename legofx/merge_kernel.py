"""The fused Lego layer as a PyTorch operator: ``torch.ops.legofx.lego_conv_merge``.

``lego_conv_merge(x, lego, index, coef, bias, stride, padding, dilation, relu)`` computes what the
gather lowering does, Lego conv then merge: ``maps = conv(fragment i of x, lego)`` and
``out[:, j] = sum_i coef[j, i] * maps[i, k(j, i)] + bias[j]`` (then ``relu`` when asked), with
``index[j*o + i] = i*m + k(j, i)``. It works channels-last, the layout oneDNN's CPU convolutions
and torch.compile's layout optimization prefer: the Lego conv is PyTorch's, one conv with
``groups=o`` and the Lego filters repeated ``o`` times (the repeat is kept between calls while
the filters do not change), and the merge a C kernel (``lego_merge.c``) that reads each pixel's
``o*m`` maps and writes its ``n`` channels in one pass, over the conv's output when the sizes
allow (``o*m == n``, e.g. o=2, m=0.5): the layer allocates one tensor, as the conv it replaced
did. The output is channels-last; a contiguous input is converted first.

On CPU for float32 / float64 the kernel is compiled on first use with the machine's C compiler
(``$CC``, ``cc``, ``gcc`` or ``clang``, the compiler torch.compile's CPU backend needs as well;
OpenMP, ``-march=native``) and cached in ``$LEGOFX_CACHE_DIR`` or ``~/.cache/legofx``. Elsewhere
(GPU tensors, other dtypes) the op computes the same function with PyTorch ops. Under
``torch.compile`` it is one opaque call between inductor's kernels, as inductor's own CPU
convolutions are; ``torch.export`` keeps it as a custom op, which ONNX and TensorRT do not know:
the ``"fused"`` lowering is for eager PyTorch and torch.compile. Gradients flow through it
(recomputed with PyTorch ops), so a fused model can be fine-tuned.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
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


def reference_merge(maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                    relu: bool) -> Tensor:
    """The merge in PyTorch ops, from the maps of a conv with ``groups=o``, ``(N, o*m, H, W)``."""
    n, o = coef.shape
    out = maps.index_select(1, index.long())
    out = (out.unflatten(1, (n, o)) * coef.reshape(n, o, 1, 1)).sum(2)
    if bias is not None:
        out = out + bias.reshape(n, 1, 1)
    return out.relu() if relu else out


def reference_conv_merge(x: Tensor, lego: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                         stride, padding, dilation, relu: bool) -> Tensor:
    """What ``lego_conv_merge`` computes, in PyTorch ops (for devices and dtypes the kernel does
    not take, and for gradients)."""
    o = coef.shape[1]
    maps = F.conv2d(x, lego.repeat(o, 1, 1, 1), None, stride, padding, dilation, o)
    return reference_merge(maps, index, coef, bias, relu)


_grouped_weights: dict[int, tuple] = {}  # id(lego) -> (weak reference, key, repeated filters)


def grouped_weight(lego: Tensor, o: int) -> Tensor:
    """The Lego filters repeated ``o`` times (channels-last, as oneDNN takes them), for one conv
    with ``groups=o``. Made once and kept while ``lego`` lives and is unchanged: same storage and
    same version counter, which every in-place change bumps (optimizer steps, ``load_state_dict``,
    ``copy_``); ``.to()`` makes new storage. Writes through ``lego.data`` bypass the counter:
    call :func:`forget_grouped_weights` after them. Making the copy on every call would cost
    ~3-11 ms per ResNet-18 forward on a 2-core CPU (repeat + layout change), 3-10 % of it."""
    try:
        key = (lego.data_ptr(), lego._version, o)
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return lego.repeat(o, 1, 1, 1)
    kept = _grouped_weights.get(id(lego))
    alive = kept is not None and kept[0]() is lego  # not a dead tensor's reused id
    if not alive:
        weakref.finalize(lego, _grouped_weights.pop, id(lego), None)
    if not alive or kept[1] != key:
        repeated = lego.detach().repeat(o, 1, 1, 1).contiguous(memory_format=torch.channels_last)
        kept = _grouped_weights[id(lego)] = (weakref.ref(lego), key, repeated)
    return kept[2]


def forget_grouped_weights() -> None:
    """Drop every kept repeated copy of Lego filters (they are made again on the next call)."""
    _grouped_weights.clear()


def _out_shape(x: Tensor, lego: Tensor, n: int, stride, padding, dilation) -> list[int]:
    size = [(x.shape[d] + 2 * padding[d - 2] - dilation[d - 2] * (lego.shape[d] - 1) - 1)
            // stride[d - 2] + 1 for d in (2, 3)]
    return [x.shape[0], n, *size]


def _empty(x: Tensor, shape: list[int], device=None) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=device or x.device,
                       memory_format=torch.channels_last)


def _pixel_strides(t: Tensor) -> tuple[int, int] | None:
    """The (image, pixel) strides of a 4-D tensor whose channels are contiguous and whose
    ``H x W`` pixels lie at one stride, else ``None`` (size-1 dims are never stepped)."""
    (channels, height, width), s = t.shape[1:], t.stride()
    if channels > 1 and s[1] != 1 or height > 1 and width > 1 and s[2] != width * s[3]:
        return None
    return s[0], s[3] if width > 1 else s[2] if height > 1 else channels


def _merge_into(out: Tensor, maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                relu: bool) -> None:
    """Run the C kernel from the Lego conv's ``(N, o*m, H, W)`` maps into ``out`` (channels-last,
    maybe ``maps`` itself)."""
    n, o = coef.shape
    m, pixels = maps.shape[1] // o, maps.shape[2] * maps.shape[3]
    if _pixel_strides(maps) is None:
        maps = maps.contiguous(memory_format=torch.channels_last)
    (image, pixel), (out_image, out_pixel) = _pixel_strides(maps), _pixel_strides(out)
    bias = None if bias is None else bias.to(maps.dtype).contiguous()
    index, coef = index.to(torch.int64).contiguous(), coef.to(maps.dtype).contiguous()
    pointers = (maps.data_ptr(), index.data_ptr(), coef.data_ptr(),
                None if bias is None else bias.data_ptr(), out.data_ptr())
    kernel = getattr(library(), f"lego_merge_{KERNEL_DTYPES[maps.dtype]}")
    if kernel(*pointers, maps.shape[0], pixels, n, o, m, image, m, pixel, out_image, out_pixel,
              int(relu), torch.get_num_threads()):
        offsets = torch.arange(o) * m
        raise IndexError(f"lego_conv_merge: index[j*o + i] must pick one of fragment i's {m} maps, "
                         f"i.e. lie in [i*m, (i+1)*m) (m={m}, o={o}), got "
                         f"{index.view(n, o).sub(offsets).tolist()} after subtracting i*m")


@torch.library.custom_op("legofx::lego_conv_merge", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def lego_conv_merge(x: Tensor, lego: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                    stride: list[int], padding: list[int], dilation: list[int], relu: bool) -> Tensor:
    n, o = coef.shape
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or lego.dtype != x.dtype:
        out = reference_conv_merge(x, lego, index, coef, bias, stride, padding, dilation, relu)
        return out.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    maps = F.conv2d(x, grouped_weight(lego, o), None, stride, padding, dilation, o)
    shape = _out_shape(x, lego, n, stride, padding, dilation)
    if list(maps.shape) == shape and maps.stride() == _empty(x, shape, "meta").stride():
        out = maps  # the merge writes over the maps: one allocation, as the conv replaced made
    else:
        out = _empty(x, shape)
    _merge_into(out, maps, index, coef, bias, relu)
    return out


@lego_conv_merge.register_fake
def _lego_conv_merge_fake(x, lego, index, coef, bias, stride, padding, dilation, relu):
    return _empty(x, _out_shape(x, lego, coef.shape[0], stride, padding, dilation))


def _save(ctx, inputs, output) -> None:
    x, lego, index, coef, bias, *ctx.settings = inputs
    ctx.save_for_backward(x, lego, index, coef, bias)


def _backward(ctx, grad: Tensor):
    x, lego, index, coef, bias = ctx.saved_tensors
    wanted = (x, lego, coef, bias)
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in wanted]
        out = reference_conv_merge(leaves[0], leaves[1], index, leaves[2], leaves[3], *ctx.settings)
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, used, grad))
    g_x, g_lego, g_coef, g_bias = (None if t is None else next(grads) for t in leaves)
    return g_x, g_lego, None, g_coef, g_bias, None, None, None, None


lego_conv_merge.register_autograd(_backward, setup_context=_save)
