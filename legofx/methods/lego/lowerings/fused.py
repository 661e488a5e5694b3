"""The ``"fused"`` lowering of a Lego layer: Lego conv and merge in one operator.

The layer runs as ``torch.ops.legofx.lego_conv_merge`` (:mod:`legofx.methods.lego.kernel`): PyTorch's
conv with the Lego filters (one conv with ``groups=o``, channels-last), then a C kernel that
gathers the selected Lego feature maps, scales, sums over fragments and adds the bias in one pass
over memory, with a ReLU that follows the layer folded in (``fold`` does this: ``relu=True``,
named in the layer's ``lowering``), writing over the conv's output where the sizes allow
(``o*m == n``). PyTorch's ``index_select`` / multiply / sum take 3 or more passes and allocate
each result, and torch.compile's generated gather reads channels-last maps one element at a
time.

It keeps the gather form's tensors (``lego``, ``coef``, ``bias``, ``index``: the same
state_dict) and its function. It runs in eager PyTorch and under torch.compile, but
``torch.export`` keeps the custom op, which ONNX and TensorRT do not take: ask for it by name,
``fold(gm, strategy="fused")``, or let ``strategy="auto"`` consider it with ``custom_ops=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from legofx.core.arguments import check_index_dtype
from legofx.core.geometry import padded
from legofx.lowering.registry import register_absorber, register_lowering
from legofx.methods.lego import kernel
from legofx.methods.lego.layers import FoldedLegoConv2d, LegoConv2d


class FusedLegoConv2d(FoldedLegoConv2d):
    """Inference form with the gather form's tensors; ``relu``: a following ReLU folded in.

    The input is made channels-last in the graph, before the operator, so that torch.compile
    writes it that way where it is computed instead of copying it."""

    standard_ops = False
    lowering = "fused (grouped conv, C merge kernel, channels-last)"

    def __init__(self, trained: LegoConv2d, index_dtype: torch.dtype = torch.int64) -> None:
        reason = kernel.available()
        if reason is not None:
            raise kernel.KernelUnavailable(f"strategy='fused' needs the legofx merge kernel: {reason}")
        super().__init__(trained, index_dtype)
        self.lego = kernel.WatchedFilters(self.lego.detach(), self.lego.requires_grad)
        self.relu = False

    def compute(self, x, attr, stage):
        with stage("pad"):
            x, padding = padded(x, self.geometry, conv_pads="symmetric")
        with stage("lego_conv_merge"):  # an unbatched (c, H, W) input runs as a batch of one
            # reshape, not unsqueeze + flatten: a batched input's reshape to its own size is no
            # view at all for inductor, which then still writes it channels-last where it is
            # computed; a view would fix its producer's layout as contiguous and add a copy
            # (docs/performance.md)
            batched = x.reshape((-1,) + x.shape[-3:]).contiguous(memory_format=torch.channels_last)
            out = torch.ops.legofx.lego_conv_merge.default(
                batched, attr("lego"), self._index(attr), attr("coef"), attr("bias"),
                list(self.stride), padding, list(self.dilation), self.relu)
            return out.reshape(x.shape[:-3] + out.shape[-3:])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"


def is_relu(module_or_function) -> bool:
    return (isinstance(module_or_function, nn.ReLU)
            or module_or_function in (torch.relu, torch.relu_, nn.functional.relu))


@register_absorber("relu")
def absorb_relu(layer_name: str, layer: nn.Module, relu_name: str, relu) -> bool:
    """Fold a ReLU (module or function) into the fused layer before it, for
    :func:`legofx.passes.absorb_followers`: exact, the kernel applies it to what it writes."""
    if not isinstance(layer, FusedLegoConv2d) or layer.relu or not is_relu(relu):
        return False
    layer.relu = True
    layer.lowering = f"{layer.lowering} + ReLU {relu_name} folded in"
    return True


@register_lowering(LegoConv2d, "fused", by_name_only=True)
def fused_lowering(layer: LegoConv2d, index_dtype: torch.dtype | str = torch.int64,
                   **options) -> FusedLegoConv2d:
    return FusedLegoConv2d(layer, check_index_dtype(index_dtype, layer.o * layer.m - 1))
