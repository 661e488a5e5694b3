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

Two things a graph alone would lose are kept:

- **Hooks.** The graph computes the modules it inlined without calling them, so a hook
  registered on one of them after tracing (Grad-CAM on ``layer4``, a feature extractor on a
  rewritten conv, FSDP2's ``fully_shard`` of a block) would never fire. While any module the
  graph inlined has a hook (or a global module hook is registered), the traced module runs its
  source class's own ``forward`` over the same tree instead, which calls every module, so every
  hook fires; the graph runs again once they are removed. Both compute the same function (the
  rewritten layers compute the same math eagerly); the check is one pass over the inlined
  modules' hook dictionaries per call.
- **Forwards replaced after tracing.** Code that swaps an inlined module's ``forward`` on the
  instance (ultralytics' ``model.fuse()``: ``conv.forward = conv.forward_fuse`` and ``del
  conv.bn``) changes what the module computes, which the graph cannot see. While any inlined
  module has its own instance ``forward``, the source's ``forward`` runs too, which calls it.
- **Pickling.** ``torch.save(model)`` / ``torch.load`` (and ``pickle``) rebuild the same
  ``Traced<Name>`` class over the same tree, graph and attributes; ``GraphModule``'s own
  pickling would re-trace its generated code as a plain ``GraphModule`` (losing the class,
  duplicating state_dict keys, baking buffers into constants).
"""

from __future__ import annotations

import copy
import functools
import importlib
import types
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module_globals

from legofx.fx.interface import HOOK_STORES

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


_GLOBAL_HOOKS = tuple(getattr(_module_globals, f"_global{store}") for store in HOOK_STORES)
INLINED = "_legofx_inlined"
_COMPILED = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start", SOURCE, INLINED})


def _inlined_modules(traced: fx.GraphModule) -> tuple[nn.Module, ...]:
    """The modules below ``traced`` that its graph computes without calling them: all but the
    ``call_module`` targets and what lies below those (they run, and fire hooks, themselves)."""
    called = tuple(node.target + "." for node in traced.graph.nodes if node.op == "call_module")
    return tuple(module for name, module in traced.named_modules()
                 if name and not (name + ".").startswith(called))


def needs_eager(traced: fx.GraphModule) -> bool:
    """Whether running ``traced``'s graph would skip something: a global module hook, or a
    module its graph inlined that has a hook or a ``forward`` of its own (set on the instance,
    as ultralytics' ``fuse`` does)."""
    if any(_GLOBAL_HOOKS):
        return True
    for module in traced.__dict__.get(INLINED, ()):  # HOOK_STORES, spelled out: once per call
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__):
            return True
    return False


def _dispatching(graph_forward):
    """``forward`` of a traced module: ``graph_forward``, or the source's eager ``forward``
    while hooks or replaced forwards need the modules to be called (see the module docstring).
    It has the graph's signature (``inspect.signature``, which ``torch.export`` reads, follows
    ``__wrapped__``)."""
    @functools.wraps(graph_forward)
    def forward(self, *args, **kwargs):
        if needs_eager(self):
            source = self.__dict__[SOURCE]
            if isinstance(self, type(source)):
                return type(source).forward(self, *args, **kwargs)
            return source.forward(*args, **kwargs)
        return graph_forward(self, *args, **kwargs)
    return forward


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

    def recompile(self):
        """Compile the graph; ``forward`` dispatches (graph or eager)."""
        code = super().recompile()
        cls = type(self)
        cls.forward = _dispatching(cls.forward)
        if SOURCE in self.__dict__:
            self.__dict__[INLINED] = _inlined_modules(self)
        return code

    def __reduce_ex__(self, protocol):
        """Pickle as its source's class, tree, graph and attributes (see the module docstring)."""
        state = {key: value for key, value in self.__dict__.items() if key not in _COMPILED}
        graph = _with_targets(self.graph, _TargetName.of)  # no owning module, ops by name
        return (_new_traced, (type(self.__dict__[SOURCE]),),
                {"source": self.__dict__[SOURCE], "graph": graph, "state": state})

    def __setstate__(self, saved: dict) -> None:
        source, graph = saved["source"], _with_targets(saved["graph"], _TargetName.resolved)
        _adopt(self, fx.GraphModule(source, graph, type(source).__name__), source)
        self.__dict__.update(saved["state"])
        self.__dict__[INLINED] = _inlined_modules(self)

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


@dataclass(frozen=True)
class _TargetName:
    """A graph target or constant argument that does not pickle, by name: a ``torch.ops``
    operator overload (``legofx::lego_conv_merge.default``), a function bound to a module
    object (``torch._C._nn.pad``) or a ``torch.memory_format``, which pickle protocol 2
    (``torch.save``'s) cannot name."""

    module: str  # "" for an operator
    name: str

    def __call__(self, *args, **kwargs):  # a call_function target must be callable
        return _TargetName.resolved(self)(*args, **kwargs)

    @staticmethod
    def of(target):
        if isinstance(target, torch.memory_format):  # an argument protocol 2 cannot pickle
            return _TargetName("torch", str(target).removeprefix("torch."))
        if isinstance(target, torch._ops.OpOverload):
            return _TargetName("", target.name())
        owner = getattr(target, "__self__", None)
        if isinstance(owner, types.ModuleType):
            return _TargetName(owner.__name__, target.__name__)
        return target

    @staticmethod
    def resolved(target):
        if not isinstance(target, _TargetName):
            return target
        if target.module:
            return getattr(importlib.import_module(target.module), target.name)
        namespace, rest = target.name.split("::")
        op, _, overload = rest.partition(".")
        return getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")


def _with_targets(graph: fx.Graph, change) -> fx.Graph:
    """A copy of ``graph`` (owned by no module) with every node's target and constant argument
    passed through ``change``; names, types and meta kept."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    new._codegen = copy.deepcopy(graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        args, kwargs = fx.node.map_aggregate(
            (node.args, node.kwargs), lambda a: env[a] if isinstance(a, fx.Node) else change(a))
        env[node] = new.create_node(node.op, change(node.target), args, kwargs, node.name, node.type)
        env[node].meta = copy.copy(node.meta)
    return new


def _new_traced(source_type: type) -> TracedModule:
    """An empty traced module of ``source_type``'s ``Traced<Name>`` class (for unpickling)."""
    kind = traced_class(source_type)
    return kind.__new__(kind)


def traced_module(source: nn.Module, graph: fx.Graph) -> TracedModule:
    """The traced stand-in for ``source`` that runs ``graph``."""
    kind = traced_class(type(source))
    traced = kind.__new__(kind)
    _adopt(traced, fx.GraphModule(source, graph, type(source).__name__), source)
    return traced
