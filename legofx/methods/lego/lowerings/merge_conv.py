"""The ``"merge-conv"`` lowering of a Lego layer: the merge as one dense 1x1 conv.

Split and Lego conv as in the gather lowering, then a 1x1 conv with the constant ``(n, o*m)``
kernel ``coef * M`` (the training form's merge with ``M`` frozen). It costs ``n*o*m`` more
MACs per output pixel than the gather (``n*o``), but it is one compute-bound kernel instead of
three memory-bound passes (gather, multiply, sum over fragments), and it never holds more than
the Lego feature maps and the output: its peak memory is about the original conv's, where the
gather materialises ``n*o`` maps twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legofx.core.layer import parameter_copy
from legofx.lowering.registry import register_lowering
from legofx.methods.lego.layers import LegoConv2d, LegoLayer


class MergeConvLegoConv2d(LegoLayer):
    """Inference form: ``lego``, the merge kernel ``merge`` ``(n, o*m, 1, 1)`` and ``bias``."""

    form = "folded"
    lowering = "merge-conv (1x1 conv with coef*M)"
    per_output = "merge"

    def __init__(self, trained: LegoConv2d) -> None:
        super().__init__(trained.geometry, trained.o, trained.m)
        self.train(trained.training)
        n, o, m = trained.out_channels, trained.o, trained.m
        self.lego = parameter_copy(trained.lego)
        onehot = F.one_hot(trained.selection(), m).to(self.lego.dtype)
        kernel = onehot * trained.coef.detach().unsqueeze(-1)
        self.merge = nn.Parameter(kernel.reshape(n, o * m, 1, 1).clone(), trained.lego.requires_grad)
        self.bias = parameter_copy(trained.bias)

    @property
    def params_after(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel()
        return self.lego.numel() + self.merge.numel() + bias

    def macs(self, output_shape: tuple[int, ...]) -> tuple[int, int]:
        dense, _ = super().macs(output_shape)
        pixels = output_shape[0] * output_shape[2] * output_shape[3]
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return dense, pixels * (self.m * c * kh * kw + n * self.o * self.m)

    def reconstruct_weight(self) -> Tensor:
        kernel = self.merge.reshape(self.out_channels, self.o, self.m)
        return torch.einsum("jik,kchw->jichw", kernel, self.lego).flatten(1, 2)

    @property
    def weight(self) -> Tensor:
        return self.reconstruct_weight()

    def compute(self, x, attr, stage):
        maps = self._maps(x, attr, stage)
        with stage("merge"):
            return F.conv2d(maps, attr("merge"), attr("bias"))

    def folded(self) -> MergeConvLegoConv2d:
        return self


@register_lowering(LegoConv2d, "merge-conv")
def merge_conv_lowering(layer: LegoConv2d, **options) -> MergeConvLegoConv2d:
    return MergeConvLegoConv2d(layer)
