"""The ``"grouped"`` and ``"grouped-gather"`` lowerings of a Lego layer: the Lego conv as one
grouped conv on the input as it is, for ONNX Runtime's CPU kernels.

The gather and merge-conv lowerings move the ``o`` input fragments into the batch
(``Reshape``), convolve, and move them back: ONNX Runtime's CPU provider runs its convs in a
blocked channel layout (NCHWc) and reorders to plain NCHW and back around every op it has no
blocked kernel for, so each of those reshapes costs two layout passes over the maps, and the
Conv + BatchNorm + activation fusions stop at the merge. Here the Lego conv is one ``Conv``
with ``groups=o`` and the ``o*m`` filters ``[B; B; ...]`` (the Lego filters repeated per
fragment: ``o`` times their size in the file, still ``m/n`` of the dense weight):

- ``grouped``: the merge as a dense 1x1 conv with the kernel ``coef * M`` (``(n, o*m)``), so
  the layer is two convs: a following BatchNorm folds into the second (``fold(...,
  fuse_batchnorm=True)``, or ONNX Runtime's own Conv+BatchNorm fusion), and so does an
  activation (ONNX Runtime's Conv+Relu / Conv+Clip fusions);
- ``grouped-gather``: the merge as in ``gather`` (``index_select``, multiply, sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from legofx.core.arguments import check_index_dtype
from legofx.core.geometry import padded
from legofx.lowering.registry import register_lowering
from legofx.methods.lego.layers import FoldedLegoConv2d, LegoConv2d, merge_gathered
from legofx.methods.lego.lowerings.merge_conv import MergeConvLegoConv2d


def grouped_conv(x, lego, layer):
    """``x`` convolved with the Lego filters of every fragment in one conv (``groups=o``):
    ``(N, o*m, H', W')``, channel ``i*m + k`` = fragment ``i``, Lego filter ``k``."""
    x, padding = padded(x, layer.geometry)
    return F.conv2d(x, lego.repeat(layer.o, 1, 1, 1), None, layer.stride, padding,
                    layer.dilation, layer.o)


def blocked(layer, block: int = 16) -> bool:
    """Whether ONNX Runtime's CPU provider runs ``layer``'s grouped Lego conv in its blocked
    layout (NCHWc): channels per group in and out (``c/o``, ``m``) multiples of its block (16
    with AVX-512, 8 with AVX2). Where they are not, the conv runs in plain NCHW between two
    layout reorders; ``by_macs(gm, "grouped", where=blocked)`` keeps such layers dense."""
    return (layer.in_channels // layer.o) % block == 0 and layer.m % block == 0


class GroupedLegoConv2d(MergeConvLegoConv2d):
    """Inference form: ``lego``, the merge kernel ``merge`` ``(n, o*m, 1, 1)``, ``bias``."""

    lowering = "grouped (grouped conv, 1x1 conv with coef*M)"

    def __init__(self, trained: LegoConv2d) -> None:
        super().__init__(trained)
        self.lego = nn.Parameter(self.lego.detach().repeat(self.o, 1, 1, 1),
                                 self.lego.requires_grad)

    def reconstruct_weight(self):
        kernel = self.merge.reshape(self.out_channels, self.o, self.m)
        lego = self.lego.unflatten(0, (self.o, self.m))
        return torch.einsum("jik,ikchw->jichw", kernel, lego).flatten(1, 2)

    def compute(self, x, attr, stage):
        with stage("lego_conv"):
            x, padding = padded(x, self.geometry)
            maps = F.conv2d(x, attr("lego"), None, self.stride, padding, self.dilation, self.o)
        with stage("merge"):
            return F.conv2d(maps, attr("merge"), attr("bias"))


def merge_kernel(index, coef, width: int):
    """The merge as a 1x1 conv kernel ``(n, width, 1, 1)``, ``width = o*m``, built from the
    gather form's ``index`` ``(n*o,)`` and ``coef`` ``(n, o)``: ``kernel[j, index[j*o+i]] =
    coef[j, i]`` (fragments select disjoint channels). Made of constants only, so ONNX Runtime
    computes it once, when it loads the file (constant folding), and the file keeps the gather
    form's small tensors."""
    n, o = coef.shape
    channels = torch.arange(width, device=index.device)
    onehot = (index.unsqueeze(-1) == channels).to(coef.dtype).unflatten(0, (n, o))
    return (onehot * coef.unsqueeze(-1)).sum(1).reshape(n, width, 1, 1)


class CompactGroupedLegoConv2d(FoldedLegoConv2d):
    """``grouped``'s graph with the gather form's tensors (and ``state_dict``): the repeated
    Lego filters and the merge kernel are computed in the graph from ``lego``, ``index`` and
    ``coef``."""

    lowering = "grouped-compact (grouped conv, 1x1 conv with coef*M built in the graph)"

    def macs(self, output_shape):
        pixels = output_shape[0] * output_shape[2] * output_shape[3]
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return pixels * n * c * kh * kw, pixels * (self.m * c * kh * kw + n * self.o * self.m)

    def compute(self, x, attr, stage):
        with stage("lego_conv"):
            maps = grouped_conv(x, attr("lego"), self)
        with stage("merge"):
            kernel = merge_kernel(self._index(attr), attr("coef"), self.o * self.m)
            return F.conv2d(maps, kernel, attr("bias"))


class GroupedGatherLegoConv2d(FoldedLegoConv2d):
    """Inference form with the gather form's tensors, the Lego conv as one grouped conv."""

    lowering = "grouped-gather (grouped conv, index_select, mul, sum)"

    def compute(self, x, attr, stage):
        with stage("lego_conv"):
            maps = grouped_conv(x, attr("lego"), self)
        with stage("merge"):
            return merge_gathered(maps, self._index(attr), attr("coef"), attr("bias"),
                                  self.out_channels, self.o)


@register_lowering(LegoConv2d, "grouped", by_name_only=True)  # not an auto candidate: by_macs picks it
def grouped_lowering(layer: LegoConv2d, **options) -> GroupedLegoConv2d:
    return GroupedLegoConv2d(layer)


@register_lowering(LegoConv2d, "grouped-compact", by_name_only=True)
def compact_grouped_lowering(layer: LegoConv2d, index_dtype: torch.dtype | str = torch.int64,
                             **options) -> CompactGroupedLegoConv2d:
    return CompactGroupedLegoConv2d(layer, check_index_dtype(index_dtype, layer.o * layer.m - 1))


@register_lowering(LegoConv2d, "grouped-gather", by_name_only=True)
def grouped_gather_lowering(layer: LegoConv2d, index_dtype: torch.dtype | str = torch.int64,
                            **options) -> GroupedGatherLegoConv2d:
    return GroupedGatherLegoConv2d(layer, check_index_dtype(index_dtype, layer.o * layer.m - 1))
