"""Choosing each layer's inference form when folding: ``fold(gm, strategy=...)``.

A training-form layer offers its lowerings (``RewrittenLayer.lowerings``: name -> builder,
the default first). ``strategy=None`` takes each layer's default; a name takes that lowering
wherever a layer offers it; ``"auto"`` builds every lowering of a layer and keeps the one
that runs fastest, in eager mode on this machine, on the input the layer actually receives
from ``example_inputs``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from legofx.layer_base import RewrittenLayer
from legofx.timing import interleaved_times, median_ms


def choose_fastest(candidates: dict[str, nn.Module], x: Tensor, rounds: int = 7) -> tuple[str, dict]:
    """The candidate that runs ``x`` fastest by median of interleaved timings
    (:func:`legofx.timing.interleaved_times`); returns its key and the medians in ms."""
    times = interleaved_times(candidates, x, rounds=rounds)
    medians = {key: median_ms(samples) for key, samples in times.items()}
    return min(medians, key=medians.get), medians


def check_strategy(strategy, layers: dict[str, RewrittenLayer], options: dict) -> None:
    """Refuse a strategy no layer offers (the error lists those that exist)."""
    if strategy is None or strategy == "auto" or not layers:
        return
    offered = {name for layer in layers.values() for name in layer.lowerings(**options)}
    if not isinstance(strategy, str) or strategy not in offered:
        raise ValueError(f"strategy must be None, 'auto' or a lowering of the model's layers "
                         f"({', '.join(sorted(offered))}), got strategy={strategy!r}")


def lower(layer: RewrittenLayer, strategy: str | None, example: Tensor | None,
          options: dict) -> RewrittenLayer:
    """The inference form of one training-form ``layer`` under ``strategy``.

    A named lowering the layer does not offer falls back to its default; ``"auto"`` without
    an example input for the layer (never called on ``example_inputs``) does too.
    """
    builders = layer.lowerings(**options)
    default = next(iter(builders.values()))
    if strategy != "auto":
        return builders.get(strategy, default)()
    if example is None or len(builders) == 1:
        return default()
    candidates = {name: build() for name, build in builders.items()}
    best, medians = choose_fastest(candidates, example)
    chosen = candidates[best]
    timings = ", ".join(f"{name} {ms:.3g} ms" for name, ms in medians.items())
    chosen.lowering = f"{chosen.lowering} [auto: {timings}]"
    return chosen


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], example_inputs: tuple) -> dict:
    """The input each of ``layers`` (name -> module of ``model``) gets first when ``model``
    runs ``example_inputs`` in eval mode (training flags are restored afterwards)."""
    seen: dict[str, Tensor] = {}
    hooks = [module.register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0].detach()))
        for name, module in layers.items()]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
    return seen
