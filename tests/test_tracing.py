"""Tracing that does not give up: leaves, untraceable roots, mode-dependent code, defaults."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import legofx
from helpers import TOL64, assert_unchanged, randomize_lego, relative_error, snapshot
from legofx.core.records import stored_meta


def conv(c_in=4, c_out=4):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing fails inside this module."""

    def __init__(self):
        super().__init__()
        self.conv, self.other = conv(), conv()

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return self.other(x)


class Reads(nn.Module):
    """Untraceable, and reads its child conv's weight directly."""

    def __init__(self):
        super().__init__()
        self.conv = conv()
        self.scale = 2.0

    def forward(self, x):
        if x.shape[-1] > 100 and x.sum() > 0:
            return x
        return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1) * self.scale


class Sub(nn.Module):
    """Traceable on its own; its eager parent reads a plain attribute of it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv(), nn.ReLU(), conv())
        self.factor = 3

    def forward(self, x):
        return self.body(x)


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub, self.head = Sub(), conv()

    def forward(self, x):
        for _ in range(int(x.shape[0])):  # fine eagerly, untraceable on a proxy
            x = x * 1
        return self.head(self.sub(x) * self.sub.factor)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gate, self.reads, self.parent = conv(), Gate(), Reads(), Parent()

    def forward(self, x):
        return self.parent(self.reads(self.gate(self.stem(x))))


def check_equivalence(model, x):
    before = snapshot(model)
    gm = legofx.transform(model, o=2, m=2)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    gm.eval()
    folded = legofx.fold(gm)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= TOL64
    assert_unchanged(model, before)
    return gm, folded


def test_failing_modules_become_leaves_and_their_convs_are_rewritten():
    model, x = Net().double().eval(), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    gm, folded = check_equivalence(model, x)
    assert isinstance(gm, fx.GraphModule)
    where = {r.name: r.where for r in legofx.summary(gm)}
    assert where == {"stem": "graph", "gate.conv": "module", "gate.other": "module",
                     "reads.conv": "module", "parent.sub.body.0": "leaf",
                     "parent.sub.body.2": "leaf", "parent.head": "module"}
    untraced = stored_meta(gm)["untraced"]
    assert set(untraced) == {"gate", "reads", "parent"}
    assert "TraceError" in untraced["gate"] and "test_tracing.py" in untraced["gate"]
    text = legofx.report(folded, x)
    assert "rewritten 7 (graph 1, leaf 2, module 4)" in text
    assert "gate: TraceError" in text


def test_untraceable_root_is_rewritten_at_module_level():
    model, x = Gate().double().eval(), torch.randn(1, 4, 6, 6, dtype=torch.float64)
    gm, folded = check_equivalence(model, x)
    assert type(gm) is Gate and type(folded) is Gate
    assert [r.where for r in legofx.summary(gm)] == ["module", "module"]
    assert "<root>" in stored_meta(gm)["untraced"]
    assert "layers: 2 found" in legofx.report(folded, x)
    with torch.no_grad():  # both branches of the data-dependent control flow still work
        assert relative_error(folded(-x.abs()), gm(-x.abs())) <= TOL64


def test_weight_read_by_eager_code_is_the_reconstructed_weight():
    model, x = Reads().double().eval(), torch.randn(1, 4, 6, 6, dtype=torch.float64)
    gm, _ = check_equivalence(model, x)
    layer = gm.conv
    with torch.no_grad():
        expected = F.conv2d(x, layer.reconstruct_weight(), layer.bias, padding=1) * 2
        assert relative_error(gm(x), expected) <= TOL64
    gm.train()
    gm(x).sum().backward()
    assert layer.proxy.grad is not None and layer.proxy.grad.abs().sum() > 0


class DropPath(nn.Module):
    """Stochastic depth as timm and torchvision write it: code that branches on training."""

    def forward(self, x):
        if not self.training:
            return x
        return x * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.5) / 0.5


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.drop = conv(), DropPath()

    def forward(self, x):
        return x + self.drop(self.conv(x))


def test_code_that_depends_on_training_mode_is_not_frozen_in_one_mode():
    model = nn.Sequential(Residual(), Residual()).train()  # traced in train mode
    x = torch.randn(4, 4, 6, 6)
    gm = legofx.transform(model, o=2, m=2)
    untraced = stored_meta(gm)["untraced"]
    assert "self.training" in untraced["0.drop"]
    gm.eval()
    with torch.no_grad():  # eval: no stochastic depth, so deterministic and equal to fold
        assert torch.equal(gm(x), gm(x))
        assert relative_error(legofx.fold(gm)(x), gm(x)) <= 1e-6
    gm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))  # train: stochastic depth still active


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv()

    def forward(self, x, mask=None, scale: float = 1.0):
        if mask is not None:
            x = x * mask
        return self.conv(x) * scale


def test_arguments_with_defaults_keep_their_effect():
    """A trace would fix ``mask=None`` and ``scale=1.0``: the model stays eager, its conv is
    rewritten at module level, and every call computes what the original computes."""
    model, x = Masked().double().eval(), torch.randn(1, 4, 5, 5, dtype=torch.float64)
    gm = legofx.transform(model, o=2, m=2)
    assert [r.where for r in legofx.summary(gm)] == ["module"]
    assert "mask=None, scale=1.0" in stored_meta(gm)["untraced"]["<root>"]
    randomize_lego(gm, torch.Generator().manual_seed(0))
    folded = legofx.fold(gm.eval())
    mask = torch.rand_like(x)
    layer = gm.get_submodule("conv")
    expected = F.conv2d(x * mask, layer.weight, layer.bias, padding=1) * 2.0
    for form in (gm, folded):
        assert relative_error(form(x, mask, scale=2.0), expected) <= TOL64


def test_traced_subtree_survives_deepcopy_with_its_attribute_fallback():
    import copy

    gm = legofx.transform(Parent().eval(), o=2, m=2)
    sub = gm.sub
    assert isinstance(sub, fx.GraphModule) and sub.factor == 3
    assert copy.deepcopy(sub).factor == 3
    assert "factor" not in dict(sub.named_buffers()) and not any(
        name.startswith("_legofx") for name, _ in gm.named_modules())


class ReadsWeightMetadata(nn.Module):
    """Reads only the dtype and device of a conv's weight, as timm's EdgeNeXt does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.conv(x.to(dtype=self.conv.weight.dtype, device=self.conv.weight.device))


def test_a_conv_whose_weight_metadata_is_read_is_rewritten():
    net = ReadsWeightMetadata().double()
    gm = legofx.transform(net, o=2, m=3)
    record, = legofx.summary(gm)
    assert record.rewritten, record.reason
    x = torch.randn(2, 4, 5, 5)  # float32 in, float64 out: the dtype read still works
    folded = legofx.fold(gm.eval())
    assert folded(x).dtype == torch.float64
    assert torch.allclose(folded(x), gm(x), rtol=0, atol=1e-12)


class MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, mask=None):
        y = self.conv(x)
        return y if mask is None else y * mask


class PassesMask(nn.Module):
    """An untraceable root that calls its child with a tensor for an argument that defaults to
    None (as timm's Gemma-4 and DINOv3 ViTs pass attn_mask / rope)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = MaskedBlock()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace the root
            x = -x
        return self.block(x, mask=(x > 0).to(x.dtype))


def test_child_called_with_an_optional_argument_is_not_traced_with_it_fixed():
    net = PassesMask().double()
    gm = legofx.transform(net, o=2, m=2)
    record, = legofx.summary(gm)
    assert record.rewritten and record.where == "module"
    assert "its forward takes mask=None" in stored_meta(gm)["untraced"]["block"]
    randomize_lego(gm, torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layer = gm.get_submodule("block.conv")
    mask = (x > 0 if x.sum() <= 0 else -x > 0).double()
    expected = F.conv2d(-x if x.sum() > 0 else x, layer.weight, layer.bias, padding=1) * mask
    assert relative_error(gm(x), expected) <= TOL64
    assert relative_error(legofx.fold(gm.eval())(x), expected) <= TOL64
