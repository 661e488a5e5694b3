"""Checks every deploy path makes: the model is in inference form (and uses standard ops where
the target needs them), and what was produced computes what the PyTorch model computes."""

from __future__ import annotations

import torch
from torch import nn

from legofx.core.layer import RewrittenLayer
from legofx.deploy.structure import tensor_leaves

# Largest accepted error, as max|deployed - eager| / max|eager| over each output. The two sides
# compute the same function with other kernels (conv algorithms, fused BN, other summation
# orders), so they differ by rounding, which grows with the accumulation length and depth but
# stays a small multiple of the format's unit roundoff u; a real defect (a wrong index or
# coefficient, a dropped layer) gives errors of order 1.
#   float64: u = 1.1e-16;  1e-9 is far above any rounding.
#   float32: u = 6.0e-8;   observed ~3e-7 (resnet18, ONNX Runtime CPU); 1e-4 leaves 300x.
#   float16: u = 4.9e-4;   observed ~5e-4 (resnet18: both sides round every layer's output to
#                          fp16, in different places); 1e-2 is 20x that and ~20 u.
#   bfloat16: u = 3.9e-3;  5e-2 (~13 u), by the same reasoning (not exercised by ONNX).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
              torch.bfloat16: 5e-2}


class MismatchError(RuntimeError):
    """The deployed model does not compute what the eager model computes."""


def require_inference_form(model: nn.Module) -> None:
    """Refuse training-form legofx layers and training mode."""
    training = [name or "<root>" for name, m in model.named_modules()
                if isinstance(m, RewrittenLayer) and m.form == "training"]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise ValueError(f"the model has training-form legofx layers ({shown}): call "
                         "legofx.fold(model.eval()) first and deploy the folded model")
    if any(m.training for m in model.modules()):
        raise ValueError("the model is in training mode: call model.eval() first")


def require_standard_ops(model: nn.Module, where: str) -> None:
    """Refuse layers lowered with a legofx custom op (``"fused"``) for ONNX / TensorRT."""
    custom = [name for name, m in model.named_modules()
              if isinstance(m, RewrittenLayer) and not m.standard_ops]
    if custom:
        shown = ", ".join(custom[:5]) + (f" and {len(custom) - 5} more" if len(custom) > 5 else "")
        raise ValueError(f"{where} does not take the legofx custom op of the fused lowering "
                         f"({shown}): fold with strategy gather, accumulate, merge-conv, dense "
                         f"or auto for it, and run fused models in PyTorch or torch.compile")


def model_dtype(model: nn.Module, inputs: tuple[torch.Tensor, ...] = ()) -> torch.dtype:
    """The floating-point dtype the model computes in (its first floating tensor's)."""
    for tensor in [*model.parameters(), *model.buffers(), *inputs]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def output_error(actual, expected) -> tuple[float, float]:
    """(max|a - e| / max|e|, max|a - e|): the worst over all output tensors, in float64.

    Boolean and integer outputs count the fraction of their elements that differ (and the
    number of them) instead: a value within rounding of a threshold may flip, so they are held
    to the same tolerance as the float outputs, as a fraction of their elements.

    Both may be any pytree (a tensor, tuples, lists, dicts, dataclasses, ``ModelOutput``) or
    a flat list of tensors (what ONNX Runtime returns); their tensors are compared in pytree
    order, and a mismatch names the expected leaf by its path (``out.hidden_states[2]``).
    """
    actual = [t for _, t in tensor_leaves(actual)]
    expected = tensor_leaves(expected)
    if len(actual) != len(expected):
        shown = ", ".join(name for name, _ in expected[:6]) + (", ..." if len(expected) > 6 else "")
        raise MismatchError(f"{len(actual)} output tensors, expected {len(expected)} ({shown})")
    relative = absolute = 0.0
    for a, (name, e) in zip(actual, expected):
        if a.shape != e.shape or a.dtype != e.dtype:
            raise MismatchError(f"output {name}: {a.dtype} {tuple(a.shape)}, expected {e.dtype} "
                                f"{tuple(e.shape)}")
        if e.dtype == torch.bool or not (e.is_floating_point() or e.is_complex()):
            # a threshold of float values (SAM's masks = logits > 0) flips where a value sits
            # within rounding of it: count the elements that differ, as a fraction
            differing = (a.cpu() != e.cpu()).sum().item() if e.numel() else 0
            relative = max(relative, differing / e.numel() if e.numel() else 0.0)
            absolute = max(absolute, float(differing))
            continue
        leaf_relative, diff = max_error(a, e)
        absolute, relative = max(absolute, diff), max(relative, leaf_relative)
    return relative, absolute


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max|a - e| / max|e|, max|a - e|) of one pair of floating tensors, in float64.

    Differences in the subnormal range of ``expected``'s dtype (below ``finfo.tiny``, 1.2e-38
    for float32) count as zero: kernels differ in how they treat subnormals (some flush them to
    zero, others keep them, with fewer significant bits), so an output of random weights that
    has decayed to ~1e-40 would otherwise be an error of order 1. Where ``expected`` is all
    zeros or subnormal, the relative error is the absolute one. Empty tensors: (0, 0).
    """
    tiny = torch.finfo(expected.dtype).tiny if expected.is_floating_point() else 0.0
    expected = expected.detach().cpu().double()
    if not expected.numel():
        return 0.0, 0.0
    diff = (actual.detach().cpu().double() - expected).abs().max().item()
    if diff < tiny:
        return 0.0, diff
    scale = expected.abs().max().item()
    return (diff / scale if scale >= tiny else diff), diff


@torch.no_grad()
def check_outputs(deployed, model: nn.Module, batches: list[tuple[tuple, dict]], dtype: torch.dtype,
                  what: str) -> tuple[float, float, float]:
    """Run ``deployed`` and ``model`` on each ``(args, kwargs)`` of ``batches``; raise
    :class:`MismatchError` beyond :data:`TOLERANCES`. Returns (error, abs error, tolerance)."""
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    worst = (0.0, 0.0)
    for args, kwargs in batches:
        worst = max(worst, output_error(deployed(*args, **kwargs), model(*args, **kwargs)))
    if worst[0] > tolerance:
        raise MismatchError(f"{what} differs from the PyTorch model: max error {worst[0]:.3e} of "
                            f"the output scale (abs {worst[1]:.3e}; for boolean / integer "
                            f"outputs: the fraction of elements that differ) > tolerance "
                            f"{tolerance:g} for {dtype}")
    return worst[0], worst[1], tolerance
