"""The ``"fused"`` lowering of a Lego layer: split, Lego conv, and the merge as one kernel.

Two lowerings, ``"fused"`` and ``"fused-grouped"`` (how the Lego conv runs: see
:class:`FusedLegoConv2d`). The merge (gather the selected Lego feature maps, scale, sum over
fragments, add the bias) is
``torch.ops.legofx.lego_merge`` (:mod:`legofx.merge_kernel`): one pass that reads the Lego
conv's output where it lies and writes the layer's output, with a ReLU that follows the layer
folded in (``fold`` does this: ``relu=True``, named in the layer's ``lowering``). PyTorch's
``index_select`` / multiply / sum take 3 or more passes, and torch.compile's generated gather
reads channels-last maps one element at a time.

It keeps the gather form's tensors (``lego``, ``coef``, ``bias``, ``index``: the same
state_dict) and its function. Ask for it by name, ``fold(gm, strategy="fused")`` (or
``"fused-grouped"``): it runs in eager PyTorch and under torch.compile, but ``torch.export``
keeps the custom op, which ONNX and TensorRT do not take, so ``strategy="auto"`` never picks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legofx import merge_kernel
from legofx.lego_layers import FoldedLegoConv2d, LegoConv2d, convolve_batch, padded, split_fragments


class FusedLegoConv2d(FoldedLegoConv2d):
    """Inference form with the gather form's tensors; ``relu``: a following ReLU folded in.

    ``grouped=False`` (``"fused"``) convolves the fragments folded into the batch axis, as the
    other lowerings do: best in eager PyTorch, where that split is a free view of a contiguous
    input. ``grouped=True`` (``"fused-grouped"``) runs the Lego conv as one conv with
    ``groups=o`` and the Lego filters repeated ``o`` times: no split at all, which is best
    under torch.compile, whose channels-last tensors make the split a copy.
    """

    standard_ops = False

    def __init__(self, trained: LegoConv2d, index_dtype: torch.dtype = torch.int64,
                 grouped: bool = False) -> None:
        reason = merge_kernel.available()
        if reason is not None:
            name = "fused-grouped" if grouped else "fused"
            raise merge_kernel.KernelUnavailable(f"strategy={name!r} needs the legofx merge kernel: {reason}")
        super().__init__(trained, index_dtype)
        self.grouped, self.relu = grouped, False
        conv = "grouped conv" if grouped else "fragments in the batch"
        self.lowering = f"fused ({conv}, C merge kernel)"

    def compute(self, x, attr, stage):
        if self.grouped:
            with stage("lego_conv"):
                maps = convolve_grouped(x, attr("lego"), self.o, self.geometry)
        else:
            with stage("split"):
                frags = split_fragments(x, self.o)
            with stage("lego_conv"):
                maps = convolve_batch(frags, attr("lego"), self.geometry)
        with stage("merge"):
            return torch.ops.legofx.lego_merge.default(maps, self._index(attr), attr("coef"),
                                                       attr("bias"), self.relu, self.grouped)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grouped={self.grouped}, relu={self.relu}"


def convolve_grouped(x: Tensor, lego: Tensor, o: int, conv: dict) -> Tensor:
    """``(N, c, H, W)`` convolved fragment by fragment with the Lego filters in one conv with
    ``groups=o``: ``(N, o*m, H', W')``, channel ``i*m + k`` (fragment ``i``, filter ``k``)."""
    x, padding = padded(x, conv)
    return F.conv2d(x, lego.repeat(o, 1, 1, 1), None, conv["stride"], padding, conv["dilation"], o)


def is_relu(module_or_function) -> bool:
    return (isinstance(module_or_function, nn.ReLU)
            or module_or_function in (torch.relu, torch.relu_, nn.functional.relu))


def absorb_relu(layer_name: str, layer: nn.Module, relu_name: str, relu) -> bool:
    """Fold a ReLU (module or function) into the fused layer before it, for
    :func:`passes.absorb_followers`: exact, the kernel applies it to what it writes."""
    if not isinstance(layer, FusedLegoConv2d) or layer.relu or not is_relu(relu):
        return False
    layer.relu = True
    layer.lowering = f"{layer.lowering} + ReLU {relu_name} folded in"
    return True
