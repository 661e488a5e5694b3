"""The driver shared by every method: trace, choose layers, swap in new ones, inline; and fold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

import passes
from legofx.arguments import Patterns, as_input_tuple, check_index_dtype, check_model
from legofx.fuse_batchnorm import absorb_batchnorm
from legofx.generated_weight import GeneratedWeight, with_generated_weight
from legofx.layer_base import RewrittenLayer
from legofx.lego_fused import absorb_relu
from legofx.lowering import check_backend, check_strategy, layer_inputs, lower
from legofx.progress import progress
from legofx.records import LayerRecord, skipped_record, store_records, stored_records
from legofx.tracing import Scope, copy_model, overrides_forward, trace_tree, unshare


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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sites(root: Scope, kinds: tuple[type, ...], originals: dict[str, nn.Module]) -> dict[str, Site]:
    """Every layer of ``kinds`` in the scope tree (and every original one the graphs read)."""
    sites: dict[str, Site] = {}
    for scope in root.walk():
        if not scope.graph:
            for name, child in scope.module.named_children():
                if isinstance(child, kinds):
                    sites[_join(scope.name, name)] = Site("module", scope, name)
            continue
        leaves = tuple(leaf + "." for leaf in scope.leaves)
        names = [n for n, m in scope.module.named_modules()
                 if isinstance(m, kinds) and not n.startswith(leaves)]
        names += [n.target.rpartition(".")[0] for n in scope.module.graph.nodes if n.op == "get_attr"]
        where = "graph" if scope is root else "leaf"
        for use in passes.module_uses(scope.module, dict.fromkeys(names)):
            full = _join(scope.name, use.name)
            if not isinstance(use.module, kinds):  # a stub the trace kept for tensor reads
                if full not in originals:
                    continue
                use.module = originals[full]
            sites[full] = Site(where, scope, use.name, use)
    return sites


def _has_hooks(module: nn.Module) -> bool:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks")
    return any(getattr(module, attr, None) for attr in hook_dicts)


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
    if _has_hooks(module):
        return "it has hooks registered, which replacing the module would drop"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    return None


def _is_rewritten(name: str, module: nn.Module) -> bool:
    return isinstance(module, RewrittenLayer) and module.inline


def rewrite(model: nn.Module, method: Method, include=None, exclude=None) -> nn.Module:
    """A traced copy of ``model`` with every eligible module of ``method.types`` rewritten.

    Returns a ``GraphModule`` when the model's own ``forward`` traces, else the copied model
    with its traceable parts traced and the rest rewritten at module level.
    """
    check_model(model)
    patterns = Patterns(include, exclude)
    root = trace_tree(model)
    kinds = method.types
    originals = {name: mod for name, mod in model.named_modules() if isinstance(mod, kinds)}
    sites = _sites(root, kinds, originals)
    names = list(originals) + [name for name in sites if name not in originals]
    patterns.check_used(names, "/".join(kind.__name__ for kind in kinds))
    records: dict[str, LayerRecord] = {}
    swaps: dict[int, tuple[Scope, dict[str, RewrittenLayer]]] = {}
    for name in names:
        site = sites.get(name)
        module = originals[name] if site is None else (
            site.use.module if site.use else site.scope.module.get_submodule(site.name))
        reason = patterns.reason_to_skip(name) or (
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
    store_records(root.module, _merge_records(root.module, records), _untraced(root))
    return root.module


def _record(record: LayerRecord, layer: RewrittenLayer, where: str) -> LayerRecord:
    record.where, record.lowering = where, layer.lowering
    record.params_before, record.params_after = layer.params_before, layer.params_after
    if isinstance(layer, GeneratedWeight):
        record.theory_speedup = 1.0  # it runs the dense conv
    return record


def _untraced(root: Scope) -> dict[str, str]:
    """The modules whose ``forward`` runs eagerly, with the reason each could not be traced."""
    return {scope.name or "<root>": scope.reason for scope in root.walk() if not scope.graph}


def _merge_records(module: nn.Module, new: dict[str, LayerRecord]) -> list[LayerRecord]:
    """Keep the rewritten layers of an earlier rewrite; its skipped layers were seen anew."""
    try:
        earlier = [record for record in stored_records(module) if record.rewritten]
    except ValueError:
        earlier = []
    return earlier + list(new.values())


def _is_training_form(name: str, module: nn.Module) -> bool:
    return isinstance(module, RewrittenLayer) and module.form == "training"


def graph_modules(model: nn.Module) -> list[fx.GraphModule]:
    """The root (if traced) and every graph traced inside an untraceable module."""
    return [module for module in model.modules() if isinstance(module, fx.GraphModule)]


def fold(gm: nn.Module, strategy: str | None = None, *, example_inputs=None,
         index_dtype: torch.dtype | str = torch.int64, fuse_batchnorm: bool = False,
         backend: str = "eager", custom_ops: bool = False) -> nn.Module:
    """The inference form of a transformed model; ``gm`` itself is not modified.

    Each training-form layer is replaced by its folded form (for LegoNet: the argmax of every
    proxy becomes a constant index, the merge ``index_select`` + multiply + sum), in the
    graphs and at module level alike. Folding a folded model returns an equal copy.

    Args:
        strategy: how each layer computes (see :mod:`legofx.lowering`): ``None`` is each
            layer's default (Lego: ``"gather"``); ``"dense"`` (Lego) runs the reconstructed
            dense weight as one conv; ``"auto"`` times every lowering of each layer on its
            input from ``example_inputs`` (required) and keeps the fastest. ``"fused"`` (Lego;
            eager and torch.compile on CPU) runs the Lego conv and the merge as one operator
            with a C kernel (:mod:`legofx.lego_fused`), with the ReLU that follows a layer
            folded in: the fastest on CPU, not exportable to ONNX / TensorRT, never chosen by
            ``"auto"``.
            ``summary`` and ``report`` show the lowering of every layer.
        example_inputs: a tensor or tuple of tensors the model takes (for ``"auto"``).
        index_dtype: the Lego gather index's dtype: ``torch.int64`` (default) or any integer
            dtype that holds ``o*m - 1``, or ``"smallest"`` (uint8 when ``o*m <= 256``).
        fuse_batchnorm: fold every eval-mode ``BatchNorm2d`` that directly follows a folded
            layer (its only user, in a traced graph) into that layer's coefficients (Lego) or
            weight, and remove it (:mod:`legofx.fuse_batchnorm`); ``summary`` names it in the
            layer's lowering. Exact up to rounding; BatchNorms it cannot fold stay.
        backend: where ``"auto"`` times the lowerings: ``"eager"`` (default) runs them as
            they are; ``"inductor"``, ``"onnxruntime"`` or ``"tensorrt"`` compiles each
            candidate layer with :func:`legofx.compile` first, so the choice fits the backend
            the model will be deployed on (slower to fold: one compilation per layer and
            lowering). Layers are timed alone, so under a compiler the fusion of a merge with
            the BatchNorm and ReLU after it is not counted.
        custom_ops: let ``"auto"`` pick ``"fused"`` as well (on ``backend="eager"`` or
            ``"inductor"``; the model then runs in PyTorch only, not ONNX / TensorRT), every
            candidate timed on the channels-last input fused layers pass on: the fastest model
            on CPU in which no layer is slower than its dense conv.
    """
    if not isinstance(fuse_batchnorm, bool):
        raise TypeError(f"fuse_batchnorm must be True or False, got fuse_batchnorm={fuse_batchnorm!r}")
    check_backend(backend, strategy, custom_ops)
    stored_records(gm)  # refuses models legofx did not make
    if strategy == "auto" and example_inputs is None:
        raise ValueError("strategy='auto' times each layer on its real input: pass "
                         "example_inputs (a tensor or a tuple of tensors the model takes)")
    if index_dtype != "smallest":
        check_index_dtype(index_dtype, 0)
    original, gm = gm, copy_model(gm, shared=_training_tensors(gm))
    for graph_module in graph_modules(gm):
        passes.collapse_regions(graph_module, _is_training_form)
    training = {name: module for name, module in gm.named_modules()
                if _is_training_form(name, module)}
    options = {"index_dtype": index_dtype}
    check_strategy(strategy, training, options)
    inputs = ({} if strategy != "auto"
              else layer_inputs(gm, training, as_input_tuple(example_inputs)))
    timed = (progress(training.items(), f"timing lowerings on {backend}", "layer")
             if strategy == "auto" and backend != "eager" else training.items())
    folded = {name: lower(module, strategy, inputs.get(name), options, backend, custom_ops)
              for name, module in timed}
    passes.swap_modules(gm, folded)
    if fuse_batchnorm:
        _absorb_followers(gm, absorb_batchnorm)
    _absorb_followers(gm, absorb_relu)  # only fused layers take a ReLU in
    new = {id(layer) for layer in folded.values()}
    for graph_module in graph_modules(gm):
        passes.inline_modules(graph_module, lambda name, m: id(m) in new and m.inline)
    unshare(gm, original)
    return gm


def _absorb_followers(model: nn.Module, absorb) -> None:
    """:func:`passes.absorb_followers` with ``absorb`` (``absorb_batchnorm``, ``absorb_relu``)
    in every graph of ``model``, for layers that are not shared (registered once in the model)."""
    counts: dict[int, int] = {}
    for module in model.modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    for prefix, graph_module in model.named_modules():
        if isinstance(graph_module, fx.GraphModule):
            scope = f"{prefix}." if prefix else ""
            passes.absorb_followers(graph_module, lambda a, layer, b, bn: (
                counts[id(layer)] == 1 and absorb(scope + a, layer, scope + b, bn)))


def _training_tensors(model: nn.Module) -> list:
    """The tensors of training-form layers, which ``fold`` replaces: not worth copying."""
    return [t for m in model.modules()
            if _is_training_form("", m) and not isinstance(m, GeneratedWeight)
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
