"""Equivalence checks: the relative error over a whole output, with tolerances that say why."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from legofx.core.arguments import nested_tensors
from legofx.core.modes import kept_modes
from legofx.core.numerics import relative_error

# float64: the two sides sum the same products in another order; relative rounding is ~1e-16
# per operation, so 1e-12 leaves a margin of 10^4 for the accumulation.
TOL64 = 1e-12
# float32: rounding is ~6e-8 per operation; a deep random net sums thousands of products per
# output and amplifies errors layer after layer, so the whole output's relative error is
# bounded by 1e-5 (two orders of magnitude above what legofx's tests observe, ~1e-7).
TOL32 = 1e-5
# float16 / bfloat16: 10 and 7 mantissa bits; only loose agreement is meaningful.
TOL16 = 1e-2


def tolerance(dtype: torch.dtype) -> float:
    """The relative error :func:`assert_equivalent` accepts for outputs of ``dtype``."""
    if dtype == torch.float64:
        return TOL64
    return TOL32 if dtype == torch.float32 else TOL16


@torch.no_grad()
def assert_equivalent(a: Callable, b: Callable, inputs, tol: float | None = None) -> float:
    """Assert that ``a`` and ``b`` compute the same function on ``inputs``; return the error.

    ``inputs`` is a tensor or a tuple of arguments. Modules run in eval mode (their training
    flags are restored afterwards), without gradients. Every output tensor (outputs may be
    tensors or nested tuples / lists / dicts) must have the same shape and a relative error
    (:func:`relative_error`, ``b`` as the reference) of at most ``tol``, by default
    :func:`tolerance` of the output's dtype. Raises ``AssertionError`` naming the output, the
    error and the tolerance.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with kept_modes(a, b, training=False):
        outputs = [nested_tensors(f(*args)) for f in (a, b)]
    if len(outputs[0]) != len(outputs[1]) or not outputs[0]:
        raise AssertionError(f"outputs differ in structure: {len(outputs[0])} tensors vs "
                             f"{len(outputs[1])}")
    worst = 0.0
    for index, (actual, expected) in enumerate(zip(*outputs)):
        if actual.shape != expected.shape:
            raise AssertionError(f"output {index}: shape {tuple(actual.shape)} vs "
                                 f"{tuple(expected.shape)}")
        limit = tolerance(expected.dtype) if tol is None else tol
        error = relative_error(actual, expected)
        if not error <= limit:  # also fails for NaN
            raise AssertionError(f"output {index}: relative error {error:.3g} exceeds the "
                                 f"tolerance {limit:.3g} ({expected.dtype})")
        worst = max(worst, error)
    return worst


@torch.no_grad()
def randomize_lego(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Random selections, coefficients and biases in every training-form Lego layer of
    ``model`` (in place), so that tests do not rely on the balanced, unit-coefficient start."""
    from legofx.methods.lego.layers import LegoConv2d

    for layer in model.modules():
        if isinstance(layer, LegoConv2d):
            for tensor in (layer.proxy, layer.coef, layer.bias):
                if tensor is not None:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator,
                                             dtype=tensor.dtype).to(tensor.device))
