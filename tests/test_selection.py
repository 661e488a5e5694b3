"""Which convs are rewritten, which are kept, and the reason given for each kept one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import legofx


def statuses(gm):
    return {r.name: (r.status, r.reason) for r in legofx.summary(gm)}


def test_paper_condition_and_math_requirements():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3),                 # 0: eligible
        nn.Conv2d(8, 9, 1),                 # 1: eligible (only in_channels must divide)
        nn.Conv2d(9, 6, 3, groups=3),       # 2: grouped and 9 % 2
        nn.Conv2d(6, 4, 1),                 # 3: m=6 > n=4
    )
    result = statuses(legofx.transform(model, o=2, m=6))
    assert result["0"] == ("rewritten", "")
    assert result["1"] == ("rewritten", "")
    assert result["2"][0] == "skipped"
    assert "groups=3: grouped convolutions are kept" in result["2"][1]
    assert "in_channels=9 is not divisible by o=2" in result["2"][1]
    assert result["3"] == ("skipped", "m=6 exceeds out_channels n=4")


def test_include_and_exclude_patterns():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.downsample = nn.Sequential(nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return self.conv2(self.conv1(x)) + self.downsample(x)

    model = nn.Sequential()
    model.add_module("layer1", Block())
    model.add_module("layer2", Block())
    rewritten = lambda gm: sorted(r.name for r in legofx.summary(gm) if r.rewritten)  # noqa: E731

    assert rewritten(legofx.transform(model, include="layer1.*")) == [
        "layer1.conv1", "layer1.conv2", "layer1.downsample.0"]
    assert rewritten(legofx.transform(model, include="layer1")) == [
        "layer1.conv1", "layer1.conv2", "layer1.downsample.0"]
    assert rewritten(legofx.transform(model, exclude="*.downsample.0")) == [
        "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"]
    gm = legofx.transform(model, include=["layer2.conv1", "layer1"], exclude="layer1.conv2")
    assert rewritten(gm) == ["layer1.conv1", "layer1.downsample.0", "layer2.conv1"]
    reasons = statuses(gm)
    assert reasons["layer1.conv2"][1] == "excluded by exclude pattern 'layer1.conv2'"
    assert reasons["layer2.conv2"][1].startswith("not selected by include=")


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.unused = nn.Conv2d(4, 4, 3)
        self.plain = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.plain(F.conv2d(x, self.conv.weight, self.conv.bias))


def test_weight_read_directly_and_unused_convs_are_explained():
    model = Functional()
    gm = legofx.transform(model)
    result = statuses(gm)
    assert result["plain"] == ("rewritten", "")
    assert result["conv"][0] == "skipped" and "reads its tensors directly" in result["conv"][1]
    assert "conv.weight" in result["conv"][1]
    assert result["unused"] == ("skipped", "never called by the traced forward (not in the graph)")
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(F.conv2d(x, model.conv.weight, model.conv.bias),
                       F.conv2d(x, gm.conv.weight, gm.conv.bias))


class SamePadConv(nn.Conv2d):
    """Like timm's Conv2dSame: its own forward computes padding from the input."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class TaggedConv(nn.Conv2d):
    """A subclass that adds nothing to the computation: safe to rewrite."""


def test_subclasses_hooks_parametrizations_lazy():
    hooked = nn.Conv2d(4, 4, 1)
    hooked.register_forward_hook(lambda mod, args, out: out * 2)
    model = nn.Sequential(SamePadConv(4, 4, 3), TaggedConv(4, 4, 3, padding=1), hooked,
                          parametrizations.weight_norm(nn.Conv2d(4, 4, 1)), nn.LazyConv2d(4, 1))
    result = statuses(legofx.transform(model))
    assert result["0"] == result["1"] == ("rewritten", "")  # "0" with a generated weight
    assert "hooks" in result["2"][1]
    assert "parametrized" in result["3"][1]
    assert "lazy" in result["4"][1]
    assert all(result[k][0] == "skipped" for k in "234")


def test_every_skipped_conv_has_a_reason_and_every_conv_a_record():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.googlenet(weights=None, init_weights=False, aux_logits=False)
    records = legofx.summary(legofx.transform(model, o=4, m=0.25))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [r.name for r in records] == convs
    assert all(r.reason for r in records if not r.rewritten)
    assert all(r.o == 4 and r.m >= 1 and not r.reason for r in records if r.rewritten)
    assert sum(r.rewritten for r in records) >= len(records) - 5
