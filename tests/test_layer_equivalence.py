"""Property 1: one conv. Training form == conv with the reconstructed weight; fold == training."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import dense_equivalent, lego_layers, randomize_lego, relative_error, tolerance
from legofx.testing import conv_cases


def transformed(case, seed=0):
    gm = legofx.transform(nn.Sequential(case.conv), o=case.o, m=case.m)
    randomize_lego(gm, torch.Generator().manual_seed(seed))
    return gm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_training_form_equals_reconstructed_conv(dtype, data):
    case = data.draw(conv_cases(dtype=dtype))
    gm = transformed(case)
    layer = lego_layers(gm)["0"]
    assert [r.status for r in legofx.summary(gm)] == ["rewritten"]
    expected = dense_equivalent(case.conv, layer)(case.x)
    actual = gm(case.x)
    assert actual.shape == expected.shape == case.conv(case.x).shape
    assert relative_error(actual, expected) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_fold_equals_training_form(dtype, data):
    case = data.draw(conv_cases(dtype=dtype))
    gm = transformed(case).eval()
    folded = legofx.fold(gm)
    with torch.no_grad():
        assert relative_error(folded(case.x), gm(case.x)) <= tolerance(dtype)


@given(case=conv_cases())
def test_eager_layer_equals_inlined_graph(case):
    """The module's eager forward (used where a graph cannot be traced) == the graph's nodes."""
    gm = transformed(case)
    layer = lego_layers(gm)["0"]
    assert torch.equal(layer(case.x), gm(case.x))
    folded = legofx.fold(gm)
    assert torch.equal(folded.get_submodule("0")(case.x), folded(case.x))


@given(case=conv_cases(), fraction=st.sampled_from([0.01, 0.125, 0.25, 0.3, 0.5, 0.75, 1.0]))
def test_float_m_is_a_rounded_fraction_of_out_channels(case, fraction):
    gm = legofx.transform(nn.Sequential(case.conv), o=case.o, m=fraction)
    n = case.conv.out_channels
    expected = max(1, int(fraction * n + 0.5))
    assert lego_layers(gm)["0"].m == legofx.summary(gm)[0].m == expected
    assert lego_layers(gm)["0"].lego.shape == (expected, case.conv.in_channels // case.o,
                                                *case.conv.kernel_size)


def test_int_one_and_float_one_differ():
    conv = nn.Conv2d(4, 6, 3)
    assert legofx.summary(legofx.transform(nn.Sequential(conv), o=2, m=1))[0].m == 1
    assert legofx.summary(legofx.transform(nn.Sequential(conv), o=2, m=1.0))[0].m == 6
