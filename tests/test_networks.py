"""Properties 3 and 4: generated networks (sequences, branches, residual adds, concat, pooling,
BN, a conv called twice)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import (
    TOL32, TOL64, assert_unchanged, lego_layers, randomize_lego, relative_error, snapshot,
)
from legofx.testing import networks


@given(data=st.data(), o=st.sampled_from([1, 2]), m=st.sampled_from([1, 2, 0.5, 1.0]))
def test_transform_fold_equivalence_and_untouched_input(data, o, m):
    net, x = data.draw(networks())
    before = snapshot(net)
    gm = legofx.transform(net, o=o, m=m)
    randomize_lego(gm, torch.Generator().manual_seed(2))
    gm.eval()
    folded = legofx.fold(gm)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= TOL64
    # one training step on the transformed copy must not reach the user's model
    gm.train()
    gm(x).square().mean().backward()
    with torch.no_grad():
        for parameter in gm.parameters():
            parameter -= 0.1 * parameter.grad if parameter.grad is not None else 0.0
            parameter += 1.0  # even parameters without gradient must be copies
    assert_unchanged(net, before)


@given(data=st.data())
@settings(max_examples=15)
def test_float32_networks_fold_within_tolerance(data):
    net, x = data.draw(networks(dtype=torch.float32))
    gm = legofx.transform(net, o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(3))
    gm.eval()
    with torch.no_grad():
        assert relative_error(legofx.fold(gm)(x), gm(x)) <= TOL32


@given(data=st.data())
def test_state_dict_round_trip(data):
    net, x = data.draw(networks())
    first = legofx.transform(net, o=2, m=0.5)
    randomize_lego(first, torch.Generator().manual_seed(4))
    second = legofx.transform(net, o=2, m=0.5)  # fresh random initialisation
    second.load_state_dict(first.state_dict())
    first.eval(), second.eval()
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
        assert torch.equal(legofx.fold(first)(x), legofx.fold(second)(x))


@given(data=st.data())
def test_identity_lego_reproduces_original(data):
    """o=1, m=1.0, Lego filters = the original weights, identity selection, unit coefficients:
    the training form computes the original network (stride, padding, dilation, bias and padding
    modes are wired right)."""
    net, x = data.draw(networks())
    gm = legofx.transform(net, o=1, m=1.0)
    originals = dict(net.named_modules())
    with torch.no_grad():
        for name, layer in lego_layers(gm).items():
            n = layer.out_channels
            layer.lego.copy_(originals[name].weight)
            layer.proxy.copy_(torch.eye(n, dtype=layer.proxy.dtype).view(n, 1, n))
            layer.coef.fill_(1.0)
    with torch.no_grad():
        expected = net(x)
        assert relative_error(gm.eval()(x), expected) <= TOL64
        assert relative_error(legofx.fold(gm)(x), expected) <= TOL64


def test_conv_called_twice_is_rewritten_once_and_shares_parameters():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    gm = legofx.transform(Twice(), o=2, m=2)
    assert list(lego_layers(gm)) == ["conv"]
    record, = legofx.summary(gm)
    assert record.calls == 2 and record.status == "rewritten"
    calls = {n.meta["legofx_region"]["call"] for n in gm.graph.nodes if "legofx_region" in n.meta}
    assert len(calls) == 2
    reads = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert reads.count("conv.lego") == 2
    assert sorted(k for k, _ in gm.named_parameters()) == ["conv.bias", "conv.coef", "conv.lego", "conv.proxy"]
    assert sorted(k for k, _ in gm.named_buffers()) == ["conv.frozen_selection"]
