"""The ``"dense"`` lowering every conv method offers: one plain conv with the weight the layer
stands for (Lego: reconstructed from B, M and the coefficients; Structured: ``A alpha``).

It computes the layer's function (up to rounding) at the original conv's cost and size, so it
is never slower than the original; ``fold(gm, strategy="auto")`` keeps it for the layers whose
own lowering is slower on the machine. ``params_after`` counts the dense weight, which is what
it stores. A method offers it by registering :func:`dense_lowering` for its layer type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from legofx.core.geometry import padded
from legofx.core.layer import ConvLayer, conv_extra_repr, parameter_copy


class DenseFoldedConv2d(ConvLayer):
    """Inference form: ``weight`` ``(n, c, kh, kw)`` and ``bias``, run as ``nn.Conv2d`` runs."""

    form = "folded"
    lowering = "dense (reconstructed conv)"
    per_output = "weight"

    def __init__(self, trained: ConvLayer) -> None:
        super().__init__(trained.geometry)
        self.train(trained.training)
        with torch.no_grad():
            weight = trained.weight.detach().clone()
        trainable = any(p.requires_grad for p in trained.parameters(recurse=False))
        self.weight = nn.Parameter(weight, trainable)
        self.bias = parameter_copy(trained.bias)

    @property
    def params_before(self) -> int:
        return self.params_after

    @property
    def params_after(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())

    def macs(self, output_shape: tuple[int, ...]) -> tuple[int, int]:
        batch, _, height, width = output_shape
        dense = batch * height * width * self.weight[0].numel() * self.out_channels
        return dense, dense

    def compute(self, x, attr, stage):
        with stage("dense_conv"):
            x, padding = padded(x, self.geometry)
            return F.conv2d(x, attr("weight"), attr("bias"), self.stride, padding, self.dilation)

    def folded(self) -> DenseFoldedConv2d:
        return self

    def extra_repr(self) -> str:
        return conv_extra_repr(self)


def dense_lowering(layer: ConvLayer, **options) -> DenseFoldedConv2d:
    """The ``"dense"`` lowering's builder, for :func:`legofx.lowering.registry.register_lowering`."""
    return DenseFoldedConv2d(layer)
