"""The driver shared by every method: trace, choose convs, swap in layers, inline; and fold."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

import passes
from legofx.arguments import Patterns, check_model
from legofx.layer_base import RewrittenLayer
from legofx.records import LayerRecord, skipped_record, store_records, stored_records
from legofx.tracing import overrides_forward, trace


@dataclass(frozen=True)
class Method:
    """One way of rewriting modules of some ``types`` (``nn.Conv2d`` unless said otherwise).

    ``reason_to_skip(module)`` gives the method's own reason a module is kept (or ``None``);
    ``build(module)`` returns the training-form :class:`RewrittenLayer`; ``record(name, layer,
    calls)`` describes a rewritten layer.
    """

    name: str
    reason_to_skip: Callable[[nn.Module], str | None]
    build: Callable[[nn.Module], RewrittenLayer]
    record: Callable[[str, RewrittenLayer, int], LayerRecord]
    types: tuple[type, ...] = (nn.Conv2d,)


def _has_hooks(module: nn.Module) -> bool:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks")
    return any(getattr(module, attr, None) for attr in hook_dicts)


def generic_reason_to_skip(use: passes.ModuleUse) -> str | None:
    """Why a conv cannot be rewritten whatever the method, or ``None``."""
    conv = use.module
    if not use.calls and not use.attribute_reads:
        return "never called by the traced forward (not in the graph)"
    if overrides_forward(conv):
        base = next(b.__name__ for b in type(conv).__mro__ if b.__module__.startswith("torch.nn"))
        return f"{type(conv).__name__} overrides nn.{base}'s forward, so its semantics are unknown"
    if use.attribute_reads:
        names = ", ".join(sorted({node.target for node in use.attribute_reads}))
        return (f"the graph reads its tensors directly ({names}), as in "
                "F.conv2d(x, self.conv.weight); only calls of the module can be rewritten")
    if isinstance(conv, LazyModuleMixin) and conv.has_uninitialized_params():
        return "uninitialised lazy conv: run one forward pass before transforming"
    if parametrize.is_parametrized(conv):
        return "its weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
    if _has_hooks(conv):
        return "it has hooks registered, which replacing the module would drop"
    if not conv.weight.is_floating_point():
        return f"weight dtype {conv.weight.dtype} is not floating point"
    return None


def rewrite(model: nn.Module, method: Method, include=None, exclude=None) -> fx.GraphModule:
    """A traced copy of ``model`` with every eligible module of ``method.types`` rewritten."""
    check_model(model)
    patterns = Patterns(include, exclude)
    gm = trace(model)
    kinds = method.types
    originals = {name: mod for name, mod in model.named_modules() if isinstance(mod, kinds)}
    names = list(originals) + [name for name, mod in gm.named_modules()
                               if isinstance(mod, kinds) and name not in originals]
    patterns.check_used(names, "/".join(kind.__name__ for kind in kinds))
    records: dict[str, LayerRecord] = {}
    layers: dict[str, RewrittenLayer] = {}
    for use in passes.module_uses(gm, names):
        if not isinstance(use.module, kinds):  # the trace kept no module (or a stub) here
            use.module = originals[use.name]
        reason = (patterns.reason_to_skip(use.name) or generic_reason_to_skip(use)
                  or method.reason_to_skip(use.module))
        calls = len(use.calls)
        if reason:
            records[use.name] = skipped_record(use.name, use.module, method.name, reason, calls)
        else:
            layers[use.name] = method.build(use.module)
            records[use.name] = method.record(use.name, layers[use.name], calls)
    passes.swap_modules(gm, layers)
    passes.inline_modules(gm, lambda name, module: name in layers)
    store_records(gm, _merge_records(gm, records))
    return gm


def _merge_records(gm: fx.GraphModule, new: dict[str, LayerRecord]) -> list[LayerRecord]:
    """Keep the rewritten layers of an earlier rewrite of ``gm``; its skipped convs were seen anew."""
    try:
        earlier = [record for record in stored_records(gm) if record.rewritten]
    except ValueError:
        earlier = []
    return earlier + list(new.values())


def _is_training_form(name: str, module: nn.Module) -> bool:
    return isinstance(module, RewrittenLayer) and module.form == "training"


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """The inference form of a transformed model; ``gm`` itself is not modified.

    Each training-form layer is replaced by its folded form (for LegoNet: the argmax of every
    proxy becomes a constant int64 index, the merge ``index_select`` + multiply + sum).
    Folding a folded model returns an equal copy.
    """
    stored_records(gm)  # refuses models legofx did not make
    gm = copy.deepcopy(gm)
    passes.collapse_regions(gm, _is_training_form)
    folded = {name: module.folded() for name, module in gm.named_modules()
              if _is_training_form(name, module)}
    passes.swap_modules(gm, folded)
    passes.inline_modules(gm, lambda name, module: name in folded)
    return gm
