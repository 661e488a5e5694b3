"""A per-layer ``fold`` strategy from each layer's kernel size and width: the Lego form only
where it can win on ONNX Runtime's CPU provider.

``fold(gm, strategy=by_kernel(gm))`` lowers the layers with a spatial kernel (k x k, k > 1)
``"gather"`` and keeps the 1x1 layers ``"dense"``. On ONNX Runtime (MLAS, 2 threads) a 3x3
Lego layer of ResNet-50 runs 1.4-1.7x faster than its conv at batch 8 in every lowering, while a
1x1 Lego layer runs 0.25-1.2x: its Lego conv saves ``1 - m/n`` of a cheap conv and the merge
(gather, multiply, sum, two layout reorders) costs about as much again (docs/performance.md,
"ONNX Runtime forms"). ``min_in_channels`` keeps narrow layers dense too.
"""

from __future__ import annotations

from torch import nn

from legofx.core.layer import RewrittenLayer
from legofx.lowering.registry import lowerings


def by_kernel(gm: nn.Module, spatial: str = "gather", pointwise: str = "dense",
              min_in_channels: int = 0) -> dict[str, str]:
    """Layer name -> ``spatial`` for every training-form layer of ``gm`` with a kernel larger
    than 1x1 and at least ``min_in_channels`` input channels, ``pointwise`` for the others
    (layers that offer both lowerings; the rest take their default)."""
    chosen = {}
    for name, layer in gm.named_modules():
        if not (isinstance(layer, RewrittenLayer) and layer.form == "training"):
            continue
        kernel = getattr(layer, "kernel_size", None)
        offered = lowerings(layer)
        if kernel is None or spatial not in offered or pointwise not in offered:
            continue
        wide = getattr(layer, "in_channels", 0) >= min_in_channels
        chosen[name] = spatial if max(kernel) > 1 and wide else pointwise
    return chosen
