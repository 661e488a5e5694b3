"""``fold(..., fuse_batchnorm=True)``: an eval-mode BatchNorm after a folded layer goes into it.

An eval-mode ``BatchNorm2d`` is a per-channel affine map, ``y_j = s_j x_j + t_j`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``. Every folded
layer is linear in the tensor it names in ``per_output`` (dim 0 = output channel: the Lego
coefficients, the merge kernel, the dense or Structured weight) plus its bias, so scaling that
tensor's rows by ``s`` and setting the bias to ``s * bias + t`` computes ``BN(layer(x))``
exactly (up to rounding). The BatchNorm node leaves the graph: one memory pass fewer per layer
in eager mode, and ONNX Runtime / TensorRT, which fuse ``Conv -> BatchNorm`` for a plain conv
but not after a Lego merge, see the same kind of graph for both.
"""

from __future__ import annotations

import torch
from torch import nn

from legofx.core.layer import RewrittenLayer
from legofx.lowering.registry import register_absorber


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(x) == s * x + t`` per channel, for a BatchNorm in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    return scale, shift if bn.bias is None else shift + bn.bias


def fusable(layer: nn.Module, bn: nn.Module) -> bool:
    """A folded legofx layer followed by an eval-mode ``BatchNorm2d`` with running statistics
    over its output channels, in its dtype."""
    return (isinstance(layer, RewrittenLayer) and layer.form == "folded"
            and layer.per_output is not None and isinstance(bn, nn.BatchNorm2d)
            and not bn.training and bn.running_mean is not None
            and bn.num_features == layer.out_channels
            and bn.running_mean.dtype == getattr(layer, layer.per_output).dtype)


@register_absorber("batchnorm", option="fuse_batchnorm")
@torch.no_grad()
def absorb_batchnorm(layer_name: str, layer: nn.Module, bn_name: str, bn: nn.Module) -> bool:
    """Fold ``bn`` into ``layer`` (in place) when :func:`fusable`; the layer's ``lowering``
    then names the BatchNorm it holds. For :func:`legofx.passes.absorb_followers`."""
    if not fusable(layer, bn):
        return False
    scale, shift = batchnorm_affine(bn)
    tensor = getattr(layer, layer.per_output)
    tensor.mul_(scale.reshape(-1, *[1] * (tensor.dim() - 1)))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.clone(), tensor.requires_grad)
    else:
        layer.bias.mul_(scale).add_(shift)
    layer.lowering = f"{layer.lowering} + BatchNorm {bn_name} folded in"
    return True
