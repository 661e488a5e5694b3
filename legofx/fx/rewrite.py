"""The driver shared by every method: trace, choose layers, swap in new ones, inline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from legofx import passes
from legofx.core.arguments import Patterns, check_model, example_call
from legofx.core.layer import RewrittenLayer
from legofx.core.records import (LayerRecord, recipe_to_config, skipped_record, store_records,
                                 stored_recipe, stored_records)
from legofx.fx.generated_weight import GeneratedWeight, with_generated_weight
from legofx.fx.interface import compare_calls, has_hooks
from legofx.fx.tracing import Scope, overrides_forward, qualified_name, trace_tree, unshare


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


@dataclass
class Site:
    """Where a layer lives: called by a graph (``use`` says how) or by eager code.

    ``where`` is ``"graph"`` (the root's graph), ``"leaf"`` (a graph traced inside a module
    that could not be traced as a whole) or ``"module"`` (a child of such a module, replaced at
    module level); ``name`` is relative to ``scope.module``.
    """

    where: str
    scope: Scope
    name: str
    use: passes.ModuleUse | None = None


def _sites(root: Scope, kinds: tuple[type, ...], originals: dict[str, nn.Module]) -> dict[str, Site]:
    """Every layer of ``kinds`` in the scope tree (and every original one the graphs read)."""
    sites: dict[str, Site] = {}
    for scope in root.walk():
        if not scope.graph:
            for name, child in scope.module.named_children():
                if isinstance(child, kinds):
                    sites[qualified_name(scope.name, name)] = Site("module", scope, name)
            continue
        leaves = tuple(leaf + "." for leaf in scope.leaves)
        names = [n for n, m in scope.module.named_modules()
                 if isinstance(m, kinds) and not n.startswith(leaves)]
        names += [n.target.rpartition(".")[0] for n in scope.module.graph.nodes if n.op == "get_attr"]
        where = "graph" if scope is root else "leaf"
        for use in passes.module_uses(scope.module, dict.fromkeys(names)):
            full = qualified_name(scope.name, use.name)
            if not isinstance(use.module, kinds):  # a stub the trace kept for tensor reads
                if full not in originals:
                    continue
                use.module = originals[full]
            sites[full] = Site(where, scope, use.name, use)
    return sites


def generic_reason_to_skip(module: nn.Module, use: passes.ModuleUse | None) -> str | None:
    """Why a layer cannot be rewritten whatever the method, or ``None``.

    ``use`` is how a graph uses the layer; ``None`` for a layer called by eager code.
    """
    if use is not None and not use.calls and not use.attribute_reads:
        return "never called by the traced forward (not in the graph)"
    if use is not None and use.attribute_reads:
        names = ", ".join(sorted({node.target for node in use.attribute_reads}))
        return (f"the graph reads its tensors directly ({names}), as in "
                "F.conv2d(x, self.conv.weight); only calls of the module can be rewritten")
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialised lazy module: run one forward pass before transforming"
    if parametrize.is_parametrized(module):
        return "its weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
    if has_hooks(module):
        return "it has hooks registered, which replacing the module would drop"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    if not module.weight.requires_grad:
        return ("its weight does not require grad (a fixed or frozen layer, such as "
                "ultralytics' DFL conv): a rewritten layer would be trained; set "
                "requires_grad_(True) first to rewrite it")
    return None


def _is_rewritten(name: str, module: nn.Module) -> bool:
    return isinstance(module, RewrittenLayer) and module.inline


def rewrite(model: nn.Module, method: Method, include=None, exclude=None,
            example_inputs=None, example_kwargs=None, call: dict | None = None) -> nn.Module:
    """A traced copy of ``model`` with every eligible module of ``method.types`` rewritten.

    Returns a :class:`~legofx.fx.traced_module.TracedModule` when the model's own ``forward``
    traces and its interface survives tracing, else the copied model (its own class) with its
    traceable parts traced and the rest rewritten at module level. With ``example_inputs``
    (and/or ``example_kwargs``) both models run once and must answer with the same output
    structure, shapes and dtypes (:func:`~legofx.fx.interface.compare_calls`). ``call``
    (``{"call": name, "options": {...}}``) is appended to the model's recipe
    (:func:`~legofx.core.records.stored_recipe`), and to a transformers-style ``config``'s
    ``legofx`` attribute, so that ``save_pretrained`` writes it to ``config.json``.
    """
    check_model(model)
    patterns = Patterns(include, exclude)
    example = example_call(example_inputs, example_kwargs)
    root = trace_tree(model, example)
    kinds = method.types
    originals = {name: mod for name, mod in model.named_modules() if isinstance(mod, kinds)}
    sites = _sites(root, kinds, originals)
    names = list(originals) + [name for name in sites if name not in originals]
    patterns.check_used(names, "/".join(kind.__name__ for kind in kinds))
    tied = _tied_weights(originals)
    records: dict[str, LayerRecord] = {}
    swaps: dict[int, tuple[Scope, dict[str, RewrittenLayer]]] = {}
    for name in names:
        site = sites.get(name)
        module = originals[name] if site is None else (
            site.use.module if site.use else site.scope.module.get_submodule(site.name))
        reason = patterns.reason_to_skip(name) or tied.get(name) or (
            "never called by the traced forward (not in the graph)" if site is None
            else generic_reason_to_skip(module, site.use) or method.reason_to_skip(module))
        calls = len(site.use.calls) if site and site.use else 0
        if reason:
            records[name] = skipped_record(name, module, method.name, reason, calls)
            continue
        layer = generator = method.build(module)
        if overrides_forward(module):  # keep its forward, generate its weight
            layer = with_generated_weight(module, generator)
        swaps.setdefault(id(site.scope), (site.scope, {}))[1][site.name] = layer
        records[name] = _record(method.record(name, generator, calls), layer, site.where)
    for scope, layers in swaps.values():
        passes.swap_modules(scope.module, layers)
    for scope in root.walk():
        if scope.graph:
            passes.inline_modules(scope.module, _is_rewritten)
    unshare(root.module, model)
    recipe = _earlier_recipe(model) + ([call] if call else [])
    store_records(root.module, _merge_records(root.module, records), _untraced(root), recipe,
                  root.unchecked)
    recipe_to_config(root.module)
    if example is not None:
        compare_calls(model, root.module, *example)
    return root.module


def _tied_weights(modules: dict[str, nn.Module]) -> dict[str, str]:
    """The reason to keep each module whose weight ``Parameter`` another one shares (tied
    weights): rewriting them apart would untie them."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    return {name: "weight shared with " + ", ".join(other for other in names if other != name)
            + " (tied weights): rewriting them apart would untie them"
            for names in owners.values() if len(names) > 1 for name in names}


def _record(record: LayerRecord, layer: RewrittenLayer, where: str) -> LayerRecord:
    record.where, record.lowering = where, layer.lowering
    record.params_before, record.params_after = layer.params_before, layer.params_after
    if isinstance(layer, GeneratedWeight):
        record.theory_speedup = 1.0  # it runs the dense conv
    return record


def _untraced(root: Scope) -> dict[str, str]:
    """The modules whose ``forward`` runs eagerly, with the reason each could not be traced."""
    return {scope.name or "<root>": scope.reason for scope in root.walk() if not scope.graph}


def _earlier_recipe(model: nn.Module) -> list[dict]:
    try:
        return stored_recipe(model)
    except ValueError:  # not made by legofx
        return []


def _merge_records(module: nn.Module, new: dict[str, LayerRecord]) -> list[LayerRecord]:
    """Keep the rewritten layers of an earlier rewrite; its skipped layers were seen anew."""
    try:
        earlier = [record for record in stored_records(module) if record.rewritten]
    except ValueError:
        earlier = []
    return earlier + list(new.values())


def graph_modules(model: nn.Module) -> list[fx.GraphModule]:
    """The root (if traced) and every graph traced inside an untraceable module."""
    return [module for module in model.modules() if isinstance(module, fx.GraphModule)]
