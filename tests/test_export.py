"""Folded graphs export with torch.export to plain convolution / index_select / mul / sum /
view / add, plus whatever ops the untouched layers had."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import TOL64, randomize_lego, relative_error
from legofx.testing import networks

MERGE_OPS = {"aten.index_select.default", "aten.mul.Tensor", "aten.sum.dim_IntList",
             "aten.view.default", "aten.reshape.default", "aten.add.Tensor",
             "aten.convolution.default"}


def core_ops(model, x):
    program = torch.export.export(model, (x,)).run_decompositions()
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    return program, ops


@given(data=st.data())
@settings(max_examples=10)
def test_folded_networks_export_to_allowed_ops(data):
    net, x = data.draw(networks(data_dependent=False))  # torch.export needs no data-dependent branches
    gm = legofx.transform(net, o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(5))
    folded = legofx.fold(gm.eval())
    _, original = core_ops(net, x)
    program, ops = core_ops(folded, x)
    assert ops <= original | MERGE_OPS, ops - original - MERGE_OPS
    with torch.no_grad():
        assert relative_error(program.module()(x), folded(x)) <= TOL64


def test_training_form_ops_are_gone_after_fold():
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False))
    x = torch.randn(2, 4, 10, 10)
    gm = legofx.transform(net, o=2, m=0.5)
    _, training = core_ops(gm.eval(), x)
    assert {"aten.argmax.default"} <= training  # the check below can see selection ops
    _, folded = core_ops(legofx.fold(gm), x)
    assert folded == {"aten.convolution.default", "aten.index_select.default",
                      "aten.mul.Tensor", "aten.sum.dim_IntList", "aten.view.default",
                      "aten.add.Tensor", "aten.relu.default"}


def test_folded_model_exports_with_a_dynamic_batch():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    folded = legofx.fold(legofx.transform(net).eval())
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(folded, (torch.randn(2, 4, 6, 6),),
                                  dynamic_shapes=({0: batch},))
    x = torch.randn(5, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), folded(x), rtol=1e-5, atol=1e-6)
