"""What a rewritten conv keeps of its ``nn.Conv2d``, and the one way legofx pads an input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "padding_mode", "pad")


def conv_geometry(conv: nn.Conv2d) -> dict:
    """Sizes, stride, padding, dilation and padding mode of a ``Conv2d``.

    ``pad`` is the explicit ``(left, right, top, bottom)`` padding that ``Conv2d`` applies with
    ``F.pad`` for non-zero padding modes (asymmetric for ``padding='same'`` with even kernels).
    """
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation), "padding_mode": conv.padding_mode,
        "pad": tuple(conv._reversed_padding_repeated_twice),
    }


def padded(x: Tensor, geometry: dict, conv_pads: str = "any") -> tuple[Tensor, tuple | str | list]:
    """``x`` padded as the conv would pad it, and the padding left for the conv itself.

    ``conv_pads`` says which zero padding the conv that follows may still apply: ``"any"``
    (``F.conv2d``: its ``padding``, ``'same'`` included), ``"symmetric"`` (the same on both
    sides, as ``[top, left]``; the rest is padded here) or ``"none"`` (everything is padded
    here). Non-zero padding modes are always padded here.
    """
    mode = geometry["padding_mode"]
    left, right, top, bottom = geometry["pad"]
    if mode == "zeros":
        if conv_pads == "any":
            return x, geometry["padding"]
        if conv_pads == "symmetric" and left == right and top == bottom:
            return x, [top, left]
    none = [0, 0] if conv_pads == "symmetric" else 0
    if not any(geometry["pad"]):
        return x, none
    return F.pad(x, geometry["pad"], mode="constant" if mode == "zeros" else mode), none
