"""The ``"accumulate"`` lowering of a Lego layer: the gather merge with fewer memory passes.

Same tensors and the same function as the ``"gather"`` lowering
(:class:`~legofx.methods.lego.layers.FoldedLegoConv2d`, whose state_dict it shares), but the
merge (:func:`~legofx.methods.lego.layers.merge_accumulated`) is written for eager PyTorch,
where every op is one pass over memory and every new large tensor is a fresh allocation: it
holds the output and one fragment's ``n`` maps at a time, about 9 passes over ``n`` maps for
``o=2`` instead of the gather's 13 (docs/performance.md has the measurements). Under
``torch.export`` it adds ``select`` and ``addcmul`` to the gather's ops, which is why it is
not the default.
"""

from __future__ import annotations

import torch

from legofx.core.arguments import check_index_dtype
from legofx.lowering.registry import register_lowering
from legofx.methods.lego.layers import FoldedLegoConv2d, LegoConv2d, merge_accumulated


class AccumulateLegoConv2d(FoldedLegoConv2d):
    """Inference form with ``lego``, ``coef``, ``bias`` and ``index`` as in the gather form."""

    lowering = "accumulate (index_select, in-place mul / addcmul per fragment)"

    def compute(self, x, attr, stage):
        maps = self._maps(x, attr, stage)
        with stage("merge"):
            return merge_accumulated(maps, self._index(attr), attr("coef"), attr("bias"),
                                     self.out_channels, self.o)


@register_lowering(LegoConv2d, "accumulate")
def accumulate_lowering(layer: LegoConv2d, index_dtype: torch.dtype | str = torch.int64,
                        **options) -> AccumulateLegoConv2d:
    return AccumulateLegoConv2d(layer, check_index_dtype(index_dtype, layer.o * layer.m - 1))
