"""LegoNet layers (Yang et al., ICML 2019): the training form and the folded inference form.

A conv with ``n`` filters of shape ``(c, kh, kw)`` becomes ``m`` shared Lego filters ``B`` of
shape ``(c/o, kh, kw)``. Filter ``j`` is the concatenation over fragments ``i < o`` of
``coef[j, i] * B[k(j, i)]``, with ``k(j, i) = argmax proxy[j, i, :]``.

Both forms compute ``compute(x, attr, stage)`` in named stages that :mod:`passes.inline_modules`
turns into explicit graph nodes:

- ``split``: ``(N, c, H, W) -> (N*o, c/o, H, W)``: the ``o`` contiguous input fragments;
- ``lego_conv``: one conv of every fragment with the ``m`` Lego filters, regrouped as
  ``(N, o*m, H', W')`` "Lego feature maps" (channel ``i*m + k``: fragment ``i``, filter ``k``);
- ``select`` (training form only): ``M = onehot(argmax proxy)`` forward, identity gradient
  to ``proxy`` backward, written as ``hard + (proxy - proxy.detach())`` so that it survives
  ``torch.fx`` tracing and ``torch.export`` (an ``autograd.Function`` would lose its backward);
- ``merge``: output ``j = sum_i coef[j, i] * map[i, k(j, i)] + bias[j]``; in the training form
  a 1x1 conv with the kernel ``coef * M``, in the folded form ``index_select`` with a constant
  int64 index, multiply and sum over fragments.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legofx.core.arguments import check_index_dtype
from legofx.core.geometry import conv_geometry, padded
from legofx.core.layer import (ConvLayer, assigned_weight, check_representable, conv_extra_repr,
                               full_tensor, parameter_copy)
from legofx.lowering.dense import dense_lowering
from legofx.lowering.registry import register_lowering


def split_fragments(x: Tensor, o: int) -> Tensor:
    """``(N, c, H, W) -> (N*o, c/o, H, W)``: the ``o`` contiguous channel fragments as batch
    (an unbatched ``(c, H, W)`` gives ``(o, c/o, H, W)``).

    ``contiguous()`` first: a non-contiguous input (a permuted or channels-last one) has to be
    copied either way, and an explicit copy exports as ``clone`` + ``view``, which
    Torch-TensorRT converts, where ``reshape``'s copy exports as ``_unsafe_view``."""
    return x.contiguous().unflatten(-3, (o, -1)).flatten(0, -4)


def convolve_batch(frags: Tensor, lego: Tensor, conv: dict) -> Tensor:
    """The fragments ``(N*o, c/o, H, W)`` convolved with the Lego filters: ``(N*o, m, H', W')``."""
    frags, padding = padded(frags, conv)
    return F.conv2d(frags, lego, None, conv["stride"], padding, conv["dilation"])


def convolve_fragments(frags: Tensor, lego: Tensor, o: int, conv: dict,
                       batch: tuple = (-1,)) -> Tensor:
    """Every fragment convolved with every Lego filter, as ``(*batch, o*m, H', W')``;
    ``batch``: the input's leading dims (``x.shape[:-3]``: ``(N,)``, or ``()`` unbatched)."""
    return convolve_batch(frags, lego, conv).unflatten(0, batch + (o,)).flatten(-4, -3)


def frozen_pairs(frozen_selection: Tensor) -> Tensor:
    """``(n, o)`` bool: the (output channel, fragment) pairs whose selection is frozen."""
    return frozen_selection.amax(-1) > 0


def selected_index(proxy: Tensor, frozen_selection: Tensor) -> Tensor:
    """``k(j, i)``, ``(n, o)`` int64: the frozen choice where there is one, else ``argmax proxy``."""
    return torch.where(frozen_pairs(frozen_selection), frozen_selection.argmax(-1), proxy.argmax(-1))


def selection_onehot(proxy: Tensor, m: int, frozen_selection: Tensor) -> Tensor:
    """The training form's ``M``: straight-through one-hot of ``argmax proxy``; where a
    (output channel, fragment) pair is frozen (``frozen_selection``, ``(n, o, m)``, is positive
    somewhere along ``m``), the one-hot of its largest entry, with a zero gradient to ``proxy``.

    Freezing is data, not control flow: the traced graph stays the same, the proxies keep
    taking part (with zero gradients, as ``DistributedDataParallel`` expects), and momentum or
    weight decay that still move them cannot change a frozen selection. ``frozen_selection`` is
    a floating-point buffer so that a weight average of the model (ultralytics' ``ModelEMA``,
    timm's ``ModelEmaV3``, which average only floating tensors) holds ``d * 0 + (1 - d) *
    onehot`` after its first update: positive at the same entry, so the average selects what
    the model does.
    """
    fixed = frozen_pairs(frozen_selection)
    hard = F.one_hot(selected_index(proxy, frozen_selection), m).type_as(proxy)
    return hard + (proxy - proxy.detach()) * fixed.logical_not().unsqueeze(-1).type_as(proxy)


def merge_selected(maps: Tensor, select: Tensor, coef: Tensor, bias: Tensor | None,
                   n: int) -> Tensor:
    """Training-form merge: a 1x1 conv whose ``(n, o*m)`` kernel is ``coef * M``."""
    kernel = (select * coef.unsqueeze(-1)).reshape(n, -1, 1, 1)
    return F.conv2d(maps, kernel, bias)


def merge_gathered(maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                   n: int, o: int) -> Tensor:
    """Folded merge: gather the selected maps, scale by the coefficients, sum over fragments."""
    picked = maps.index_select(-3, index).unflatten(-3, (n, o))
    out = (picked * coef.reshape(n, o, 1, 1)).sum(-3)
    return out if bias is None else out + bias.reshape(n, 1, 1)


def merge_accumulated(maps: Tensor, index: Tensor, coef: Tensor, bias: Tensor | None,
                      n: int, o: int) -> Tensor:
    """The folded merge with fewer memory passes (the ``accumulate`` lowering): fragment 0's
    selected maps scaled in place, every further fragment's added scaled in place
    (``addcmul_``), then the bias in place. Each in-place result is the tensor used next, so
    dead-code elimination keeps them, and autograd's checks keep training through it safe."""
    index = index.view(n, o)
    out = maps.index_select(-3, index[:, 0]).mul_(coef[:, 0].reshape(n, 1, 1))
    for i in range(1, o):
        out = out.addcmul_(maps.index_select(-3, index[:, i]), coef[:, i].reshape(n, 1, 1))
    return out if bias is None else out.add_(bias.reshape(n, 1, 1))


def reconstruct_weight(lego: Tensor, selection: Tensor, coef: Tensor) -> Tensor:
    """The dense ``(n, c, kh, kw)`` weight the Lego layer stands for."""
    return (lego[selection] * coef[..., None, None, None]).flatten(1, 2)


class LegoLayer(ConvLayer):
    """What every Lego form shares: sizes, conv hyper-parameters, split and Lego conv."""

    def __init__(self, geometry: dict, o: int, m: int) -> None:
        super().__init__(geometry)
        self.o, self.m = o, m

    @property
    def params_after(self) -> int:
        """Floating-point parameters of the inference form: Lego filters, coefficients (when
        learned), bias."""
        coef = self.coef.numel() if isinstance(self.coef, nn.Parameter) else 0
        return self.lego.numel() + coef + (0 if self.bias is None else self.bias.numel())

    def macs(self, output_shape: tuple[int, ...]) -> tuple[int, int]:
        """Dense conv vs Lego conv (``m*c*kh*kw``) + merge (``n*o``) per output pixel."""
        pixels = output_shape[0] * output_shape[2] * output_shape[3]
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return pixels * n * c * kh * kw, pixels * (self.m * c * kh * kw + n * self.o)

    def _maps(self, x, attr, stage):
        with stage("split"):
            frags = split_fragments(x, self.o)
        with stage("lego_conv"):
            return convolve_fragments(frags, attr("lego"), self.o, self.geometry, x.shape[:-3])

    def reconstruct_weight(self) -> Tensor:
        return reconstruct_weight(self.lego, self.selection(), self.coef)

    @property
    def weight(self) -> Tensor:
        """The dense ``(n, c, kh, kw)`` weight, differentiable: code that reads ``conv.weight``
        of a conv replaced at module level still computes (and trains) the layer."""
        return reconstruct_weight(self.lego, self.selection(), self.coef)

    def extra_repr(self) -> str:
        return conv_extra_repr(self, f"o={self.o}, m={self.m}")

    def assign_weight(self, value: Tensor) -> None:
        """``layer.weight = w``: the coefficients fitted to ``w`` with the Lego filters and the
        selection kept (least squares per fragment, in float64). Exact for a weight whose
        filters are this layer's scaled per output channel (conv+BatchNorm fusion); any other
        weight is refused (:func:`~legofx.core.layer.check_representable`)."""
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        weight = assigned_weight(self, value, (n, c, kh, kw))
        picked = full_tensor(self.lego.detach())[self.selection()].double().flatten(2)
        target = weight.double().reshape(n, self.o, -1)
        norms = (picked * picked).sum(-1)
        coef = (target * picked).sum(-1) / torch.where(norms > 0, norms, torch.ones_like(norms))
        check_representable(self, weight, (coef.unsqueeze(-1) * picked).reshape(weight.shape),
                            "with its Lego filters and selection kept and its coefficients fitted")
        self.coef.copy_(coef.to(self.coef.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """A checkpoint made with another ``o`` / ``m`` is refused with both settings named,
        instead of torch's size mismatches."""
        lego = state_dict.get(prefix + "lego")
        if lego is not None and lego.dim() == 4 and tuple(lego.shape) != tuple(self.lego.shape):
            m, fragment = lego.shape[0], lego.shape[1]
            o = self.in_channels // fragment if fragment and self.in_channels % fragment == 0 else "?"
            error_msgs.append(f"{prefix[:-1] or 'layer'}: the checkpoint's Lego layer was made with "
                              f"o={o}, m={m} (lego {tuple(lego.shape)}), this one has o={self.o}, "
                              f"m={self.m}: transform with the checkpoint's o and m before "
                              f"load_state_dict (or, with m a fraction of each layer's "
                              f"outputs, load it into the model configuration it was saved from)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class LegoConv2d(LegoLayer):
    """Training form: Lego filters ``lego``, selection proxy ``proxy``, ``coef`` and ``bias``.

    Shapes: ``lego (m, c/o, kh, kw)``, ``proxy (n, o, m)``, ``coef (n, o)``, ``bias (n,)``.
    """

    form = "training"
    lowering = "split/lego-conv/merge (1x1 conv with coef*M)"

    def __init__(self, conv: nn.Conv2d, o: int, m: int, coefficients: bool = True) -> None:
        super().__init__(conv_geometry(conv), o, m)
        n, c, (kh, kw) = conv.out_channels, conv.in_channels, self.kernel_size
        like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.lego = nn.Parameter(torch.empty(m, c // o, kh, kw, **like))
        self.proxy = nn.Parameter(torch.empty(n, o, m, **like))
        if coefficients:
            self.coef = nn.Parameter(torch.empty(n, o, **like))
        else:  # the paper's variant without coefficients: constant ones
            self.register_buffer("coef", torch.empty(n, o, **like))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.init_error: float | None = None  # set by init="weights"
        self.register_buffer("frozen_selection", torch.zeros(n, o, m, **like))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random start with the scale of a fresh ``nn.Conv2d``.

        Every reconstructed filter gets the distribution ``nn.Conv2d.reset_parameters`` gives
        a dense weight: Kaiming-uniform (``a=sqrt(5)``) on the *reconstructed* filter's fan-in
        ``c*kh*kw``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, with unit coefficients. (The
        Lego filter's own fan-in ``c/o*kh*kw`` would make activations ``sqrt(o)`` too large.)
        The selection starts balanced: a random assignment in which every Lego filter is
        chosen ``floor`` or ``ceil`` of ``n*o/m`` times; the bias is kept from the original.
        """
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        bound = 1.0 / math.sqrt(c * kh * kw)
        self.lego.uniform_(-bound, bound)
        self.coef.fill_(1.0)
        choice = (torch.randperm(n * self.o) % self.m).view(n, self.o, 1).to(self.proxy.device)
        self.proxy.zero_().scatter_(-1, choice, 1.0)

    def compute(self, x, attr, stage):
        maps = self._maps(x, attr, stage)
        with stage("select"):
            select = selection_onehot(attr("proxy"), self.m, attr("frozen_selection"))
        with stage("merge"):
            return merge_selected(maps, select, attr("coef"), attr("bias"), self.out_channels)

    def selection(self) -> Tensor:
        """``k(j, i)``: the Lego filter each (output channel, fragment) uses, ``(n, o)`` int64."""
        return selected_index(full_tensor(self.proxy.detach()), full_tensor(self.frozen_selection))

    @property
    def frozen(self) -> bool:
        """Whether the selection is fixed (:func:`legofx.freeze_selection`)."""
        return bool(frozen_pairs(full_tensor(self.frozen_selection)).all())

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the selection (see :func:`selection_onehot`)."""
        onehot = F.one_hot(self.selection(), self.m).to(self.frozen_selection.dtype)
        self.frozen_selection.copy_(onehot.to(self.frozen_selection.device))

    @torch.no_grad()
    def unfreeze(self) -> None:
        self.frozen_selection.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Checkpoints of legofx before 0.2 kept the frozen selection as ``frozen`` (bool) and
        ``frozen_index`` (int64): read as ``frozen_selection``."""
        frozen, index = prefix + "frozen", prefix + "frozen_index"
        if frozen in state_dict and index in state_dict and prefix + "frozen_selection" not in state_dict:
            onehot = F.one_hot(state_dict.pop(index).long(), self.m).to(self.frozen_selection.dtype)
            state_dict[prefix + "frozen_selection"] = onehot * state_dict.pop(frozen).to(onehot.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def weight(self) -> Tensor:
        """The dense weight with the straight-through selection, so ``proxy`` gets gradients."""
        onehot = selection_onehot(self.proxy, self.m, self.frozen_selection)
        return torch.einsum("jik,kchw,ji->jichw", onehot, self.lego, self.coef).flatten(1, 2)

    def folded(self) -> FoldedLegoConv2d:
        return FoldedLegoConv2d(self)


class FoldedLegoConv2d(LegoLayer):
    """Inference form: ``lego``, ``coef``, ``bias`` and the constant ``index`` buffer.

    ``index[j*o + i] = i*m + k(j, i)`` picks, for output channel ``j`` and fragment ``i``,
    one of the ``o*m`` Lego feature maps. It is int64 unless ``index_dtype`` says otherwise
    (``fold(gm, index_dtype="smallest")`` stores ``uint8`` when ``o*m <= 256``, for the
    smallest file); a dtype ``index_select`` does not take (int8/uint8/int16) is cast to int64
    in the graph, one small op per call.
    """

    form = "folded"
    lowering = "gather (index_select, mul, sum)"
    per_output = "coef"

    def __init__(self, trained: LegoConv2d, index_dtype: torch.dtype = torch.int64) -> None:
        super().__init__(trained.geometry, trained.o, trained.m)
        self.train(trained.training)
        self.lego = parameter_copy(trained.lego)
        if isinstance(trained.coef, nn.Parameter):
            self.coef = parameter_copy(trained.coef)
        else:
            self.register_buffer("coef", trained.coef.detach().clone())
        self.bias = parameter_copy(trained.bias)
        offsets = torch.arange(self.o, device=self.lego.device) * self.m
        index = (trained.selection() + offsets).flatten()
        self.register_buffer("index", index.to(index_dtype))

    def compute(self, x, attr, stage):
        maps = self._maps(x, attr, stage)
        with stage("merge"):
            return merge_gathered(maps, self._index(attr), attr("coef"), attr("bias"),
                                  self.out_channels, self.o)

    def _index(self, attr) -> Tensor:
        """The index as ``index_select`` takes it (int32/int64; compact dtypes are cast)."""
        index = attr("index")
        return index if self.index.dtype in (torch.int32, torch.int64) else index.long()

    def selection(self) -> Tensor:
        offsets = torch.arange(self.o, device=self.index.device) * self.m
        return self.index.long().view(self.out_channels, self.o) - offsets

    def folded(self) -> FoldedLegoConv2d:
        return self


@register_lowering(LegoConv2d, "gather", default=True)
def gather_lowering(layer: LegoConv2d, index_dtype: torch.dtype | str = torch.int64,
                    **options) -> FoldedLegoConv2d:
    """The default: :class:`FoldedLegoConv2d`; ``index_dtype``: the gather index's dtype, or
    ``"smallest"``."""
    return FoldedLegoConv2d(layer, check_index_dtype(index_dtype, layer.o * layer.m - 1))


register_lowering(LegoConv2d, "dense")(dense_lowering)
