"""Choosing each layer's inference form when folding: ``fold(gm, strategy=...)``.

A training-form layer offers the lowerings registered for its type
(:mod:`legofx.lowering.registry`, the default first). ``strategy=None`` takes each layer's
default; a name takes that lowering wherever a layer offers it; ``"auto"`` builds every
lowering of a layer and keeps the one that runs fastest on the input the layer actually
receives from ``example_inputs``, on this machine, in eager mode or prepared for the backend
the model will run on (``backend=``, a registered backend), among the lowerings every backend
takes; with ``custom_ops=True`` (eager or inductor only) the by-name-only lowerings
(``"fused"``, a legofx custom op) are candidates too, and every candidate is timed on the
channels-last input the fused layers pass on.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

from legofx.core.layer import RewrittenLayer
from legofx.core.modes import kept_modes
from legofx.core.timing import Decision, decide, interleaved_times
from legofx.lowering.registry import BACKENDS, LoweringUnavailable, known_lowerings, lowerings

CUSTOM_OP_BACKENDS = ("eager", "inductor")
# Whole-model check: a variant other than every layer dense is kept only when its median is
# below this fraction of the dense model's (and outside its spread). Closer than 2% is within
# the timing noise of interleaved medians here, and the dense model is the original's own graph.
KEEP_BELOW = 0.98
# A layer's lowerings whose medians are closer than this fraction (or inside each other's
# interquartile range) cannot be told apart: timed again, then a tie (:func:`decide`).
LAYER_MARGIN = 0.03
# A layer's choice counts as a clear win when it took at most this fraction of the layer's
# dense time alone: a layer timed alone does not pay what it costs in context (ONNX Runtime
# reorders NCHWc blocks around non-conv ops and fuses Conv+BatchNorm+activation only for convs).
CLEAR_WIN = 0.8


def check_backend(backend, strategy, custom_ops: bool = False) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got backend={backend!r}")
    if backend != "eager" and strategy != "auto":
        raise ValueError(f"backend={backend!r} says where strategy='auto' times the lowerings; "
                         f"with strategy={strategy!r} nothing is timed: drop backend or use 'auto'")
    if not isinstance(custom_ops, bool):
        raise TypeError(f"custom_ops must be True or False, got custom_ops={custom_ops!r}")
    if custom_ops and strategy != "auto":
        raise ValueError(f"custom_ops=True lets strategy='auto' pick 'fused'; with "
                         f"strategy={strategy!r} nothing is chosen: use 'auto', or drop custom_ops")
    if custom_ops and backend not in CUSTOM_OP_BACKENDS:
        raise ValueError(f"custom_ops=True: backend={backend!r} does not take the legofx custom op "
                         f"of 'fused'; use backend='eager' or 'inductor', or drop custom_ops")


def choose_fastest(candidates: dict[str, nn.Module], x: Tensor, rounds: int = 7,
                   backend: str = "eager", timer=None) -> Decision:
    """The candidate that runs ``x`` fastest on ``backend``, by medians of interleaved timings
    (``timer``, default :func:`legofx.core.timing.interleaved_times`), re-timed while undecided
    and, when the candidates stay within :data:`LAYER_MARGIN` or each other's spread, a tie
    resolved by their order in ``candidates`` (the registry's: the layer's default first)."""
    timer = timer or interleaved_times
    with kept_modes(*candidates.values(), training=False):
        runnable = {key: BACKENDS[backend](layer, x) for key, layer in candidates.items()}
        warmup = 2 if backend != "eager" else 1
        return decide(lambda n: timer(runnable, x, rounds=n, warmup=warmup), list(candidates),
                      rounds, margin=LAYER_MARGIN)


def check_strategy(strategy, layers: dict[str, RewrittenLayer]) -> None:
    """Refuse a strategy that is not a string, or that no layer offers (the error lists those
    that exist; a model without training-form layers takes any registered name); ``None`` and
    ``"auto"`` always pass."""
    if strategy is None or strategy == "auto":
        return
    offered = {name for layer in layers.values() for name in lowerings(layer)} or known_lowerings()
    if isinstance(strategy, dict):  # one lowering per layer name
        for name, lowering in strategy.items():
            if not isinstance(name, str) or (layers and name not in layers):
                raise ValueError(f"strategy: {name!r} is not a training-form layer of the model "
                                 f"(layers: {', '.join(sorted(layers)[:5])}...)")
            if not isinstance(lowering, str) or lowering not in offered:
                raise ValueError(f"strategy[{name!r}] must be a lowering of the model's layers "
                                 f"({', '.join(sorted(offered))}), got {lowering!r}")
        return
    if not isinstance(strategy, str) or strategy not in offered:
        listed = ", ".join(sorted(offered))
        raise ValueError(f"strategy must be None, 'auto', a lowering of the model's layers or a "
                         f"dict of layer name -> lowering "
                         f"({listed}), got strategy={strategy!r}")


def timing_key(layer: RewrittenLayer, example: Tensor, *settings) -> tuple:
    """What a layer's timings depend on: its type and geometry (``extra_repr``), dtype and
    device, the input's shape, dtype and strides, and ``settings``; not its values."""
    tensor = next(layer.parameters(), example)
    return (type(layer), layer.extra_repr(), tensor.dtype, tensor.device, tuple(example.shape),
            example.dtype, example.stride(), *settings)


def lower(layer: RewrittenLayer, strategy: str | None, example: Tensor | None,
          options: dict, backend: str = "eager", custom_ops: bool = False,
          timed: dict | None = None) -> tuple[RewrittenLayer, dict | None]:
    """The inference form of one training-form ``layer`` under ``strategy``, and for
    ``"auto"`` the median ms of each candidate (``None`` where nothing was timed).

    A named lowering the layer does not offer falls back to its default; ``"auto"`` without
    an example input for the layer (never called on ``example_inputs``) does too. ``timed``
    (a dict shared by the layers of one ``fold``) keeps ``"auto"``'s timings by
    :func:`timing_key`, so that a layer like one already timed takes the same lowering
    without being timed again (a ResNet's repeated blocks).
    """
    offered = lowerings(layer)
    default = next(iter(offered.values()))
    if strategy != "auto":
        return offered.get(strategy, default).build(layer, **options), None
    if custom_ops and example is not None and example.dim() == 4:
        example = example.contiguous(memory_format=torch.channels_last)
    offered = {name: lowering for name, lowering in offered.items()
               if custom_ops or not lowering.by_name_only}
    if example is None or len(offered) == 1:
        return default.build(layer, **options), None
    key = timing_key(layer, example, backend, custom_ops, tuple(sorted(options.items(), key=str)))
    if timed is not None and key in timed:
        best, medians, note = timed[key]
        chosen = offered[best].build(layer, **options)
        chosen.lowering = f"{chosen.lowering} [auto{note}, as timed for a layer of the same shape]"
        return chosen, medians
    candidates, dropped = {}, {}
    for name, lowering in offered.items():
        try:
            candidates[name] = lowering.build(layer, **options)
        except LoweringUnavailable as why:  # e.g. the fused kernel cannot be built here
            if name == default.name:
                raise
            dropped[name] = str(why).splitlines()[0]
    decision = choose_fastest(candidates, example, backend=backend)
    best, medians = decision.best, decision.medians
    chosen = candidates[best]
    timings = ", ".join(f"{name} {ms:.3g} ms" for name, ms in medians.items())
    timings += f"; {decision.note()}" if decision.tie else ""
    timings += "".join(f"; {name} dropped: {why}" for name, why in dropped.items())
    where = "" if backend == "eager" else f" on {backend}"
    chosen.lowering = f"{chosen.lowering} [auto{where}: {timings}]"
    if timed is not None:
        timed[key] = (best, medians, f"{where}: {timings}")
    return chosen, medians


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], example_inputs: tuple,
                 example_kwargs: dict | None = None) -> dict:
    """The input each of ``layers`` (name -> module of ``model``) gets first when ``model``
    runs ``example_inputs`` in eval mode (training flags are restored afterwards)."""
    seen: dict[str, Tensor] = {}

    def keep_first(name: str, args: tuple) -> None:  # None: a pre-hook's result replaces the input
        seen.setdefault(name, args[0].detach())

    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: keep_first(name, args))
             for name, module in layers.items()]
    try:
        with kept_modes(model, training=False):
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def whole_model_variants(layers: dict[str, RewrittenLayer], chosen: dict[str, RewrittenLayer],
                         medians: dict[str, dict], options: dict) -> dict[str, dict[str, RewrittenLayer]]:
    """What ``"auto"`` compares on the whole model, each a lowering per layer name: ``dense``
    (every timed layer dense: the original's graph), ``per layer`` (each timed layer's fastest
    alone) and ``clear wins`` (those only where they took at most :data:`CLEAR_WIN` of the
    layer's dense time, dense elsewhere). Layers that were not timed keep their lowering.
    ``medians``: name -> each candidate's median ms, for the timed layers (:func:`lower`).
    Variants equal to an earlier one are left out; ``{}`` when there is nothing to compare.
    A layer's fastest is the lowering its build took (a tie resolved as :func:`lower` did)."""
    timed = {name: times for name, times in medians.items() if "dense" in times}
    fastest = {name: getattr(chosen[name], "lowering_name", None) or min(times, key=times.get)
               for name, times in timed.items()}
    per_layer = {name for name, best in fastest.items() if best != "dense"}
    wins = {name for name in per_layer if timed[name][fastest[name]] <= CLEAR_WIN * timed[name]["dense"]}
    unique: dict[str, set] = {}
    for key, kept in {"dense": set(), "per layer": per_layer, "clear wins": wins}.items():
        if kept not in unique.values():
            unique[key] = kept
    if len(unique) == 1:  # every timed layer was fastest dense alone
        return {}
    return {key: {name: (lowerings(layers[name])["dense"].build(layers[name], **options)
                         if name in timed and name not in kept else copy.deepcopy(layer))
                  for name, layer in chosen.items()}
            for key, kept in unique.items()}


def noted(layer: RewrittenLayer, timed: RewrittenLayer, note: str) -> None:
    """Set ``layer``'s lowering to its own name with ``timed``'s per-layer ``[auto ...]``
    timings and ``note`` (what the whole-model check measured and kept) inside the brackets."""
    timings = timed.lowering.partition(" [auto")[2].removesuffix("]")
    layer.lowering = f"{layer.lowering.partition(' [auto')[0]} [auto{timings}; {note}]"


def choose_fastest_model(models: dict[str, nn.Module], example_inputs: tuple, backend: str,
                         rounds: int = 9, example_kwargs: dict | None = None) -> tuple[str, dict]:
    """The key of the fastest of ``models`` (the whole model under each variant of
    :func:`whole_model_variants`) on ``backend``, by interleaved medians, re-timed while
    undecided (:func:`legofx.core.timing.decide`); ``dense`` unless another is below
    :data:`KEEP_BELOW` of its time and outside its spread. Returns the key and the medians in
    ms; after a tie, the kept key's entry reads ``"KEY (tie: kept)"``, so a report shows it."""
    with kept_modes(*models.values(), training=False):
        runnable = {key: BACKENDS[backend](model, example_inputs) for key, model in models.items()}
        if example_kwargs:  # eager only (fold times compiled whole models on tensor inputs)
            runnable = {key: functools.partial(run, **example_kwargs) for key, run in runnable.items()}
        warmup = 2 if backend != "eager" else 1
        decision = decide(lambda n: interleaved_times(runnable, *example_inputs, rounds=n, warmup=warmup),
                          ["dense", *models], rounds, margin=1 - KEEP_BELOW)
    medians = {(f"{key} (tie after {decision.rounds} rounds: kept)" if decision.tie and key == decision.best
                else key): ms for key, ms in decision.medians.items()}
    return decision.best, medians
