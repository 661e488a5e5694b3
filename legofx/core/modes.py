"""Train/eval flags: set them for a while, and always give them back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def kept_modes(*modules: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit; ``training`` (if given) sets them
    all on entry (``kept_modes(model, training=False)``: run in eval mode for a while)."""
    saved = [(m, m.training) for module in modules if isinstance(module, nn.Module)
             for m in module.modules()]
    try:
        if training is not None:
            for module in modules:
                if isinstance(module, nn.Module):
                    module.train(training)
        yield
    finally:
        for module, flag in saved:
            module.train(flag)
