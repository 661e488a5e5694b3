"""Python state that tracing changed, undone; and a last look for leaked ``torch.fx`` Proxies.

Tracing runs the model's code on Proxies. Code that stores what it computes (MONAI's
``DynUNet`` writes each deep-supervision head into a list shared with its root:
``self.heads[i] = y``) leaves Proxies in the model, and the graph would not repeat the store
when it runs. :func:`snapshot` records every module's plain attributes (and the contents of
lists, dicts and sets among them) before a trace; :meth:`Snapshot.changes` says what the
trace changed and :meth:`Snapshot.restore` puts it back, so the module that did it can stay
eager instead. :func:`leaked_proxies` finds any Proxy left in a model's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import Tensor, nn

_INTERNAL = frozenset(nn.Module().__dict__) | {"_graph", "_code", "_lineno_map", "_prologue_start",
                                                 "meta", "_legofx_inlined", "_legofx_meta"}


def _contents(value):
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, set):
        return set(value)
    return None


def _same_contents(before, value) -> bool:
    if before is None:
        return True
    if isinstance(value, dict):
        return before.keys() == value.keys() and all(before[k] is value[k] for k in before)
    if isinstance(value, set):
        return before == value
    return len(before) == len(value) and all(a is b for a, b in zip(before, value))


@dataclass
class Snapshot:
    """Each module's plain attributes as they were, with the contents of their containers."""

    saved: list[tuple[nn.Module, str, dict, dict]]

    def changes(self) -> list[str]:
        """``"Class.attribute"`` for every plain attribute the code changed since."""
        changed = []
        for module, name, values, contents in self.saved:
            now = {k: v for k, v in module.__dict__.items() if k not in _INTERNAL}
            for key in values.keys() | now.keys():
                if (key not in values or key not in now or values[key] is not now[key]
                        or not _same_contents(contents[key], now[key])):
                    changed.append(f"{name or type(module).__name__}.{key}")
        return changed

    def restore(self) -> None:
        for module, _, values, contents in self.saved:
            for key in [k for k in module.__dict__ if k not in _INTERNAL and k not in values]:
                del module.__dict__[key]
            for key, value in values.items():
                module.__dict__[key] = value
                before = contents[key]
                if isinstance(value, list) and not _same_contents(before, value):
                    value[:] = before
                elif isinstance(value, (dict, set)) and not _same_contents(before, value):
                    value.clear()
                    value.update(before)


def snapshot(model: nn.Module) -> Snapshot:
    saved = []
    for name, module in model.named_modules():
        values = {k: v for k, v in module.__dict__.items() if k not in _INTERNAL}
        saved.append((module, name, values, {k: _contents(v) for k, v in values.items()}))
    return Snapshot(saved)


def _holds_proxy(value, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth >= 3 or isinstance(value, (str, bytes, nn.Module)):
        return False
    if isinstance(value, dict):
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v, depth + 1) for v in value)
    return False


def computed_tensors(model: nn.Module) -> list:
    """Tensors with an autograd history kept in plain attributes of ``model``'s modules (a
    cache of the last forward's activations, like MONAI's deep-supervision heads), which
    ``copy.deepcopy`` refuses."""
    found: list = []

    def visit(value, depth: int = 0) -> None:
        if isinstance(value, Tensor):
            if value.grad_fn is not None:
                found.append(value)
        elif depth < 3 and isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)

    for module in model.modules():
        for key, value in module.__dict__.items():
            if key not in _INTERNAL:
                visit(value)
    return found


def leaked_proxies(model: nn.Module) -> list[str]:
    """``"module.attribute"`` for every attribute of ``model``'s modules that holds a Proxy."""
    return [f"{name or '<root>'}.{key}" for name, module in model.named_modules()
            for key, value in module.__dict__.items()
            if key not in _INTERNAL and _holds_proxy(value)]
