"""Property 2: gradients of the training form equal those of the reconstructed-weight conv,
and the proxy receives the gradient of the one-hot selection M (straight-through)."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import legofx
from legofx.methods.lego.layers import selection_onehot
from helpers import TOL64, conv_with, lego_layers, randomize_lego, reference_merge_weight
from legofx.testing import conv_cases


def close(a, b):
    return (a - b).norm() <= TOL64 * max(1.0, b.norm().item())


@given(case=conv_cases())
def test_gradients_match_reconstructed_conv(case):
    gm = legofx.transform(nn.Sequential(case.conv), o=case.o, m=case.m)
    randomize_lego(gm, torch.Generator().manual_seed(1))
    layer = lego_layers(gm)["0"]
    upstream = torch.randn_like(case.conv(case.x))

    (gm(case.x) * upstream).sum().backward()

    lego = layer.lego.detach().clone().requires_grad_()
    coef = layer.coef.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    onehot = F.one_hot(layer.proxy.argmax(-1), layer.m).double().requires_grad_()
    weight = reference_merge_weight(lego, onehot, coef)
    (conv_with(case.conv, case.x, weight, bias) * upstream).sum().backward()

    assert close(layer.lego.grad, lego.grad)
    assert close(layer.coef.grad, coef.grad)
    assert close(layer.proxy.grad, onehot.grad)
    if bias is not None:
        assert close(layer.bias.grad, bias.grad)


def test_straight_through_survives_fx_and_export():
    """The estimator is plain tensor ops: proxies get gradients through a traced and an
    exported training form (an autograd.Function's backward would be dropped by tracing)."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    gm = legofx.transform(model, o=2, m=0.5)
    x = torch.randn(2, 4, 9, 9)
    exported = torch.export.export(gm.train(), (x,)).module()
    for module in (gm, torch.fx.symbolic_trace(gm), exported):
        module.zero_grad()
        module(x).square().sum().backward()
        proxies = [p for name, p in module.named_parameters() if name.endswith("proxy")]
        assert len(proxies) == 2
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proxies)


@given(scale=st.sampled_from([1e-30, 1e-3, 0.3, 1.0, 7.0, 1e12]))
def test_selection_is_exactly_one_hot_in_forward(scale):
    """``hard + (proxy - proxy.detach())`` must equal the one-hot bit for bit, whatever the
    proxy's scale (``hard - proxy.detach() + proxy`` would not)."""
    proxy = torch.randn(16, 3, 5, generator=torch.Generator().manual_seed(0)) * scale
    onehot = selection_onehot(proxy.requires_grad_(), 5, torch.zeros(16, 3, 5))
    assert torch.equal(onehot, F.one_hot(proxy.argmax(-1), 5).float())


def test_stages_are_explicit_nodes():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(4, 8, 3)), o=2, m=3)
    roles = {n.meta["legofx_region"]["role"] for n in gm.graph.nodes if "legofx_region" in n.meta}
    assert {"split", "lego_conv", "select", "merge"} <= roles
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
