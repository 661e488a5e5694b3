"""A per-layer ``fold`` strategy chosen by counting multiply-accumulates instead of timing.

``fold(gm, strategy=by_macs(gm, "grouped"))`` takes ``"grouped"`` for the layers where that
lowering needs at most ``keep_below`` of the dense conv's MACs, and ``"dense"`` elsewhere:
"only where it pays", decided in microseconds where ``strategy="auto"`` exports and times every
candidate (minutes per model on ONNX Runtime). It suits lowerings made of compute-bound convs
(``grouped``: a grouped conv and a 1x1 conv, whose time on ONNX Runtime follows their MACs),
not memory-bound ones (``gather``), whose MACs say little about their time.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from legofx.core.layer import RewrittenLayer
from legofx.lowering.registry import lowerings

# The MAC fraction below which a lowering is taken: a margin for what MACs do not count (the
# second conv's pass over memory, the grouped conv's smaller kernels)
KEEP_BELOW = 0.8


def mac_ratio(layer: RewrittenLayer, lowering: str, **options) -> float:
    """MACs of ``layer`` in ``lowering`` / MACs of its dense conv, per output pixel."""
    built = lowerings(layer)[lowering].build(layer, **options)
    dense, lowered = built.macs((1, layer.out_channels, 1, 1))
    return lowered / dense


def by_macs(gm: nn.Module, lowering: str, fallback: str = "dense",
            keep_below: float = KEEP_BELOW, where: Callable[[RewrittenLayer], bool] | None = None,
            **options) -> dict[str, str]:
    """Layer name -> ``lowering`` where it needs at most ``keep_below`` of the dense MACs (and
    ``where(layer)`` holds, when given), else ``fallback``, for every training-form layer of
    ``gm`` that offers both."""
    chosen = {}
    for name, layer in gm.named_modules():
        if not (isinstance(layer, RewrittenLayer) and layer.form == "training"):
            continue
        offered = lowerings(layer)
        if lowering in offered and fallback in offered:
            pays = mac_ratio(layer, lowering, **options) <= keep_below
            pays = pays and (where is None or where(layer))
            chosen[name] = lowering if pays else fallback
    return chosen
