"""Check a traced graph against the eager ``forward`` it stands for, on a real call.

``torch.fx`` records one path through the code: a test that is False for a Proxy
(``torch.jit.isinstance(x, torch.Tensor)`` in MONAI's ``UpCat``), a branch on a value, or
anything else the tracer cannot see, gives a graph that computes something else than the
module. So before a graph replaces a module, both run on the call the module got in a *probe*
run of the model (``example_inputs``, or an input built from the model's first conv when none
is given), in eval mode, without gradients, from the same random state; where they disagree the
module stays eager (its children are traced one by one, and checked the same way).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree

from legofx.core.modes import kept_modes
from legofx.fx.interface import HOOK_STORES, _flatten

PROBE_SIZES = (64, 224)  # spatial sizes tried for a probe input built from the first conv
Call = tuple[tuple, dict]


def _copied(value):
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


_HOOK_STORES = (*HOOK_STORES, "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_always_called")


@contextmanager
def _without_hooks(module: nn.Module) -> Iterator[None]:
    """The model's own hooks (the user's, copied with the model) do not see probe runs."""
    saved = [(m, store, m.__dict__[store]) for m in module.modules() for store in _HOOK_STORES
             if store in m.__dict__]
    try:
        for m, store, _ in saved:
            m.__dict__[store] = OrderedDict()
        yield
    finally:
        for m, store, hooks in saved:
            m.__dict__[store] = hooks


def _run(module: nn.Module, call: Call, keep_hooks: bool = False):
    with torch.no_grad(), torch.random.fork_rng(devices=[]), kept_modes(module, training=False), \
            (nullcontext() if keep_hooks else _without_hooks(module)):
        torch.manual_seed(0)
        return module(*call[0], **call[1])


def record_calls(model: nn.Module, call: Call, keep) -> dict[str, Call]:
    """The first call (arguments copied) of every module of ``model`` that ``keep(module)``
    accepts, by qualified name, from one eval-mode run of ``model`` on ``call``; ``{}`` when
    that run fails."""
    names = {id(module): name for name, module in model.named_modules() if keep(module)}
    seen: dict[str, Call] = {}

    def record(module, args, kwargs):
        name = names.get(id(module))
        if name is not None and name not in seen:
            seen[name] = (_copied(args), _copied(kwargs))

    handles = []
    try:
        with _without_hooks(model):
            handles = [m.register_forward_pre_hook(record, with_kwargs=True)
                       for m in model.modules() if id(m) in names]
            _run(model, call, keep_hooks=True)
    except Exception:  # noqa: BLE001 - a probe the model does not take checks nothing
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return seen


def can_probe(model: nn.Module) -> str | None:
    """Why ``model`` must not run a probe (``None``: it may): a lazy module would take its
    shapes from the probe."""
    if any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules()):
        return "the model has uninitialised lazy modules (run one forward pass first)"
    return None


def built_probe(model: nn.Module) -> Call | None:
    """An input for a model called with one tensor: ``(1, C, S, S)`` random, ``C`` the first
    conv's ``in_channels`` (its dtype and device); ``None`` when the model does not look so."""
    try:
        required = [p for p in inspect.signature(model.forward).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if len(required) != 1 or conv is None or conv.weight.is_meta or is_lazy(conv.weight):
        return None
    like = {"dtype": conv.weight.dtype, "device": conv.weight.device}
    for size in PROBE_SIZES:
        call = ((torch.randn(1, conv.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(**like),), {})
        try:
            _run(model, call)
        except Exception:  # noqa: BLE001 - another size, or no probe
            continue
        return call
    return None


def disagreement(graph: nn.Module, module: nn.Module, call: Call) -> str | None:
    """Why ``graph`` does not compute what ``module``'s eager forward does on ``call``
    (``None`` when they agree): an error in one of them, another output structure, or values
    further apart than float rounding (relative 1e-4 of the output's largest value)."""
    outputs = []
    for what, runner in (("its eager forward", module), ("its traced graph", graph)):
        try:
            outputs.append(_run(runner, _copied(call)))
        except Exception as err:  # noqa: BLE001 - user code raises anything
            return (f"{what} fails on the probe input ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:150] if str(err) else ''})")
    (eager, eager_spec), (traced, traced_spec) = (_flatten(out) for out in outputs)
    if eager_spec != traced_spec:
        return (f"its traced graph returns another structure than its eager forward on the probe "
                f"input ({len(traced)} leaves instead of {len(eager)}): the trace took another path")
    for (path, want), (_, got) in zip(eager, traced):
        problem = _leaf_problem(want, got)
        if problem:
            return f"output{path or ''} {problem} on the probe input: the trace took another path"
    return None


def _leaf_problem(want, got) -> str | None:
    if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
        return f"is a {type(got).__name__} in its traced graph, a {type(want).__name__} eagerly"
    if not isinstance(want, torch.Tensor):
        try:
            return None if bool(want == got) else f"is {got!r} in its traced graph, {want!r} eagerly"
        except Exception:  # noqa: BLE001 - values without a plain ==
            return None
    if (want.dtype, want.shape) != (got.dtype, got.shape):
        return (f"is {got.dtype} {tuple(got.shape)} in its traced graph, {want.dtype} "
                f"{tuple(want.shape)} eagerly")
    if not want.is_floating_point() and not want.is_complex():
        return None if torch.equal(want, got) else "differs in its traced graph"
    if not torch.equal(want.isnan(), got.isnan()):
        return "has NaN elsewhere in its traced graph"
    want, got = want.nan_to_num(0.0), got.nan_to_num(0.0)
    scale = want.abs().max().item() if want.numel() else 0.0
    error = (want - got).abs().max().item() if want.numel() else 0.0
    return None if error <= 1e-4 * scale + 1e-30 else f"differs by {error:.3g} (of {scale:.3g})"
