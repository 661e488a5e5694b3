"""``fold``: the inference form of a transformed model.

Every training-form layer is replaced by the inference form ``strategy`` names (see
:mod:`legofx.lowering.auto` and the registry), in the graphs and at module level alike; then
the registered absorbers fold what follows a layer into it (BatchNorm with
``fuse_batchnorm=True``; a ReLU into a fused Lego layer), and the new layers are expanded into
graph nodes. Folding a folded model with ``strategy=None`` re-lowers nothing and returns an
equal copy; with a named strategy it is refused (the folded layers no longer hold what the
other lowerings are built from: fold the training-form model instead).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import nn

from legofx import passes
from legofx.core.arguments import as_args, as_kwargs, check_index_dtype
from legofx.core.layer import RewrittenLayer
from legofx.core.progress import progress
from legofx.core.records import add_to_recipe, stored_records
from legofx.fx.generated_weight import GeneratedWeight
from legofx.fx.rewrite import graph_modules
from legofx.fx.tracing import copy_model, unshare
from legofx.lowering import batchnorm  # noqa: F401  (registers its absorber)
from legofx.lowering.auto import (check_backend, check_strategy, choose_fastest_model, layer_inputs,
                                  lower, noted, whole_model_variants)
from legofx.lowering.registry import ABSORBERS


def _is_training_form(name: str, module: nn.Module) -> bool:
    return isinstance(module, RewrittenLayer) and module.form == "training"


def fold(gm: nn.Module, strategy: str | None = None, *, example_inputs=None, example_kwargs=None,
         index_dtype: torch.dtype | str = torch.int64, fuse_batchnorm: bool = False,
         backend: str = "eager", custom_ops: bool = False) -> nn.Module:
    """The inference form of a transformed model; ``gm`` itself is not modified.

    Args:
        strategy: how each layer computes: ``None`` is each layer's default lowering (Lego:
            ``"gather"``, Structured: ``"sum-pool"``); a name picks that lowering
            (``"accumulate"``, ``"merge-conv"``, ``"dense"``, ``"fused"``...; docs/api.md has
            the table); a dict picks one per layer name (the others take their default;
            ``legofx.restore`` replays a fold this way); ``"auto"`` times every lowering of each
            layer on its input from ``example_inputs`` (required) and keeps the fastest. ``summary`` and ``report`` show
            the lowering of every layer.
        example_inputs: a tensor or tuple of the model's positional arguments (for ``"auto"``;
            ``()`` for a model called with keywords only).
        example_kwargs: a dict of its keyword arguments (for ``"auto"``).
        index_dtype: the Lego gather index's dtype: ``torch.int64`` (default) or any integer
            dtype that holds ``o*m - 1``, or ``"smallest"`` (uint8 when ``o*m <= 256``).
        fuse_batchnorm: fold every eval-mode ``BatchNorm2d`` that directly follows a folded
            layer (its only user, in a traced graph) into that layer (exact up to rounding).
        backend: where ``"auto"`` times the lowerings: ``"eager"`` (default), or a registered
            backend (``"inductor"``, ``"onnxruntime"``, ``"onnxruntime-int8"`` (the int8 QDQ
            file of ``export(quantize="int8")``), ``"tensorrt"``) that compiles each
            candidate first, so the choice fits where the model will be deployed. The
            choice is then checked on the whole model there: every layer dense (the
            original's graph), each layer's fastest, and only the clear per-layer wins are
            timed in turn, and dense is kept unless another is 2% faster
            (:func:`legofx.lowering.auto.choose_fastest_model`); ``report`` shows the times.
        custom_ops: let ``"auto"`` pick ``"fused"`` as well (eager or inductor only).
    """
    if not isinstance(fuse_batchnorm, bool):
        raise TypeError(f"fuse_batchnorm must be True or False, got fuse_batchnorm={fuse_batchnorm!r}")
    check_backend(backend, strategy, custom_ops)
    stored_records(gm)  # refuses models legofx did not make
    if strategy == "auto" and example_inputs is None and not example_kwargs:
        raise ValueError("strategy='auto' times each layer on its real input: pass "
                         "example_inputs (a tensor or a tuple of the model's arguments) and/or "
                         "example_kwargs")
    if index_dtype != "smallest":
        check_index_dtype(index_dtype, 0)
    check_strategy(strategy, {})  # a registered name, whatever the model holds
    _check_foldable(gm, strategy)
    original, gm = gm, copy_model(gm, shared=_training_tensors(gm))
    for graph_module in graph_modules(gm):
        passes.collapse_regions(graph_module, _is_training_form)
    training = {name: module for name, module in gm.named_modules()
                if _is_training_form(name, module)}
    check_strategy(strategy, training)
    options = {"index_dtype": index_dtype}
    kwargs = as_kwargs(example_kwargs) if strategy == "auto" else {}
    args = as_args(() if example_inputs is None else example_inputs,
                   allow_empty=bool(kwargs)) if strategy == "auto" else ()
    inputs = layer_inputs(gm, training, args, kwargs) if strategy == "auto" else {}
    timed = (progress(training.items(), f"timing lowerings on {backend}", "layer")
             if strategy == "auto" and backend != "eager" else training.items())
    memo: dict = {}
    lowered = {name: lower(module, strategy.get(name) if isinstance(strategy, dict) else strategy,
                           inputs.get(name), options, backend, custom_ops, memo)
               for name, module in timed}
    folded = {name: layer for name, (layer, _) in lowered.items()}
    medians = {name: times for name, (_, times) in lowered.items() if times}
    variants = whole_model_variants(training, folded, medians, options)
    if variants and (backend == "eager" or not kwargs and all(isinstance(a, torch.Tensor) for a in args)):
        gm = _fastest_assembly(gm, variants, folded, args, backend, fuse_batchnorm, kwargs)
    else:
        gm = _assembled(gm, folded, fuse_batchnorm)
    unshare(gm, original)
    chosen = {name: getattr(gm.get_submodule(name), "lowering_name", None) for name in training}
    add_to_recipe(gm, "fold", {"strategy": {k: v for k, v in chosen.items() if v},
                               "index_dtype": str(index_dtype).replace("torch.", ""),
                               "fuse_batchnorm": fuse_batchnorm})
    return gm


def _fastest_assembly(gm: nn.Module, variants: dict[str, dict[str, nn.Module]],
                      folded: dict[str, nn.Module], args: tuple, backend: str,
                      fuse_batchnorm: bool, kwargs: dict) -> nn.Module:
    """A copy of ``gm`` assembled with each of ``variants`` (:func:`whole_model_variants`), the
    fastest on ``backend`` kept; its timed layers' lowerings say what the whole model took.
    Where the whole model cannot be timed there (it does not export...), the per-layer choice."""
    models = {key: _assembled(copy_model(gm, shared=_training_tensors(gm)), layers, fuse_batchnorm)
              for key, layers in variants.items()}
    try:
        best, medians = choose_fastest_model(models, args, backend, example_kwargs=kwargs)
        note = "whole model: " + ", ".join(f"{key} {ms:.3g} ms" for key, ms in medians.items())
    except Exception as why:  # noqa: BLE001 - e.g. the whole model does not export
        best, note = "per layer", f"whole model not timed ({type(why).__name__}: {why}"[:200] + ")"
    for name, layer in variants[best].items():
        if " [auto" in folded[name].lowering:  # timed, not a layer the example never reached
            noted(layer, folded[name], f"{note}; kept {best}")
    return models[best]


def _assembled(gm: nn.Module, folded: dict[str, nn.Module], fuse_batchnorm: bool) -> nn.Module:
    """``gm`` with ``folded`` (name -> inference-form layer) swapped in, the registered
    absorbers applied and the new layers expanded into graph nodes (in place)."""
    passes.swap_modules(gm, folded)
    enabled = {"fuse_batchnorm": fuse_batchnorm}
    for absorber in ABSORBERS:
        if absorber.option is None or enabled.get(absorber.option):
            _absorb_followers(gm, absorber.absorb)
    new = {id(layer) for layer in folded.values()}
    for graph_module in graph_modules(gm):
        passes.inline_modules(graph_module, lambda name, m: id(m) in new and m.inline)
    return gm


def _check_foldable(gm: nn.Module, strategy) -> None:
    """Refuse what ``fold`` cannot do well, before copying: re-lowering an already folded model,
    tensors without values (meta device); warn about a model in training mode."""
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, RewrittenLayer)}
    training = {name: m for name, m in layers.items() if m.form == "training"}
    if strategy is not None and layers and not training:
        kinds = sorted({m.lowering.split(" [")[0] for m in layers.values()})
        raise ValueError(f"strategy={strategy!r}: this model is already folded ({'; '.join(kinds)}), "
                         f"so there is nothing to lower: fold the training-form model (transform's "
                         f"result) with strategy={strategy!r}, or pass strategy=None for a copy")
    meta = [f"{name}.{key}" for name, layer in training.items()
            for key, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"fold reads each layer's learned selection, but the model's tensors are on "
                         f"the meta device (no values: {', '.join(meta[:3])}...): load real weights "
                         f"first (model.to_empty(device='cpu'), then load_state_dict)")
    if training and gm.training:
        warnings.warn("fold: the model is in training mode, and so is the folded model (BatchNorm "
                      "uses batch statistics, Dropout drops): call fold(gm.eval()) for the "
                      "inference form", UserWarning, stacklevel=3)


def _absorb_followers(model: nn.Module, absorb) -> None:
    """:func:`legofx.passes.absorb_followers` with ``absorb`` in every graph of ``model``, for
    layers that are not shared (registered once in the model)."""
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
