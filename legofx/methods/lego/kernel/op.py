"""The fused Lego layer as a PyTorch operator: ``torch.ops.legofx.lego_conv_merge``.

``lego_conv_merge(x, lego, index, coef, bias, stride, padding, dilation, relu)`` computes what the
gather lowering does, Lego conv then merge: ``maps = conv(fragment i of x, lego)`` and
``out[:, j] = sum_i coef[j, i] * maps[i, k(j, i)] + bias[j]`` (then ``relu`` when asked), with
``index[j*o + i] = i*m + k(j, i)``. It works channels-last, the layout oneDNN's CPU convolutions
and torch.compile's layout optimization prefer: the Lego conv is PyTorch's, one conv with
``groups=o`` and the Lego filters repeated ``o`` times (the repeat is kept between calls while
the filters do not change), and the merge a C kernel (``lego_merge.c``, built by :mod:`.loader`) that reads each pixel's
``o*m`` maps and writes its ``n`` channels in one pass, over the conv's output when the sizes
allow (``o*m == n``, e.g. o=2, m=0.5): the layer allocates one tensor, as the conv it replaced
did. The output is channels-last; a contiguous input is converted first.

On CPU for float32 / float64 the kernel runs; elsewhere (GPU tensors, other dtypes) the op computes the same function with PyTorch ops. Under
``torch.compile`` it is one opaque call between inductor's kernels, as inductor's own CPU
convolutions are; ``torch.export`` keeps it as a custom op, which ONNX and TensorRT do not know:
the ``"fused"`` lowering is for eager PyTorch and torch.compile. Gradients flow through it
(recomputed with PyTorch ops), so a fused model can be fine-tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from legofx.methods.lego.kernel.loader import KERNEL_DTYPES, library
from legofx.methods.lego.kernel.filters import grouped_weight
from legofx.methods.lego.layers import merge_gathered


def reference_merge(maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                    relu: bool) -> Tensor:
    """The merge in PyTorch ops (the gather lowering's), then the ReLU if asked."""
    n, o = coef.shape
    out = merge_gathered(maps, index.long(), coef, bias, n, o)
    return out.relu() if relu else out


def reference_conv_merge(x: Tensor, lego: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                         stride, padding, dilation, relu: bool) -> Tensor:
    """What ``lego_conv_merge`` computes, in PyTorch ops (for devices and dtypes the kernel does
    not take, and for gradients)."""
    o = coef.shape[1]
    maps = F.conv2d(x, lego.repeat(o, 1, 1, 1), None, stride, padding, dilation, o)
    return reference_merge(maps, index, coef, bias, relu)


def _check_arguments(x: Tensor, lego: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                     stride, padding, dilation) -> None:
    """Refuse arguments that disagree (shapes, dtypes, devices) before any of them reaches the C
    kernel, which would read out of bounds: one error naming the argument. Metadata only, no
    tensor ops: it runs on every call (the index range: :func:`_check_index_range`)."""
    def refuse(message: str):
        raise ValueError(f"lego_conv_merge: {message}")

    if x.dim() != 4 or lego.dim() != 4 or coef.dim() != 2:
        refuse(f"x and lego must be 4-D and coef 2-D (n, o), got x {tuple(x.shape)}, "
               f"lego {tuple(lego.shape)}, coef {tuple(coef.shape)}")
    n, o = coef.shape
    if x.shape[1] != o * lego.shape[1]:
        refuse(f"x has {x.shape[1]} channels, o * lego.shape[1] = {o} * {lego.shape[1]} expected")
    if index.dim() != 1 or index.numel() != n * o or index.is_floating_point() or index.is_complex():
        refuse(f"index must be 1-D integers with n*o = {n * o} entries, got {index.dtype} "
               f"{tuple(index.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        refuse(f"bias must have shape ({n},) (n = coef.shape[0]), got {tuple(bias.shape)}")
    floats = {"lego": lego, "coef": coef, **({} if bias is None else {"bias": bias})}
    for name, tensor in {"x": x, **floats}.items():
        if tensor.device != x.device:
            refuse(f"{name} is on {tensor.device}, x on {x.device}")
        if not tensor.is_floating_point():
            refuse(f"{name} must be floating point, got {tensor.dtype}")
    if index.device != x.device:
        refuse(f"index is on {index.device}, x on {x.device}")
    if lego.dtype != x.dtype:
        refuse(f"lego is {lego.dtype}, x is {x.dtype}: they must have one dtype")
    for name, values, least in (("stride", stride, 1), ("padding", padding, 0),
                                ("dilation", dilation, 1)):
        if len(values) != 2 or any(v < least for v in values):
            refuse(f"{name} must be 2 ints >= {least}, got {name}={list(values)}")


def _check_index_range(index: Tensor, n: int, o: int, m: int) -> None:
    """On the PyTorch path: each entry picks one of its fragment's maps (the C kernel checks this
    itself, in the loop that reads the index anyway, so its path pays no tensor ops for it)."""
    low = torch.arange(o, device=index.device).repeat(n) * m
    if n * o and bool(((index < low) | (index >= low + m)).any()):
        raise IndexError(f"lego_conv_merge: index[j*o + i] must pick one of fragment i's {m} "
                         f"maps, i.e. lie in [i*m, (i+1)*m) (m={m}, o={o}), got "
                         f"{(index.view(n, o) - low.view(n, o)).tolist()} after subtracting i*m")


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
    _check_arguments(x, lego, index, coef, bias, stride, padding, dilation)
    n, o = coef.shape
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        _check_index_range(index, n, o, lego.shape[0])
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
