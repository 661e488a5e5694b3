"""The generic passes, on a toy layer that knows nothing of LegoNet."""

import pytest
import torch
import torch.fx as fx
from torch import nn

from legofx import passes
from contextlib import nullcontext


def _no_stage_for_tests(role):
    return nullcontext()


class ScaleShift(nn.Module):
    """A layer in the ``compute(x, attr, stage)`` protocol."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.shift = None

    def compute(self, x, attr, stage):
        with stage("scale"):
            y = x * attr("scale")
        with stage("shift"):
            return y + 1 if attr("shift") is None else y + attr("shift")

    def forward(self, x):
        return self.compute(x, lambda name: getattr(self, name), _no_stage_for_tests)


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, module, name):
        return isinstance(module, ScaleShift) or super().is_leaf_module(module, name)


def traced(model):
    return fx.GraphModule(model, LeafTracer().trace(model))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ScaleShift(), nn.ReLU()

    def forward(self, x):
        return self.a(self.b(self.a(x)))


def test_inline_then_collapse_round_trip():
    gm = traced(Net())
    x = torch.randn(5)
    expected = gm(x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "b", "a"]
    passes.inline_modules(gm, lambda name, module: isinstance(module, ScaleShift))
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "a"]
    tags = [passes.region_of(n) for n in gm.graph.nodes if passes.region_of(n)]
    assert {t["role"] for t in tags} == {"scale", "shift"}
    assert {t["call"] for t in tags} == {"a", "a_1"} and {t["layer"] for t in tags} == {"a"}
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["a.scale", "a.scale"]
    assert any(n.name == "a_scale" for n in gm.graph.nodes)
    assert torch.equal(gm(x), expected)
    passes.collapse_regions(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "b", "a"]
    assert torch.equal(gm(x), expected)


def test_collapse_refuses_a_region_edited_by_hand():
    gm = passes.inline_modules(traced(Net()), lambda n, m: n == "a")
    scaled = next(n for n in gm.graph.nodes if (passes.region_of(n) or {}).get("role") == "scale")
    with gm.graph.inserting_after(scaled):
        leak = gm.graph.call_function(torch.neg, (scaled,))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], leak),)
    with pytest.raises(ValueError, match="one input and one output"):
        passes.collapse_regions(gm)


def test_swap_and_module_uses():
    gm = traced(Net())
    uses = {u.name: u for u in passes.module_uses(gm, ["a", "b", "missing"])}
    assert len(uses["a"].calls) == 2 and len(uses["b"].calls) == 1
    assert uses["missing"].module is None and not uses["missing"].calls
    passes.swap_modules(gm, {"b": nn.Identity()})
    assert isinstance(gm.b, nn.Identity)
    with pytest.raises(AttributeError):
        passes.swap_modules(gm, {"c.d": nn.Identity()})
