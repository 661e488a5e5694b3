"""The rewriting methods: :mod:`legofx.methods.lego` (LegoNet) and
:mod:`legofx.methods.structured` (Structured Convolutions). Each adds its layers, lowerings
and absorbers through :mod:`legofx.lowering.registry`; neither imports the other."""
