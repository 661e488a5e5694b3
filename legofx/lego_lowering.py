"""How a folded Lego layer computes: the lowerings ``fold(gm, strategy=...)`` chooses from.

- ``"gather"`` (:class:`~legofx.lego_layers.FoldedLegoConv2d`): fragments folded into the
  batch axis, one dense conv with the ``m`` shared Lego filters, then ``index_select`` +
  multiply + sum. ``m*c*kh*kw + n*o`` MACs per output pixel, the model stored as Lego
  filters, coefficients and small-integer indices.
- ``"dense"`` (:class:`ReconstructedLegoConv2d`): the ``(n, c, kh, kw)`` weight the layer
  stands for, reconstructed once, run as the original conv: the same function at the
  original's cost and size, never slower than it.
- ``"auto"`` (any method): per layer, whichever lowering runs fastest on the layer's own
  input from ``fold``'s ``example_inputs`` (interleaved eager timings, :func:`choose_fastest`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legofx.lego_layers import FoldedLegoConv2d, LegoConv2d, _LegoLayer


def smallest_index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds ``0..largest`` (what the index is stored in)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class ReconstructedLegoConv2d(_LegoLayer):
    """Inference form that runs one conv with the reconstructed dense weight ``dense_weight``.

    It computes what :class:`FoldedLegoConv2d` computes (up to rounding) at the original
    conv's cost; ``params_after`` counts the dense weight, since that is what it stores.
    """

    form = "folded"
    lowering = "dense (reconstructed conv)"

    def __init__(self, trained: LegoConv2d | FoldedLegoConv2d) -> None:
        super().__init__(trained.geometry, trained.o, trained.m)
        self.train(trained.training)
        with torch.no_grad():
            weight = trained.reconstruct_weight()
        self.dense_weight = nn.Parameter(weight.detach().clone(), trained.lego.requires_grad)
        self.bias = (None if trained.bias is None
                     else nn.Parameter(trained.bias.detach().clone(), trained.bias.requires_grad))

    @property
    def weight(self) -> Tensor:
        return self.dense_weight

    def reconstruct_weight(self) -> Tensor:
        return self.dense_weight

    @property
    def params_after(self) -> int:
        return self.dense_weight.numel() + (0 if self.bias is None else self.bias.numel())

    def macs(self, output_shape: tuple[int, ...]) -> tuple[int, int]:
        dense, _ = super().macs(output_shape)
        return dense, dense

    def compute(self, x, attr, stage):
        with stage("dense_conv"):
            padding = self.padding
            if self.padding_mode != "zeros":
                x = F.pad(x, self.pad, mode=self.padding_mode)
                padding = 0
            return F.conv2d(x, attr("dense_weight"), attr("bias"), self.stride, padding,
                            self.dilation)

    def folded(self) -> ReconstructedLegoConv2d:
        return self


def check_index_dtype(index_dtype, largest: int) -> torch.dtype:
    """``index_dtype`` as a dtype that holds ``0..largest``; ``"smallest"`` picks the smallest."""
    if index_dtype == "smallest":
        return smallest_index_dtype(largest)
    if not isinstance(index_dtype, torch.dtype) or index_dtype.is_floating_point or \
            index_dtype.is_complex or index_dtype == torch.bool:
        raise TypeError(f"index_dtype must be an integer torch.dtype or 'smallest', "
                        f"got index_dtype={index_dtype!r}")
    if largest > torch.iinfo(index_dtype).max:
        raise ValueError(f"index_dtype={index_dtype} cannot hold index {largest} (o*m - 1); "
                         "use a wider dtype or 'smallest'")
    return index_dtype
