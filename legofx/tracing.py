"""Turn a user's model into a ``torch.fx.GraphModule`` that owns copies of all its state."""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn


class TraceError(RuntimeError):
    """``torch.fx`` could not trace the model."""


class ConvLeafTracer(fx.Tracer):
    """``fx.Tracer`` that also keeps ``Conv2d`` subclasses with ``Conv2d``'s math as leaves.

    The default tracer only keeps modules defined in ``torch.nn`` as leaves, so a trivial
    subclass (``class MyConv(nn.Conv2d): pass``) would be traced through into ``F.conv2d`` on
    its weight, and could not be rewritten.
    """

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, nn.Conv2d) and not overrides_conv_forward(module):
            return True
        return super().is_leaf_module(module, qualified_name)


def overrides_conv_forward(module: nn.Module) -> bool:
    """Whether a ``Conv2d`` subclass computes something else than ``nn.Conv2d`` does."""
    kind = type(module)
    return kind.forward is not nn.Conv2d.forward or kind._conv_forward is not nn.Conv2d._conv_forward


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
        graph = ConvLeafTracer().trace(owned)
        return fx.GraphModule(owned, graph, type(owned).__name__)
    except Exception as err:
        raise TraceError(
            f"torch.fx.symbolic_trace failed on {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
