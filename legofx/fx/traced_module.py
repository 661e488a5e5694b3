"""A traced graph that stands in for the module it was traced from, without changing its face.

``torch.fx.GraphModule(root, graph)`` copies only the submodules its graph uses, and the
modules on their paths become bare ``nn.Module`` objects: ``model.layer4[-1]``, ``len(model)``,
``for block in model.blocks``, ``model.config``, ``model.forward_features(x)`` or
``isinstance(block, ConvNextStage)`` (which transformers' output recorders rely on) all stop
working. A :class:`TracedModule` runs its graph as ``forward`` but is an instance of its
*source* module's class as well, and keeps the source's own tree: it shares the source's
children, parameters and buffers (the same objects, the same dicts) and takes its plain
attributes, so state_dict keys, containers, methods and every child's attributes are the
source's. Attributes it still lacks are looked up on the source.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

SOURCE = "_legofx_source"
_CLASSES: dict[type, type] = {}
_PLAIN = (nn.Conv2d, nn.Linear)  # rewritable layers themselves never become their own class


def _graft(traced: fx.GraphModule, source: nn.Module) -> None:
    """Make ``traced`` share ``source``'s children, parameters and buffers (what the graph put
    there that ``source`` lacks, such as traced constants, goes into the shared dicts), and
    take its plain attributes (``self.f``, ``self.type``, ``self.config``; a name that
    ``nn.Module`` also defines, ``type``, would never reach the source through ``__getattr__``)
    and its hooks."""
    for store in ("_modules", "_parameters", "_buffers"):
        shared = getattr(source, store)
        for key, value in getattr(traced, store).items():
            shared.setdefault(key, value)
        traced.__dict__[store] = shared
    for key, value in source.__dict__.items():
        if key not in traced.__dict__ and key != "forward" or _is_hooks(key, value):
            traced.__dict__[key] = value  # hooks too: a user's, or transformers' recorders


def _is_hooks(key: str, value) -> bool:
    return key.startswith("_") and "hooks" in key and isinstance(value, dict)


def _adopt(traced: fx.GraphModule, plain: fx.GraphModule, source: nn.Module) -> None:
    """Give ``traced`` (made by ``__new__`` only) the state of ``plain``, a ``GraphModule`` of
    the same graph, then ``source``'s tree, and compile its forward."""
    traced.__dict__.update(plain.__dict__)
    traced.__dict__[SOURCE] = source
    _graft(traced, source)
    type(traced).__name__ = type(source).__name__
    traced.graph = plain.graph  # owned by ``traced`` now; recompiles its forward


class TracedModule(fx.GraphModule):
    """A ``GraphModule`` that is also its source's class, with its source's tree (see the
    module docstring). Make one with :func:`traced_module`."""

    def _deepcopy_init(self):
        def init(copied, code_only, graph):  # GraphModule.__init__ would run the source's
            source = code_only.__dict__[SOURCE]  # class __init__ through super()
            _adopt(copied, fx.GraphModule(code_only, graph, type(source).__name__), source)
        return init

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get(SOURCE)
            if source is None or source is self:
                raise
            return getattr(source, name)

    def train(self, mode: bool = True):
        super().train(mode)
        source = self.__dict__.get(SOURCE)
        if source is not None:  # its methods may read its own flag
            source.training = mode
        return self


def traced_class(source_type: type) -> type:
    """``Traced<Name>``: :class:`TracedModule` and ``source_type`` (one class per type);
    :class:`TracedModule` alone where the two cannot be combined."""
    if source_type not in _CLASSES:
        kind = TracedModule
        if not issubclass(source_type, (fx.GraphModule, *_PLAIN)):
            try:
                kind = type(f"Traced{source_type.__name__}", (TracedModule, source_type),
                            {"__module__": __name__})
            except TypeError:  # a metaclass or layout conflict
                kind = TracedModule
        _CLASSES[source_type] = kind
    return _CLASSES[source_type]


def traced_module(source: nn.Module, graph: fx.Graph) -> TracedModule:
    """The traced stand-in for ``source`` that runs ``graph``."""
    kind = traced_class(type(source))
    traced = kind.__new__(kind)
    _adopt(traced, fx.GraphModule(source, graph, type(source).__name__), source)
    return traced
