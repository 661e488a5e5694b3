"""Structured Convolutions (Bhalgat et al., NeurIPS 2020): training and folded forms.

A ``(C, kh, kw)`` kernel is *structured* with underlying size ``(c, nh, nw)`` when it is a sum
of all-ones blocks of size ``(C-c+1, kh-nh+1, kw-nw+1)`` placed at the ``c*nh*nw`` offsets,
each scaled by one scalar: ``W = A @ alpha`` with ``A`` a fixed binary matrix
(:func:`structure_matrix`). ``A`` is the Kronecker product of three 1-D band matrices
(:func:`band`), so its pseudo-inverse and projection are cheap products of small ones.

Then ``conv(x, W) == conv(sum_pool(pad(x)), alpha)``: a stride-1 3-D sum-pooling over channels
and space with window ``(C-c+1, kh-nh+1, kw-nw+1)`` (spatially dilated like the conv) of the
padded input, then a conv with the small ``(c, nh, nw)`` kernels, the layer's stride and
dilation and no padding. ``nn.Linear`` is the 1-D case (:class:`StructuredLinear`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legofx.core.geometry import conv_geometry, padded
from legofx.core.layer import (ConvLayer, RewrittenLayer, assigned_weight, check_representable,
                               conv_extra_repr, parameter_copy)
from legofx.lowering.dense import dense_lowering
from legofx.lowering.registry import register_lowering


@lru_cache(maxsize=None)
def band(size: int, under: int) -> Tensor:
    """``(size, under)`` float64: column ``p`` has ones on rows ``p .. p + size - under``."""
    rows = torch.arange(size).unsqueeze(1) - torch.arange(under).unsqueeze(0)
    return ((rows >= 0) & (rows <= size - under)).double()


@lru_cache(maxsize=None)
def _pinv(size: int, under: int) -> Tensor:
    return torch.linalg.pinv(band(size, under))


def structure_matrix(C: int, kh: int, kw: int, c: int, nh: int, nw: int,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """The binary ``(C*kh*kw, c*nh*nw)`` matrix ``A`` whose columns are the flattened blocks."""
    return torch.kron(torch.kron(band(C, c), band(kh, nh)), band(kw, nw)).to(dtype)


def _along_axes(weight: Tensor, matrices: list[Tensor], shapes: list | None = None) -> Tensor:
    """Apply ``matrices[i]`` (``(new, old)``, or ``shapes[i]`` when given: the matrices may
    be graph values) along axis ``i + 1`` of ``weight``, the most shrinking first (the same
    result, fewer multiplications)."""
    shapes = shapes or [matrix.shape for matrix in matrices]
    order = sorted(enumerate(matrices, start=1),
                   key=lambda item: shapes[item[0] - 1][0] / shapes[item[0] - 1][1])
    for axis, matrix in order:
        weight = torch.tensordot(matrix.to(weight), weight.movedim(axis, 0), 1).movedim(0, axis)
    return weight


def pool_window(full: tuple[int, ...], under: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(size - small + 1 for size, small in zip(full, under))


def sliding_sum(x: Tensor, length: int, window: int, dim: int) -> Tensor:
    """The sums of ``window`` consecutive entries along ``dim`` (negative; ``length`` entries
    there, given so that a graph holds constants): ``length - window + 1`` of them, by a running
    sum (``cumsum``, then the difference of its values ``window`` apart), whatever the window.
    It rounds like a sum of ``length`` terms (relative ~1e-7 in float32)."""
    running = F.pad(x.cumsum(dim), (0, 0) * (-dim - 1) + (1, 0))
    count = length - window + 1
    return running.narrow(dim, window, count) - running.narrow(dim, 0, count)


def compose_weight(alpha: Tensor, window: tuple[int, ...], under: tuple[int, ...]) -> Tensor:
    """``W = A alpha``: ``alpha (out, c, nh, nw)`` -> ``(out, C, kh, kw)`` for the block
    ``window = (C-c+1, kh-nh+1, kw-nw+1)`` and ``under = (c, nh, nw)`` (or ``(out, f) ->
    (out, F)`` for ``(F-f+1,)`` and ``(f,)``).

    ``A`` is a Kronecker product of band matrices (:func:`band`, made here from ``ones`` with
    ``tril`` / ``triu`` so that a traced graph holds no constant tensor), so ``A alpha`` is one
    small matrix product per axis: differentiable, plain ops, on the fast matmul path. (A
    transposed 3-D conv with an all-ones kernel computes the same, but CPU PyTorch runs it off
    oneDNN: a ResNet-18 training step took 12x the dense one; running sums per axis took about
    twice the matrix products' time, being many passes over memory;
    ``benchmarks/structured_speed.py --train-step``.)"""
    shapes = [(small + size - 1, small) for small, size in zip(under, window)]
    bands = [alpha.new_ones(shape).tril().triu(shape[1] - shape[0]) for shape in shapes]
    return _along_axes(alpha, bands, shapes)


@torch.no_grad()
def project(weight: Tensor, under: tuple[int, ...]) -> tuple[Tensor, float]:
    """Least-squares ``alpha = A^+ W`` (float64) and the relative error ``||A alpha - W|| / ||W||``.

    ``weight`` is ``(out, C, kh, kw)`` with ``under = (c, nh, nw)``, or ``(out, F)`` with ``(f,)``.
    """
    w = weight.detach().double()
    pinvs = [_pinv(size, small) for size, small in zip(w.shape[1:], under)]
    alpha = _along_axes(w, pinvs)
    back = _along_axes(alpha, [band(size, small) for size, small in zip(w.shape[1:], under)])
    norm = w.norm().item()
    error = (back - w).norm().item() / norm if norm else 0.0
    return alpha.to(weight.dtype), error


@lru_cache(maxsize=None)
def projector(size: int, under: int) -> Tensor:
    """``A A^+`` of one axis (float64): the orthogonal projection onto structured vectors."""
    return band(size, under) @ _pinv(size, under)


def structural_residual(weight: Tensor, under: tuple[int, ...]) -> Tensor:
    """``||(I - A A^+) W|| / ||W||``, differentiable in ``weight`` (0 on structured weights)."""
    projectors = [projector(size, small) for size, small in zip(weight.shape[1:], under)]
    residual = weight - _along_axes(weight, projectors)
    return residual.norm() / weight.norm().clamp_min(torch.finfo(weight.dtype).tiny)


def sum_pool(x: Tensor, channels: int, window: tuple[int, int, int],
             dilation: tuple[int, int]) -> Tensor:
    """Stride-1 sum over ``window = (kc, wh, ww)`` of ``(N, C, H, W)`` -> ``(N, C-kc+1, H', W')``
    (``channels = C``, given so that the graph holds constants, not shape reads).

    Separable: over channels a running sum (``cumsum``, then the difference of its values
    ``kc`` apart: ``C + c`` additions per position, whatever ``kc``); over space a depthwise
    conv with an all-ones ``(wh, ww)`` kernel and the conv's dilation (``avg_pool`` has none).
    A conv3d with an all-ones ``(kc, wh, ww)`` kernel computes the same but is 10-100x slower
    on CPU. The running sum rounds like a sum of ``C`` terms (relative ~1e-7 in float32).
    """
    kc, wh, ww = window
    if kc > 1:  # dim -3: an unbatched (C, H, W) input too
        x = sliding_sum(x, channels, kc, -3)
    if wh * ww > 1:
        pooled = channels - kc + 1
        x = F.conv2d(x, x.new_ones((pooled, 1, wh, ww)), None, 1, 0, dilation, pooled)
    return x


def assign_structured(layer: RewrittenLayer, weight: Tensor, window: tuple[int, ...],
                      under: tuple[int, ...]) -> None:
    """Set ``layer.alpha`` to the least-squares ``A^+ weight``; a weight outside the structured
    subspace (more than rounding away) is refused. Conv+BatchNorm fusion scales each output
    filter, which stays in the subspace: exact."""
    alpha, _ = project(weight.double(), under)
    check_representable(layer, weight, compose_weight(alpha, window, under),
                        "projected onto its structured subspace")
    layer.alpha.copy_(alpha.to(layer.alpha.dtype))


class _StructuredConv(ConvLayer):
    """What both forms share: sizes, conv hyper-parameters, counts."""

    def __init__(self, geometry: dict, under: tuple[int, int, int]) -> None:
        super().__init__(geometry)
        self.c, self.nh, self.nw = under
        self.init_error: float | None = None

    @property
    def under(self) -> tuple[int, int, int]:
        return (self.c, self.nh, self.nw)

    @property
    def window(self) -> tuple[int, int, int]:
        """The sum-pooling window ``(C-c+1, kh-nh+1, kw-nw+1)``."""
        return pool_window((self.in_channels, *self.kernel_size), self.under)

    @property
    def params_after(self) -> int:
        return self.alpha.numel() + (0 if self.bias is None else self.bias.numel())

    def macs(self, output_shape: tuple[int, ...]) -> tuple[int, int]:
        """Dense conv vs small conv (``out*c*nh*nw`` per output pixel) + sum-pool.

        The sum-pool's additions count as MACs (see :func:`sum_pool`): ``C + c`` per position of
        the padded input for the channel running sum, ``wh*ww - 1`` per pooled value for the
        spatial sum. Positions are those the conv reads: ``H'' = (H_out-1)*stride +
        (nh-1)*dilation + 1`` pooled rows, ``H'' + (wh-1)*dilation`` padded ones (and columns).
        """
        batch, _, height, width = output_shape
        n, C, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        (sh, sw), (dh, dw), (kc, wh, ww) = self.stride, self.dilation, self.window
        pooled_h = (height - 1) * sh + (self.nh - 1) * dh + 1
        pooled_w = (width - 1) * sw + (self.nw - 1) * dw + 1
        padded_area = (pooled_h + (wh - 1) * dh) * (pooled_w + (ww - 1) * dw)
        channel_sum = (C + self.c) * padded_area if kc > 1 else 0
        pool = batch * (channel_sum + self.c * pooled_h * pooled_w * (wh * ww - 1))
        pixels = batch * height * width
        return pixels * n * C * kh * kw, pixels * n * self.c * self.nh * self.nw + pool

    @property
    def weight(self) -> Tensor:
        """The dense ``(out, C, kh, kw)`` weight ``A alpha``, differentiable."""
        return compose_weight(self.alpha, self.window, self.under)

    def assign_weight(self, value: Tensor) -> None:
        """``layer.weight = w``: ``alpha`` projected from ``w``; see :func:`assign_structured`."""
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        assign_structured(self, assigned_weight(self, value, shape), self.window, self.under)

    def extra_repr(self) -> str:
        return conv_extra_repr(self, f"under=({self.c}, {self.nh}, {self.nw})")


class StructuredConv2d(_StructuredConv):
    """Training form: ``alpha (out, c, nh, nw)`` and ``bias``; runs the composed dense conv."""

    form = "training"
    lowering = "compose (transposed conv3d of alpha) + conv"

    def __init__(self, conv: nn.Conv2d, c: int, nh: int, nw: int) -> None:
        super().__init__(conv_geometry(conv), (c, nh, nw))
        like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.alpha = nn.Parameter(torch.empty(conv.out_channels, c, nh, nw, **like))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random start with the scale of a fresh ``nn.Conv2d``.

        Each composite weight entry sums ``alpha`` over ``b`` offsets (``b`` between 1 and
        ``c*nh*nw``); with independent ``alpha ~ U(-s, s)`` its variance is ``b s^2 / 3``. We
        choose ``s`` so that the *mean* variance over the kernel equals the one of
        ``nn.Conv2d``'s Kaiming-uniform (``a=sqrt(5)``) start, ``1 / (3 C kh kw)``:
        ``s = 1 / sqrt(C kh kw * mean(b))`` with ``mean(b) = prod(window) * c nh nw / (C kh kw)``.
        """
        window = math.prod(self.window)
        self.alpha.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(window * self.c * self.nh * self.nw))

    def compute(self, x, attr, stage):
        with stage("compose"):
            weight = compose_weight(attr("alpha"), self.window, self.under)
        with stage("conv"):
            x, padding = padded(x, self.geometry)
            return F.conv2d(x, weight, attr("bias"), self.stride, padding, self.dilation)

    def folded(self) -> FoldedStructuredConv2d:
        return FoldedStructuredConv2d(self)


class FoldedStructuredConv2d(_StructuredConv):
    """Inference form: pad, 3-D sum-pool (:func:`sum_pool`), conv with ``alpha``, no padding."""

    form = "folded"
    lowering = "pad + sum-pool (channel cumsum, depthwise ones) + small conv"
    per_output = "alpha"

    def __init__(self, trained: StructuredConv2d) -> None:
        super().__init__(trained.geometry, trained.under)
        self.train(trained.training)
        self.init_error = trained.init_error
        self.alpha = parameter_copy(trained.alpha)
        self.bias = parameter_copy(trained.bias)

    def compute(self, x, attr, stage):
        with stage("pad"):
            x, _ = padded(x, self.geometry, conv_pads="none")
        with stage("sum_pool"):
            pooled = sum_pool(x, self.in_channels, self.window, self.dilation)
        with stage("conv"):
            return F.conv2d(pooled, attr("alpha"), attr("bias"), self.stride, 0, self.dilation)

    def folded(self) -> FoldedStructuredConv2d:
        return self


class _StructuredLinear(RewrittenLayer):
    """``nn.Linear(F, out)`` with weight ``A alpha``, ``alpha (out, f)``: 1-D sum-pool of window
    ``F-f+1`` over the features, then ``Linear(f, out)``."""

    def __init__(self, in_features: int, out_features: int, f: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.f = in_features, out_features, f
        self.init_error: float | None = None

    @property
    def params_before(self) -> int:
        bias = 0 if self.bias is None else self.out_features
        return self.out_features * self.in_features + bias

    @property
    def params_after(self) -> int:
        return self.alpha.numel() + (0 if self.bias is None else self.bias.numel())

    def macs(self, output_shape) -> tuple[int, int]:
        """Dense vs ``out*f`` per row + the running sum's ``F + f`` additions."""
        rows = math.prod(output_shape[:-1])
        pool = self.in_features + self.f
        return (rows * self.out_features * self.in_features,
                rows * (self.out_features * self.f + pool))

    @property
    def weight(self) -> Tensor:
        return compose_weight(self.alpha, (self.in_features - self.f + 1,), (self.f,))

    def assign_weight(self, value: Tensor) -> None:
        """``layer.weight = w``: ``alpha`` projected from ``w``; see :func:`assign_structured`."""
        weight = assigned_weight(self, value, (self.out_features, self.in_features))
        assign_structured(self, weight, (self.in_features - self.f + 1,), (self.f,))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"f={self.f}, bias={self.bias is not None}")


class StructuredLinear(_StructuredLinear):
    form = "training"
    lowering = "compose (transposed conv1d of alpha) + linear"

    def __init__(self, linear: nn.Linear, f: int) -> None:
        super().__init__(linear.in_features, linear.out_features, f)
        like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.alpha = nn.Parameter(torch.empty(linear.out_features, f, **like))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        with torch.no_grad():  # the scale of nn.Linear's start, as StructuredConv2d's
            window = self.in_features - f + 1
            self.alpha.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(window * f))

    def compute(self, x, attr, stage):
        with stage("compose"):
            weight = compose_weight(attr("alpha"), (self.in_features - self.f + 1,), (self.f,))
        with stage("linear"):
            return F.linear(x, weight, attr("bias"))

    def folded(self) -> FoldedStructuredLinear:
        return FoldedStructuredLinear(self)


class FoldedStructuredLinear(_StructuredLinear):
    form = "folded"
    lowering = "sum-pool (cumsum difference) + small linear"

    def __init__(self, trained: StructuredLinear) -> None:
        super().__init__(trained.in_features, trained.out_features, trained.f)
        self.train(trained.training)
        self.init_error = trained.init_error
        self.alpha = parameter_copy(trained.alpha)
        self.bias = parameter_copy(trained.bias)

    def compute(self, x, attr, stage):
        with stage("sum_pool"):  # running sum over the features, as in sum_pool
            pooled = sliding_sum(x, self.in_features, self.in_features - self.f + 1, -1)
        with stage("linear"):
            return F.linear(pooled, attr("alpha"), attr("bias"))

    def folded(self) -> FoldedStructuredLinear:
        return self


@register_lowering(StructuredConv2d, "sum-pool", default=True)
def sum_pool_lowering(layer: StructuredConv2d, **options) -> FoldedStructuredConv2d:
    """The default: pad, 3-D sum-pool, small conv (:class:`FoldedStructuredConv2d`)."""
    return FoldedStructuredConv2d(layer)


register_lowering(StructuredConv2d, "dense")(dense_lowering)
