"""A traced graph that stands in for the module it was traced from, without changing its face.

``torch.fx.GraphModule(root, graph)`` copies only the submodules its graph uses, and the
modules on their paths become bare ``nn.Module`` objects: ``model.layer4[-1]``, ``len(model)``,
``for block in model.blocks``, ``model.config`` or ``model.forward_features(x)`` all stop
working. A :class:`TracedModule` runs its graph as ``forward`` but keeps the *source* module's
own tree: it shares the source's children, parameters and buffers (the same objects, the same
dicts), so state_dict keys, containers and every child's attributes are the source's; plain
attributes and methods it lacks are looked up on the source, whose children are the rewritten
ones. A source that is a container (``nn.Sequential``) keeps ``len``, iteration and indexing.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

SOURCE = "_legofx_source"
_DELEGATED = ("__len__", "__iter__", "__getitem__", "__contains__", "__reversed__")
_CLASSES: dict[type, type] = {}


def _graft(traced: fx.GraphModule, source: nn.Module) -> None:
    """Make ``traced`` share ``source``'s children, parameters and buffers (what the graph put
    there that ``source`` lacks, such as traced constants, goes into the shared dicts), and
    take its plain attributes (``self.f``, ``self.type``, ``self.config``): a name that
    ``nn.Module`` also defines (``type``) would never reach the source through ``__getattr__``."""
    for store in ("_modules", "_parameters", "_buffers"):
        shared = getattr(source, store)
        for key, value in getattr(traced, store).items():
            shared.setdefault(key, value)
        traced.__dict__[store] = shared
    for key, value in source.__dict__.items():
        if key not in traced.__dict__ and key != "forward":
            traced.__dict__[key] = value


class TracedModule(fx.GraphModule):
    """A ``GraphModule`` whose module tree is its source's (see the module docstring)."""

    def __init__(self, root, graph, class_name: str | None = None) -> None:
        source = root.__dict__.get(SOURCE, root)
        super().__init__(root, graph, class_name or type(source).__name__)
        self.__dict__[SOURCE] = source
        _graft(self, source)

    def _deepcopy_init(self):
        return type(self).__init__  # GraphModule's deepcopy would call GraphModule.__init__

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


def _delegate(name: str):
    def method(self, *args):
        return getattr(self.__dict__[SOURCE], name)(*args)

    method.__name__ = name
    return method


def traced_class(source_type: type) -> type:
    """:class:`TracedModule`, or for a source type with container methods (``nn.Sequential``,
    ``nn.ModuleList``...) a subclass that hands ``len``, iteration and indexing to the source."""
    if source_type not in _CLASSES:
        own = [name for name in _DELEGATED if any(
            name in vars(kind) for kind in source_type.__mro__ if kind not in (nn.Module, object))]
        _CLASSES[source_type] = TracedModule if not own else type(
            f"Traced{source_type.__name__}", (TracedModule,),
            {"__module__": __name__, **{name: _delegate(name) for name in own}})
    return _CLASSES[source_type]
