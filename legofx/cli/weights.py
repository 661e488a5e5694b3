"""``--weights``: a ``state_dict`` read before any slow work, loaded into the transformed model
with one-line errors that name whole keys."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn

from legofx.cli.options import one_line

SHOWN_KEYS = 3


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``path`` (read with ``weights_only=True``: nothing in it runs)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--weights {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a text file raises IndexError, others anything
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if pickled:
            raise ValueError(
                f"--weights {path!r} holds pickled Python objects ({pickled.group(1)}: e.g. a "
                f"whole model saved with torch.save(model)), not a state_dict; save "
                f"gm.state_dict() instead (legofx does not unpickle objects: that could run any "
                f"code)") from None
        raise ValueError(f"--weights {path!r} is not a state_dict torch.load can read (not a "
                         f"file torch.save wrote, or a damaged one)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, not a "
                         f"state_dict (a dict of tensors, as gm.state_dict() gives)")
    return state


def _keys(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''} ({shown}{more})"


def load_weights(gm: nn.Module, state: dict, args: argparse.Namespace, settings: str) -> None:
    """Load ``state`` into ``gm``; a mismatch raises one ``ValueError`` line naming whole keys."""
    fits = f"--weights {args.weights!r} does not fit the model transformed with " \
           f"--method {args.method} {settings}"
    try:
        result = gm.load_state_dict(state, strict=False)  # gm is ours: a failed load is dropped
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{fits}: {(problems or [one_line(err)])[0]}{more}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = [_keys(kind, keys) for kind, keys in (("missing", result.missing_keys),
                                                      ("unexpected", result.unexpected_keys)) if keys]
        raise ValueError(f"{fits}: {', '.join(parts)}")
