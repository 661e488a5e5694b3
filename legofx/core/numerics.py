"""How legofx compares two computations of the same function."""

from __future__ import annotations

from torch import Tensor


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 over the whole tensor (the absolute
    error when ``expected`` is all zeros)."""
    expected = expected.detach().double()
    difference = (actual.detach().double() - expected).norm()
    denominator = expected.norm()
    return (difference if denominator == 0 else difference / denominator).item()
