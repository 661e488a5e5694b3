"""Choosing each layer's inference form when folding: ``fold(gm, strategy=...)``.

A training-form layer offers its lowerings (``RewrittenLayer.lowerings``: name -> builder,
the default first). ``strategy=None`` takes each layer's default; a name takes that lowering
wherever a layer offers it; ``"auto"`` builds every lowering of a layer and keeps the one
that runs fastest on the input the layer actually receives from ``example_inputs``, on this
machine, in eager mode or compiled for the backend the model will run on (``backend=``),
among the lowerings every backend takes; with ``custom_ops=True`` (eager or inductor only)
``"fused"``, a legofx custom op, is a candidate too, and every candidate is timed on the
channels-last input the fused layers pass on.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from legofx.deploy import BACKENDS, compile
from legofx.layer_base import RewrittenLayer
from legofx.onnx_runtime import TAKING_TURNS
from legofx.timing import interleaved_times, median_ms

AUTO_BACKENDS = ("eager", *BACKENDS)
BY_NAME_ONLY = ("fused",)  # the custom-op lowering: "auto" keeps to what every backend takes


def check_backend(backend, strategy, custom_ops: bool = False) -> None:
    if not isinstance(backend, str) or backend not in AUTO_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(AUTO_BACKENDS)}, got backend={backend!r}")
    if backend != "eager" and strategy != "auto":
        raise ValueError(f"backend={backend!r} says where strategy='auto' times the lowerings; "
                         f"with strategy={strategy!r} nothing is timed: drop backend or use 'auto'")
    if not isinstance(custom_ops, bool):
        raise TypeError(f"custom_ops must be True or False, got custom_ops={custom_ops!r}")
    if custom_ops and strategy != "auto":
        raise ValueError(f"custom_ops=True lets strategy='auto' pick 'fused'; with "
                         f"strategy={strategy!r} nothing is chosen: use 'auto', or drop custom_ops")
    if custom_ops and backend not in ("eager", "inductor"):
        raise ValueError(f"custom_ops=True: backend={backend!r} does not take the legofx custom op "
                         f"of 'fused'; use backend='eager' or 'inductor', or drop custom_ops")


def on_backend(layer: nn.Module, x: Tensor, backend: str) -> nn.Module:
    """``layer`` as it will run: itself in eager mode, else compiled for ``backend``.

    For inductor the layer is first traced into a GraphModule of its own, so that dynamo
    compiles every candidate separately, for static shapes, instead of reusing (or giving up
    after) the compilations of other layers of the same class.
    """
    if backend == "eager":
        return layer
    if backend == "inductor":
        return compile(fx.symbolic_trace(layer), x, backend, verify=False, dynamic=False)
    if backend == "onnxruntime":  # the candidates' sessions take turns
        return compile(layer, x, backend, verify=False, session_config=TAKING_TURNS)
    return compile(layer, x, backend, verify=False)


def choose_fastest(candidates: dict[str, nn.Module], x: Tensor, rounds: int = 7,
                   backend: str = "eager") -> tuple[str, dict]:
    """The candidate that runs ``x`` fastest on ``backend`` by median of interleaved timings
    (:func:`legofx.timing.interleaved_times`); returns its key and the medians in ms."""
    modes = {module: module.training for layer in candidates.values() for module in layer.modules()}
    try:
        runnable = {key: on_backend(layer.eval(), x, backend) for key, layer in candidates.items()}
        times = interleaved_times(runnable, x, rounds=rounds, warmup=2 if backend != "eager" else 1)
    finally:
        for module, training in modes.items():
            module.train(training)
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
          options: dict, backend: str = "eager", custom_ops: bool = False) -> RewrittenLayer:
    """The inference form of one training-form ``layer`` under ``strategy``.

    A named lowering the layer does not offer falls back to its default; ``"auto"`` without
    an example input for the layer (never called on ``example_inputs``) does too.
    """
    builders = layer.lowerings(**options)
    default = next(iter(builders.values()))
    if strategy != "auto":
        return builders.get(strategy, default)()
    if custom_ops and example is not None and example.dim() == 4:
        example = example.contiguous(memory_format=torch.channels_last)
    builders = {name: build for name, build in builders.items()
                if custom_ops or name not in BY_NAME_ONLY}
    if example is None or len(builders) == 1:
        return default()
    candidates = {name: build() for name, build in builders.items()}
    best, medians = choose_fastest(candidates, example, backend=backend)
    chosen = candidates[best]
    timings = ", ".join(f"{name} {ms:.3g} ms" for name, ms in medians.items())
    where = "" if backend == "eager" else f" on {backend}"
    chosen.lowering = f"{chosen.lowering} [auto{where}: {timings}]"
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
