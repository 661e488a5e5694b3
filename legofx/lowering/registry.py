"""What ``fold`` can do, filled in by the methods and backends instead of written into ``fold``.

- **Lowerings**: the inference forms a training-form layer type offers, by name
  (:func:`register_lowering`; the default first). ``fold(gm, strategy=name)`` picks one,
  ``"auto"`` times them.
- **Absorbers**: functions that fold the module or function call after a folded layer into it
  (a BatchNorm, a ReLU), run by ``fold`` in every graph (:func:`register_absorber`).
- **Backends**: how ``strategy="auto"`` prepares a candidate layer to be timed where the model
  will run (:func:`register_backend`; ``"eager"`` runs it as it is).

Registering a new method's lowering, absorber or a new backend needs no edit of ``fold``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from legofx.core.layer import RewrittenLayer


class LoweringUnavailable(RuntimeError):
    """A lowering cannot be built on this machine (the message says why); ``"auto"`` drops it
    from the candidates and names it in the layer's ``lowering``."""


@dataclass(frozen=True)
class Lowering:
    """``build(layer, **options)`` returns the inference form; ``by_name_only``: ``"auto"``
    considers it only when asked to (``custom_ops=True``: a legofx custom op)."""

    name: str
    build: Callable[..., RewrittenLayer]
    by_name_only: bool = False


_LOWERINGS: dict[type, dict[str, Lowering]] = {}


def register_lowering(layer_type: type, name: str, *, default: bool = False,
                      by_name_only: bool = False):
    """Decorator: ``build(layer, **options)`` is lowering ``name`` of ``layer_type`` (and its
    subclasses). ``options`` are the settings ``fold`` passes (``index_dtype``); a builder
    takes ``**options`` and ignores those it has no use for."""

    def register(build: Callable[..., RewrittenLayer]) -> Callable[..., RewrittenLayer]:
        table = _LOWERINGS.setdefault(layer_type, {})
        entry = Lowering(name, _named(build, name), by_name_only)
        if default:
            _LOWERINGS[layer_type] = {name: entry, **{k: v for k, v in table.items() if k != name}}
        else:
            table[name] = entry
        return build

    return register


def _named(build: Callable[..., RewrittenLayer], name: str) -> Callable[..., RewrittenLayer]:
    """``build`` that records on each layer it makes the lowering's ``name``
    (``layer.lowering_name``: what ``fold`` puts in the model's recipe)."""
    def named_build(layer: RewrittenLayer, **options) -> RewrittenLayer:
        built = build(layer, **options)
        built.lowering_name = name
        return built
    return named_build


def lowerings(layer: RewrittenLayer) -> dict[str, Lowering]:
    """The lowerings of ``layer``'s type (the nearest registered base class), default first;
    a layer type without any offers its own ``folded()`` as ``"default"``."""
    for kind in type(layer).__mro__:
        if kind in _LOWERINGS:
            return dict(_LOWERINGS[kind])
    return {"default": Lowering("default", lambda layer, **options: layer.folded())}


def known_lowerings() -> set[str]:
    """Every registered lowering name, of any layer type."""
    return {name for table in _LOWERINGS.values() for name in table}


def by_name_only() -> set[str]:
    """The names of lowerings ``"auto"`` takes only with ``custom_ops=True`` (legofx custom ops,
    which ONNX and TensorRT do not take)."""
    return {name for table in _LOWERINGS.values() for name, entry in table.items()
            if entry.by_name_only}


@dataclass(frozen=True)
class Absorber:
    """``absorb(layer_name, layer, follower_name, follower) -> bool`` changes ``layer`` in place
    to compute ``follower(layer(x))`` and says whether it did; ``option``: the ``fold`` keyword
    that turns it on (``None``: always on)."""

    name: str
    absorb: Callable[[str, nn.Module, str, object], bool]
    option: str | None = None


ABSORBERS: list[Absorber] = []


def register_absorber(name: str, option: str | None = None):
    """Decorator: run ``absorb`` after folding (when ``fold``'s keyword ``option`` is True)."""

    def register(absorb):
        ABSORBERS.append(Absorber(name, absorb, option))
        return absorb

    return register


BACKENDS: dict[str, Callable[[nn.Module, Tensor], Callable]] = {
    "eager": lambda layer, x: layer,
}


def register_backend(name: str, prepare: Callable[[nn.Module, Tensor], Callable]) -> None:
    """``prepare(layer, x)`` returns ``layer`` as it runs on backend ``name`` (compiled for
    ``x``), for ``fold(strategy="auto", backend=name)``."""
    BACKENDS[name] = prepare
