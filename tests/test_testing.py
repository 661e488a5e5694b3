"""legofx.testing: what users get to property-test their own rewrites."""

import pytest
import torch
from hypothesis import given
from torch import nn

import legofx
from legofx.testing import (TOL32, TOL64, assert_equivalent, conv_cases, networks,
                            randomize_lego, tolerance)


@given(net_x=networks(data_dependent=False))
def test_the_documented_example_holds(net_x):
    net, x = net_x
    gm = legofx.transform(net, o=2, m=0.5)
    randomize_lego(gm)
    error = assert_equivalent(legofx.fold(gm.eval()), gm, x)
    assert 0 <= error <= TOL64


@given(case=conv_cases(dtype=torch.float32))
def test_conv_cases_draw_convs_legofx_rewrites(case):
    assert case.conv.in_channels % case.o == 0 and 1 <= case.m <= case.conv.out_channels
    gm = legofx.transform(nn.Sequential(case.conv), o=case.o, m=case.m)
    assert legofx.summary(gm)[0].status == "rewritten"
    assert case.conv(case.x).shape == gm(case.x).shape


def test_assert_equivalent_fails_on_a_different_function_and_says_by_how_much():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double()
    other = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double()
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    net.train(), other.eval()
    assert assert_equivalent(other, net, x) == 0.0  # both run in eval mode ...
    assert net.training and not other.training  # ... and get their flags back
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(AssertionError, match=r"output 0: relative error .* exceeds the tolerance 1e-12"):
        assert_equivalent(other, net, x)
    assert assert_equivalent(other, net, x, tol=1e-3) > 0


def test_assert_equivalent_compares_every_output_and_its_shape():
    pair = lambda x: (x, {"b": x * 2, "a": [x.sum()]})  # noqa: E731
    x = torch.randn(3, dtype=torch.float64)
    assert assert_equivalent(pair, pair, x) == 0.0
    with pytest.raises(AssertionError, match="output 1"):
        assert_equivalent(pair, lambda x: (x, {"b": x * 2, "a": [x.sum() + 1]}), x)
    with pytest.raises(AssertionError, match="shape"):
        assert_equivalent(lambda x: x, lambda x: x[:2], x)
    with pytest.raises(AssertionError, match="nan"):
        assert_equivalent(lambda x: x * float("nan"), lambda x: x, x)
    assert tolerance(torch.float64) == TOL64 and tolerance(torch.float32) == TOL32
