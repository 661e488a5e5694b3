"""From training form to inference form: the registry of lowerings and absorbers each method
fills (:mod:`legofx.lowering.registry`), ``fold`` (:mod:`legofx.lowering.fold`), the timed
choice of ``strategy="auto"`` (:mod:`legofx.lowering.auto`), and the method-agnostic ``dense``
lowering and BatchNorm absorption. Knows no method and no deploy backend: backends register
how to prepare a layer for timing."""
