"""Structured Convolutions (Bhalgat et al., NeurIPS 2020): ``legofx.structure``."""

from legofx.methods.structured import layers as _layers  # noqa: F401  (registers lowerings)
