"""The Lego filters repeated ``o`` times, as the fused op's grouped conv takes them, kept
between calls while the filters do not change."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

_grouped_weights: dict[int, tuple] = {}  # id(lego) -> (weak reference, key, copy, repeated)


def grouped_weight(lego: Tensor, o: int) -> Tensor:
    """The Lego filters repeated ``o`` times (channels-last, as oneDNN takes them), for one conv
    with ``groups=o``. Made once and kept while ``lego`` lives and is unchanged: same storage,
    same version counter, which every in-place change bumps (optimizer steps, ``load_state_dict``,
    ``copy_``; ``.to()`` makes new storage), and the same values as a copy kept with it, which
    catches writes through ``lego.data`` (an EMA update) that bypass the counter: comparing reads
    the filters once, where making the copy on every call costs a repeat and a layout change per
    layer (docs/performance.md has the measurement)."""
    try:
        key = (lego.data_ptr(), lego._version, o)
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return lego.repeat(o, 1, 1, 1)
    kept = _grouped_weights.get(id(lego))
    alive = kept is not None and kept[0]() is lego  # not a dead tensor's reused id
    if not alive:
        weakref.finalize(lego, _grouped_weights.pop, id(lego), None)
    if not alive or kept[1] != key or not torch.equal(kept[2], lego):
        repeated = lego.detach().repeat(o, 1, 1, 1).contiguous(memory_format=torch.channels_last)
        kept = _grouped_weights[id(lego)] = (weakref.ref(lego), key, lego.detach().clone(), repeated)
    return kept[3]


def forget_grouped_weights() -> None:
    """Drop every kept repeated copy of Lego filters (they are made again on the next call)."""
    _grouped_weights.clear()
