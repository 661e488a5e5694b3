"""Property 5: every bad argument raises the documented error, naming argument and value."""

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import legofx

MODEL = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))


@pytest.mark.parametrize("o, error", [
    (0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError), ("2", TypeError),
    (None, TypeError), (1.5, TypeError),
])
def test_bad_o(o, error):
    with pytest.raises(error, match=re.escape(f"o={o!r}")):
        legofx.transform(MODEL, o=o, m=0.5)


@pytest.mark.parametrize("m, error", [
    (0, ValueError), (-1, ValueError), (0.0, ValueError), (1.5, ValueError), (-0.5, ValueError),
    (math.nan, ValueError), (math.inf, ValueError), (True, TypeError), ("0.5", TypeError),
    (None, TypeError), ([2], TypeError),
])
def test_bad_m(m, error):
    with pytest.raises(error, match=re.escape(f"m={m!r}")):
        legofx.transform(MODEL, o=2, m=m)


@given(o=st.integers(max_value=0))
def test_any_non_positive_o_is_refused(o):
    with pytest.raises(ValueError, match=f"o={o}"):
        legofx.transform(MODEL, o=o)


@given(m=st.floats().filter(lambda v: not 0 < v <= 1))
def test_any_float_m_outside_unit_interval_is_refused(m):
    with pytest.raises(ValueError, match="m="):
        legofx.transform(MODEL, m=m)


@pytest.mark.parametrize("model", [None, "resnet18", [nn.Conv2d(1, 1, 1)], torch.zeros(1), nn.Conv2d])
def test_non_module_model(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        legofx.transform(model)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"include": 3}, TypeError, "include"),
    ({"exclude": [1, 2]}, TypeError, "exclude"),
    ({"include": "nothing.*"}, ValueError, "include pattern 'nothing.\\*' matches no Conv2d"),
    ({"exclude": ["0", "typo"]}, ValueError, "exclude pattern 'typo' matches no Conv2d"),
])
def test_bad_patterns(kwargs, error, match):
    with pytest.raises(error, match=match):
        legofx.transform(MODEL, **kwargs)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    gm = legofx.transform(MODEL, o=np.int64(2), m=np.int32(4))
    assert [r.m for r in legofx.summary(gm)] == [4, 4]


@pytest.mark.parametrize("call", [legofx.fold, legofx.summary, legofx.report])
def test_functions_refuse_models_legofx_did_not_make(call):
    with pytest.raises(ValueError, match="legofx.transform"):
        call(torch.fx.symbolic_trace(MODEL))
    with pytest.raises(ValueError, match="legofx.transform"):
        call(MODEL)


def test_report_refuses_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        legofx.report(legofx.transform(MODEL), example_inputs="image")
