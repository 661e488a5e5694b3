"""The Lego filters repeated ``o`` times, as the fused op's grouped conv takes them, kept
between calls while the filters do not change.

Whether they changed is read off the filters' storage and version counter, which every in-place
write bumps (optimizer steps, ``load_state_dict``, ``copy_``; ``.to()`` makes new storage): one
comparison of integers per call. Writes through ``.data`` (an EMA update) bypass a tensor's
counter, so the fused layer keeps its filters as :class:`WatchedFilters`, a Parameter whose
``.data`` shares it. Other tensors (a direct call of the op, a Parameter assigned later) are
also compared with a copy kept with them, which reads the filters on every call."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

_grouped_weights: dict[int, tuple] = {}  # id(lego) -> (weak reference, key, copy, repeated)


class WatchedFilters(nn.Parameter):
    """A Parameter whose ``.data`` is ``detach()``: the same storage and the same version
    counter, so writes through it are seen as in-place writes (plain ``.data`` gets a counter of
    its own). Assigning ``.data`` (``.to()``, ``.double()``) keeps the class."""

    @property
    def data(self) -> Tensor:
        return self.detach()

    @data.setter
    def data(self, value: Tensor) -> None:
        torch.Tensor.data.__set__(self, value)

    def __reduce_ex__(self, proto):  # a pickled model comes back watched
        return _rebuild_watched, (self.detach(), self.requires_grad)


def _rebuild_watched(data: Tensor, requires_grad: bool) -> WatchedFilters:
    return WatchedFilters(data, requires_grad)


def grouped_weight(lego: Tensor, o: int) -> Tensor:
    """The Lego filters repeated ``o`` times (channels-last, as oneDNN takes them), for one conv
    with ``groups=o``. Made once and kept while ``lego`` lives and is unchanged (same storage,
    same version counter and, for tensors other than :class:`WatchedFilters`, the same values as
    a copy kept with it): making it on every call costs a repeat and a layout change per layer
    (docs/performance.md has the measurement)."""
    try:
        key = (lego.data_ptr(), lego._version, o)
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return lego.repeat(o, 1, 1, 1)
    watched = isinstance(lego, WatchedFilters)
    kept = _grouped_weights.get(id(lego))
    alive = kept is not None and kept[0]() is lego  # not a dead tensor's reused id
    if not alive:
        weakref.finalize(lego, _grouped_weights.pop, id(lego), None)
    if not alive or kept[1] != key or not (watched or torch.equal(kept[2], lego)):
        copy = None if watched else lego.detach().clone()
        repeated = lego.detach().repeat(o, 1, 1, 1).contiguous(memory_format=torch.channels_last)
        kept = _grouped_weights[id(lego)] = (weakref.ref(lego), key, copy, repeated)
    return kept[3]


def forget_grouped_weights() -> None:
    """Drop every kept repeated copy of Lego filters (they are made again on the next call)."""
    _grouped_weights.clear()
