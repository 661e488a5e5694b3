"""The Lego layer's inference forms besides ``gather`` (:class:`~legofx.methods.lego.layers.FoldedLegoConv2d`):
``accumulate``, ``merge-conv`` and ``fused``."""
