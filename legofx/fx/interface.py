"""When may a traced graph replace a module's ``forward`` without changing how it is called?

A graph takes only the tensors it was traced with, positionally, and returns plain tuples,
lists and dicts. So a module's own ``forward`` is replaced by its graph (its calls inlined in
a parent's graph are not concerned) only when

- its parameters are plain positional ones, without defaults, ``*args``, ``**kwargs`` or
  keyword-only parameters: a trace would fix a default (``output_hidden_states=False``), drop
  keywords into ``**kwargs`` or rename them (:func:`signature_problem`); and
- what it returns keeps its type: a ``ModelOutput`` (an ``OrderedDict`` subclass) or a
  dataclass would come back as a plain ``dict`` (:class:`OutputTypes`, fed by the tracer).

Otherwise the module stays eager and its children are traced or rewritten one by one. A
module with hooks inside a traced graph stays a module call (its hooks must run). A
container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) called by eager code stays
eager as well: that code may iterate or index it instead of calling it.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from torch.utils import _pytree as pytree

from legofx.core.modes import kept_modes

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PLAIN = (tuple, list, dict)


HOOK_STORES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks, which run only when it is called as a
    module: a graph that traced through it would skip them."""
    return any(getattr(module, attr, None) for attr in HOOK_STORES)


def _describe(parameter: inspect.Parameter) -> str:
    if parameter.kind is parameter.VAR_POSITIONAL:
        return f"*{parameter.name}"
    if parameter.kind is parameter.VAR_KEYWORD:
        return f"**{parameter.name}"
    if parameter.default is parameter.empty:
        return f"keyword-only {parameter.name}"
    return f"{parameter.name}={parameter.default!r}"


def signature_problem(module: nn.Module) -> str | None:
    """Why the parameters of ``module.forward`` do not survive tracing, or ``None``."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    extra = [_describe(p) for p in signature.parameters.values()
             if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD,
                                                       p.KEYWORD_ONLY)]
    if not extra:
        return None
    shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
    return (f"its forward takes {shown}, which a traced graph would fix or drop: it runs "
            "eagerly and its children are rewritten one by one")


def lost_type(value) -> str | None:
    """The name of a container type that fx would turn into a plain tuple, list or dict
    (a ``ModelOutput``, an ``OrderedDict``...), or ``None``. Named tuples survive."""
    if isinstance(value, _PLAIN) and type(value) not in _PLAIN:
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return None
        return type(value).__name__
    return None


class OutputTypes:
    """Collects, for a tracer, the container types the traced output loses (see
    :func:`lost_type`): ``seen`` gathers what ``create_arg`` met since the last node; at the
    output node it becomes ``lost``."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.lost: list[str] = []

    def argument(self, value) -> None:
        kind = lost_type(value)
        if kind:
            self.seen.append(kind)

    def node(self, kind: str) -> None:
        if kind == "output":
            self.lost = list(self.seen)
        self.seen = []

    def problem(self) -> str | None:
        if not self.lost:
            return None
        return (f"it returns a {self.lost[0]}, which a traced graph would turn into a plain "
                "tuple, list or dict: it runs eagerly and its children are rewritten one by one")


class InterfaceError(ValueError):
    """The rewritten model does not answer a call the way the original does."""


def _describe_leaf(value) -> str:
    """What must match between two outputs: a tensor's dtype and shape, a dataclass's fields,
    another value's type."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_describe_leaf(getattr(value, f.name))}"
                           for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    return type(value).__name__


def _flatten(output) -> tuple[list[tuple[str, object]], object]:
    """``([(path, leaf)], spec)``: paths like ``['logits']`` or ``.hidden_states[2]`` where the
    output's types say how to name them, else positions (``[3]``)."""
    try:
        pairs, spec = pytree.tree_flatten_with_path(output)
        return [(pytree.keystr(path), leaf) for path, leaf in pairs], spec
    except ValueError:  # a node type registered without key names
        values, spec = pytree.tree_flatten(output)
        return [(f"[{index}]", leaf) for index, leaf in enumerate(values)], spec


def _differ(want, got, same_function: bool) -> bool:
    """Whether two output leaves differ in what must match; a dataclass (kornia's
    ``DISKFeatures``) is compared field by field under the same rules as tensors."""
    if (dataclasses.is_dataclass(want) and not isinstance(want, type) and type(want) is type(got)):
        return any(_differ(getattr(want, f.name), getattr(got, f.name), same_function)
                   for f in dataclasses.fields(want))
    if not same_function and isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) \
            and want.dim() == got.dim() > 0:  # the first dimension may be a value-dependent count
        return (want.dtype, want.shape[1:]) != (got.dtype, got.shape[1:])
    return _describe_leaf(want) != _describe_leaf(got)


def compare_calls(original: nn.Module, result: nn.Module, args: tuple, kwargs: dict,
                  same_function: bool = False) -> None:
    """Run both models once on ``args`` / ``kwargs`` (eval mode, no gradients, flags restored)
    and raise :class:`InterfaceError` naming the first difference of output structure (types
    included: a ``ModelOutput`` must stay one), shape or dtype.

    Values are not compared: a freshly rewritten layer computes another function until it is
    trained. So the first dimension of a tensor may differ unless ``same_function``: its size
    can depend on the values (a detector's number of boxes after its score threshold and NMS);
    every other dimension, the number of dimensions and the dtype must match."""
    outputs = []
    for name, model in (("the original model", original), ("the rewritten model", result)):
        try:
            with torch.no_grad(), kept_modes(model, training=False):
                outputs.append(model(*args, **kwargs))
        except Exception as err:
            raise InterfaceError(f"{name} failed on example_inputs: {type(err).__name__}: "
                                 f"{str(err)[:300]}") from err
    (expected, expected_spec), (actual, actual_spec) = (_flatten(out) for out in outputs)
    if expected_spec != actual_spec:
        raise InterfaceError(
            f"the rewritten model returns another structure than the original: "
            f"{type(outputs[1]).__name__} with {len(actual)} leaves instead of "
            f"{type(outputs[0]).__name__} with {len(expected)} "
            f"(original: {str(expected_spec)[:200]}; rewritten: {str(actual_spec)[:200]})")
    for (path, want), (_, got) in zip(expected, actual):
        if _differ(want, got, same_function):
            raise InterfaceError(f"output{path} is {_describe_leaf(got)} in the "
                                 f"rewritten model, {_describe_leaf(want)} in the original")
