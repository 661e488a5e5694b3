"""Turn a user's model into a ``torch.fx.GraphModule`` that owns copies of all its state."""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn


class TraceError(RuntimeError):
    """``torch.fx`` could not trace the model."""


REWRITABLE_TYPES = (nn.Conv2d, nn.Linear)


def overrides_forward(module: nn.Module) -> bool:
    """Whether a ``Conv2d`` / ``Linear`` subclass computes something else than its base does."""
    for base in REWRITABLE_TYPES:
        if isinstance(module, base):
            kind = type(module)
            return any(getattr(kind, method) is not getattr(base, method)
                       for method in ("forward", "_conv_forward") if hasattr(base, method))
    return False


class PlainLeafTracer(fx.Tracer):
    """``fx.Tracer`` that also keeps subclasses of ``Conv2d`` / ``Linear`` as leaves when
    they compute what their base class does.

    The default tracer only keeps modules defined in ``torch.nn`` as leaves, so a trivial
    subclass (``class MyConv(nn.Conv2d): pass``) would be traced through into ``F.conv2d`` on
    its weight, and could not be rewritten.
    """

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, REWRITABLE_TYPES) and not overrides_forward(module):
            return True
        return super().is_leaf_module(module, qualified_name)


def copy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:  # deepcopy raises anything a __deepcopy__ or __reduce__ raises
        raise TypeError(
            f"cannot copy model {type(model).__name__} ({type(err).__name__}: {err}); legofx "
            "works on a copy so that your model is never modified"
        ) from err


def trace(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model``: the original, its parameters and its hooks stay untouched."""
    if isinstance(model, fx.GraphModule):
        return copy_model(model)
    owned = copy_model(model)
    try:
        graph = PlainLeafTracer().trace(owned)
        return fx.GraphModule(owned, graph, type(owned).__name__)
    except Exception as err:
        raise TraceError(
            f"torch.fx.symbolic_trace failed on {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
