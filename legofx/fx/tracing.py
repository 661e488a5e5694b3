"""Turn a user's model into traced graphs that own copies of all its state, without giving up.

``torch.fx.symbolic_trace`` fails on data-dependent control flow, ``len`` of a proxy, and the
like. :func:`trace_tree` instead finds the module whose ``forward`` broke the trace, keeps it
as a leaf (with the failure message), and traces again until the trace succeeds. A module that
stays a leaf, or a root whose own ``forward`` cannot be traced, becomes an *eager scope*: its
children are traced on their own (each becomes a :class:`~legofx.fx.traced_module.TracedModule`),
and its plain convs can still be replaced at module level. A module whose interface a graph
would change (keyword arguments, defaults, a ``ModelOutput`` result, a container its caller
iterates: :mod:`legofx.fx.interface`) is an eager scope too. The result is a tree of
:class:`Scope`.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch.fx as fx
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from legofx.core.layer import RewrittenLayer
from legofx.fx.interface import CONTAINERS, OutputTypes, has_hooks, signature_problem
from legofx.fx.probe import Call, built_probe, can_probe, disagreement, record_calls
from legofx.fx.side_effects import computed_tensors, leaked_proxies, snapshot
from legofx.fx.traced_module import SOURCE, traced_module

REWRITABLE_TYPES = (nn.Conv2d, nn.Linear)


class TraceError(RuntimeError):
    """``torch.fx`` could not trace the model."""


def overrides_forward(module: nn.Module) -> bool:
    """Whether a ``Conv2d`` / ``Linear`` subclass computes something else than its base does."""
    for base in REWRITABLE_TYPES:
        if isinstance(module, base):
            kind = type(module)
            return any(getattr(kind, method) is not getattr(base, method)
                       for method in ("forward", "_conv_forward") if hasattr(base, method))
    return False


class PlainLeafTracer(fx.Tracer):
    """``fx.Tracer`` with more leaves: ``leaves`` by name, rewritten layers, and every subclass
    of ``Conv2d`` / ``Linear``.

    The default tracer keeps only modules defined in ``torch.nn`` as leaves, so a subclass
    (``class MyConv(nn.Conv2d)``, timm's ``Conv2dSame``) would be traced through into
    ``F.conv2d`` on its weight and could not be rewritten. It also remembers which module's
    ``forward`` it is inside, so that a failure can be pinned on a module (``failing_module``).
    """

    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.stack: list[str] = []
        self.outputs = OutputTypes()

    def create_arg(self, a):
        self.outputs.argument(a)
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        self.outputs.node(kind)
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaves or isinstance(module, (RewrittenLayer, *REWRITABLE_TYPES)):
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        name = self.path_of_module(module)
        if self.is_leaf_module(module, name):
            return super().call_module(module, forward, args, kwargs)
        self.stack.append(name)
        result = super().call_module(module, forward, args, kwargs)
        self.stack.pop()  # not reached when tracing the module fails: the stack names it
        return result

    @property
    def failing_module(self) -> str | None:
        """The innermost module being traced when the trace failed (``None``: the root)."""
        return self.stack[-1] if self.stack else None


def describe_failure(err: BaseException) -> str:
    """``TypeName: message (at file:line)``: the error and the last frame outside torch."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {message[:200]}{where}"


@dataclass
class Scope:
    """A part of the model that runs one way: a traced graph, or a module's eager forward.

    ``name`` is the module's qualified name in the root (``""``: the root); ``reason`` says why
    an eager scope could not be traced; ``leaves`` maps the qualified names (relative to a graph
    scope) of modules kept as leaves to their failure messages; ``children`` are the scopes
    nested inside (the leaves of a graph; the traced or eager children of an eager module).
    """

    name: str
    module: nn.Module
    graph: bool
    reason: str = ""
    leaves: dict[str, str] = field(default_factory=dict)
    children: list[Scope] = field(default_factory=list)
    unchecked: str = ""  # the root's: why its graphs were not checked against eager code

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def qualified_name(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _outermost(names: dict[str, str]) -> dict[str, str]:
    return {n: msg for n, msg in names.items()
            if not any(n.startswith(other + ".") for other in names if other != n)}


def _node_key(node: fx.Node) -> tuple:
    by_name = lambda arg: fx.node.map_arg(arg, lambda n: n.name)  # noqa: E731
    return node.op, str(node.target), repr(by_name(node.args)), repr(by_name(node.kwargs))


def _innermost(*nodes: fx.Node | None) -> str:
    stacks = [list((n.meta.get("nn_module_stack") or {}).keys()) for n in nodes if n is not None]
    deepest = max(stacks, key=len, default=[])
    return deepest[-1] if deepest else ""


def _mode_dependence(module: nn.Module, graph: fx.Graph, leaves) -> tuple[str, str] | None:
    """Trace ``module`` in the other mode (train/eval); ``None`` if the graphs are the same,
    else ``(module name, why)`` for the module whose code depends on ``self.training``
    (``""``: the root's own code). fx would bake ``if self.training:`` into one branch."""
    mode = module.training
    tracer = PlainLeafTracer(frozenset(leaves))
    try:
        module.train(not mode)
        other = tracer.trace(module)
    except Exception as err:  # traces in one mode only
        return tracer.failing_module or "", describe_failure(err) + " (in the other train/eval mode)"
    finally:
        module.train(mode)
    ours, theirs = list(graph.nodes), list(other.nodes)
    for index in range(max(len(ours), len(theirs))):
        a = ours[index] if index < len(ours) else None
        b = theirs[index] if index < len(theirs) else None
        if a is None or b is None or _node_key(a) != _node_key(b):
            return _innermost(a, b), ("its forward depends on self.training, which a trace would "
                                      "freeze in one mode")
    return None


@dataclass
class TraceContext:
    """What every trace of one ``trace_tree`` shares: the whole copied model (whose Python
    state a trace may change: :mod:`legofx.fx.side_effects`) and each module's probe call by
    qualified name (:mod:`legofx.fx.probe`; empty when there is no probe)."""

    model: nn.Module
    calls: dict[str, Call] = field(default_factory=dict)


def _side_effect_problem(before, what: str) -> str | None:
    changed = before.changes()
    if not changed:
        return None
    before.restore()
    shown = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    return (f"its forward changes Python state while it runs ({shown}), which a traced graph "
            f"would not do when it runs{what}: it runs eagerly")


def robust_trace(module: nn.Module, context: TraceContext | None = None,
                 scope_name: str = "") -> tuple[fx.GraphModule | None, dict[str, str], str]:
    """Trace ``module``, making leaves of the modules that break the trace.

    A module breaks the trace when tracing its ``forward`` raises, or when its code depends on
    ``self.training`` (the train-mode and eval-mode traces differ there: a trace would keep,
    say, stochastic depth in eval mode). Returns ``(graph module or None, {leaf: failure},
    failure of the root's own forward)``; a graph that would lose the type of what ``module``
    returns is a failure of the root. A module that fails makes every module of the same
    class (outside ``torch.nn``) a leaf too, so a model with 24 identical failing blocks is
    traced twice, not 25 times.

    With a ``context``, two more failures of the root: tracing changed Python state of the
    model (undone first), or the graph disagrees with ``module``'s eager forward on its probe
    call (``context.calls[scope_name]``).
    """
    context = context or TraceContext(module)
    before = snapshot(context.model)
    leaves: dict[str, str] = {
        name: "it has hooks, which run only when it is called as a module"
        for name, sub in module.named_modules()
        if name and has_hooks(sub) and not isinstance(sub, (RewrittenLayer, *REWRITABLE_TYPES))}
    classes: dict[type, list[str]] = {}
    for name, sub in module.named_modules():
        classes.setdefault(type(sub), []).append(name)
    while True:
        tracer = PlainLeafTracer(frozenset(leaves))
        try:
            graph = tracer.trace(module)
        except Exception as err:  # anything user code raises under tracing
            culprit, failure = tracer.failing_module, describe_failure(err)
            effect = _side_effect_problem(before, " (seen after a failed trace)")
            if effect:
                return None, leaves, effect
        else:
            if tracer.outputs.problem():
                return None, leaves, tracer.outputs.problem()
            dependence = _mode_dependence(module, graph, leaves)
            effect = _side_effect_problem(before, "")
            if effect:
                return None, leaves, effect
            if dependence is None:
                call = context.calls.get(scope_name)
                problem = call and disagreement(fx.GraphModule(module, graph), module, call)
                if problem:
                    return None, leaves, problem
                traced = traced_module(module, graph)
                return traced, _outermost(leaves), ""
            culprit, failure = dependence
        if not culprit or culprit in leaves:
            return None, leaves, failure
        leaves[culprit] = failure
        kind = type(module.get_submodule(culprit))
        if not kind.__module__.startswith("torch.nn"):
            for twin in classes[kind]:
                leaves.setdefault(twin, f"same class as {culprit!r}, which failed: {failure}")


def _contains_rewritable(module: nn.Module) -> bool:
    return any(isinstance(sub, REWRITABLE_TYPES) for sub in module.modules())


def _eager_scope(module: nn.Module, name: str, reason: str, context: TraceContext) -> Scope:
    """``module`` runs its own forward; each child that holds convs becomes a scope of its own
    (a traced child takes the child's place in ``module``)."""
    scope = Scope(name, module, graph=False, reason=reason)
    for child_name, child in list(module.named_children()):
        if isinstance(child, REWRITABLE_TYPES) or not _contains_rewritable(child):
            continue
        sub = _scope(child, qualified_name(name, child_name), context, called_by_eager_code=True)
        if sub.graph and sub.module is not child:
            setattr(module, child_name, sub.module)
        scope.children.append(sub)
    return scope


def interface_problem(module: nn.Module, called_by_eager_code: bool) -> str | None:
    """Why ``module``'s forward must stay eager before any trace (see :mod:`legofx.fx.interface`)."""
    if called_by_eager_code and isinstance(module, CONTAINERS):
        return (f"a {type(module).__name__} called by eager code, which may iterate or index it: "
                "it stays as it is and its children are rewritten one by one")
    return signature_problem(module)


def _scope(module: nn.Module, name: str, context: TraceContext,
           called_by_eager_code: bool = False) -> Scope:
    if isinstance(module, fx.GraphModule):  # already traced (e.g. transformed before)
        return Scope(name, module, graph=True)
    problem = interface_problem(module, called_by_eager_code)
    if problem:
        return _eager_scope(module, name, problem, context)
    gm, leaves, failure = robust_trace(module, context, name)
    if gm is None:
        return _eager_scope(module, name, failure, context)
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    leaves = {leaf: message for leaf, message in leaves.items() if leaf in called}
    scope = Scope(name, gm, graph=True, leaves=leaves)
    for leaf, message in leaves.items():
        scope.children.append(_eager_scope(gm.get_submodule(leaf), qualified_name(name, leaf),
                                           message, context))
    return scope


def copy_model(model: nn.Module, shared: Iterable[Tensor] = ()) -> nn.Module:
    """A deep copy of ``model`` that still refers to the ``shared`` tensors (not copied, to
    save time on tensors about to be replaced); :func:`unshare` ends the sharing. Tensors with
    an autograd history cached in plain attributes (the last forward's activations) are copied
    detached, as deepcopy refuses them."""
    memo = {id(tensor): tensor for tensor in shared}
    memo.update({id(t): t.detach().clone() for t in computed_tensors(model)})
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:  # deepcopy raises anything a __deepcopy__ or __reduce__ raises
        raise TypeError(
            f"cannot copy model {type(model).__name__} ({type(err).__name__}: {err}); legofx "
            "works on a copy so that your model is never modified"
        ) from err


def _reachable_modules(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        yield module
        source = module.__dict__.get(SOURCE)
        if source is not None and source is not module:
            yield from source.modules()


def unshare(copied: nn.Module, original: nn.Module) -> None:
    """Give ``copied`` its own copy of every tensor it still shares with ``original`` (tied
    tensors stay tied)."""
    theirs = {id(t) for t in [*original.parameters(), *original.buffers()]}
    clones: dict[int, Tensor] = {}
    for module in _reachable_modules(copied):
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or id(tensor) not in theirs:
                    continue
                if id(tensor) not in clones:
                    clone = tensor.detach().clone()
                    clones[id(tensor)] = (nn.Parameter(clone, tensor.requires_grad)
                                          if isinstance(tensor, nn.Parameter) else clone)
                store[key] = clones[id(tensor)]


def trace_tree(model: nn.Module, example: Call | None = None) -> Scope:
    """The scopes of a copy of ``model``; the original, its parameters and hooks stay untouched.

    Every graph is checked against its module's eager forward on the call that module got
    when the copy ran ``example`` (``(args, kwargs)``), or, without one, an input built from
    the model's first conv (:func:`legofx.fx.probe.built_probe`); a graph that disagrees is
    not used (the module runs eagerly). No ``torch.fx`` Proxy is left in the copy's state.

    The root scope's module is what ``transform`` returns: a ``GraphModule`` when the root's
    ``forward`` traces (possibly with leaves), else the copied model itself. The copy still
    shares the weights of convs and linear layers with ``model`` (most are about to be
    replaced): call :func:`unshare` once the rewrite is done.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, REWRITABLE_TYPES)
               and isinstance(m.weight, Tensor) and not is_lazy(m.weight)]
    copied = copy_model(model, weights)
    context = TraceContext(copied)
    refused = can_probe(copied)
    call = None if refused else example if example is not None else built_probe(copied)
    unchecked = ""
    if call is None:
        why = refused or ("no example_inputs, and no input could be built for the model (one "
                          "tensor for its first conv)")
        unchecked = (f"{why}: traced graphs were not checked against eager execution; pass "
                     "example_inputs to check them")
    else:
        context.calls = record_calls(copied, call, lambda m: _contains_rewritable(m)
                                     and not isinstance(m, REWRITABLE_TYPES))
    root = _scope(copied, "", context)
    root.unchecked = unchecked
    leaked = leaked_proxies(root.module)
    if leaked:
        raise TraceError(f"tracing left torch.fx Proxies in the model's attributes "
                         f"({', '.join(leaked[:3])}): legofx cannot rewrite this model safely; "
                         "please report it")
    return root
