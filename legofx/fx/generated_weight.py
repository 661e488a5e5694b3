"""Rewrite convs whose own ``forward`` legofx cannot reproduce, by generating their weight.

timm's ``Conv2dSame`` pads from the input size, ``StdConv2d`` / ``ScaledStdConv2d`` standardise
their weight, and so on: their math cannot be split into fragments, but it only ever reads
``self.weight``. Such a module keeps its class and ``forward``; its ``weight`` parameter is
replaced by a property that a rewritten layer (the *generator*, e.g. a ``LegoConv2d``)
computes from its own parameters. Training then learns Lego filters, selection and
coefficients through the module's own code; the inference form computes the dense weight from
the folded generator (constant inputs, which exporters fold) and runs the module's own conv.
It stores the compressed parameters but runs as fast as the original layer, no faster.
"""

from __future__ import annotations

from torch import Tensor, nn

from legofx.core.layer import RewrittenLayer

_CLASSES: dict[type, type] = {}


class GeneratedWeight(RewrittenLayer):
    """Mixed in *after* a conv subclass, so that the subclass's ``forward`` runs."""

    inline = False  # no compute() to expand into graph nodes: it is called as a module
    lowering = "generated weight"

    @property
    def weight(self) -> Tensor:
        return self.generator.weight

    @property
    def form(self) -> str:
        return self.generator.form

    @property
    def params_before(self) -> int:
        return self.generator.params_before + self._own_params

    @property
    def params_after(self) -> int:
        return self.generator.params_after + self._own_params

    @property
    def _own_params(self) -> int:
        return sum(p.numel() for p in self._parameters.values() if p is not None)

    def macs(self, output_shape) -> tuple[int, int]:
        dense, _ = self.generator.macs(output_shape)
        return dense, dense

    def folded(self) -> GeneratedWeight:
        if self.form == "folded":
            return self
        return _assemble(self, self.generator.folded())


def generated_class(kind: type) -> type:
    """``Generated<Kind>``: ``kind`` with its ``weight`` generated (one class per kind)."""
    if kind not in _CLASSES:
        _CLASSES[kind] = type(f"Generated{kind.__name__}", (kind, GeneratedWeight),
                              {"__module__": __name__})
    return _CLASSES[kind]


def _assemble(module: nn.Module, generator: RewrittenLayer) -> GeneratedWeight:
    kind = type(module) if isinstance(module, GeneratedWeight) else generated_class(type(module))
    new = kind.__new__(kind)
    new.__dict__.update(module.__dict__)
    new._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
    new._buffers = dict(module._buffers)
    new._modules = {**module._modules, "generator": generator}
    return new


def with_generated_weight(module: nn.Module, generator: RewrittenLayer) -> GeneratedWeight:
    """A copy of ``module`` (same class, same ``forward``) whose weight ``generator`` makes.

    The module keeps its own bias and other parameters; the generator's bias is dropped.
    """
    if not isinstance(getattr(type(generator), "weight", None), property):
        raise TypeError(f"{type(generator).__name__} cannot generate a weight")
    generator.bias = None
    return _assemble(module, generator)
