"""The ``grouped`` / ``grouped-gather`` lowerings (ONNX Runtime forms) and ``by_macs``."""

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx.lowering.by_macs import by_macs, mac_ratio
from legofx.methods.lego.lowerings.grouped import (CompactGroupedLegoConv2d, GroupedGatherLegoConv2d,
                                                 GroupedLegoConv2d, blocked)
from legofx.testing import conv_cases

KINDS = {"grouped": GroupedLegoConv2d, "grouped-compact": CompactGroupedLegoConv2d,
         "grouped-gather": GroupedGatherLegoConv2d}


def transformed(case, seed=0):
    gm = legofx.transform(nn.Sequential(case.conv), o=case.o, m=case.m)
    randomize_lego(gm, torch.Generator().manual_seed(seed))
    return gm.eval()


@pytest.mark.parametrize("strategy", list(KINDS))
@given(case=conv_cases(dtype=torch.float64))
def test_grouped_lowerings_equal_the_training_form(strategy, case):
    gm = transformed(case)
    folded = legofx.fold(gm, strategy)
    layer = folded.get_submodule("0")
    assert type(layer) is KINDS[strategy]
    assert torch.allclose(layer.weight, gm.get_submodule("0").reconstruct_weight(),
                          rtol=0, atol=tolerance(torch.float64))
    with torch.no_grad():
        assert relative_error(folded(case.x), gm(case.x)) <= tolerance(torch.float64)
        assert torch.equal(layer(case.x), folded(case.x))  # eager module == inlined graph


@pytest.mark.parametrize("strategy", list(KINDS))
@settings(max_examples=20)
@given(case=conv_cases(dtype=torch.float64))
def test_grouped_lowerings_take_a_following_batchnorm(strategy, case):
    bn = nn.BatchNorm2d(case.conv.out_channels, dtype=torch.float64).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    gm = legofx.transform(nn.Sequential(case.conv, bn), o=case.o, m=case.m)
    randomize_lego(gm, torch.Generator().manual_seed(1))
    gm.eval()
    folded = legofx.fold(gm, strategy, fuse_batchnorm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert relative_error(folded(case.x), gm(case.x)) <= tolerance(torch.float64)


def test_grouped_stores_the_lego_filters_once_per_fragment_and_counts_its_macs():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4).eval()
    layer = legofx.fold(gm, "grouped").get_submodule("0")
    assert layer.lego.shape == (8, 4, 3, 3)  # o*m filters of c/o channels
    assert legofx.summary(legofx.fold(gm, "grouped"))[0].params_after == 8 * 4 * 9 + 16 * 8 + 16
    dense, lego = layer.macs((1, 16, 1, 1))
    assert (dense, lego) == (16 * 8 * 9, 4 * 8 * 9 + 16 * 2 * 4)


def test_by_macs_keeps_the_lowering_only_where_it_needs_few_enough_macs():
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1))
    gm = legofx.transform(net, o=2, m=0.5).eval()
    ratios = {name: mac_ratio(gm.get_submodule(name), "grouped") for name in ("0", "1", "2")}
    assert ratios["0"] == pytest.approx((32 * 64 * 9 + 64 * 2 * 32) / (64 * 64 * 9))
    assert ratios["1"] == pytest.approx((8 * 64 + 16 * 2 * 8) / (16 * 64))  # 0.75: pays
    assert ratios["2"] > 1  # a widening 1x1: the merge costs more than the conv saves
    assert by_macs(gm, "grouped") == {"0": "grouped", "1": "grouped", "2": "dense"}
    assert by_macs(gm, "grouped", keep_below=0.7) == {"0": "grouped", "1": "dense", "2": "dense"}


def test_by_macs_where_keeps_unblocked_grouped_convs_dense():
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 16, 3), nn.Conv2d(16, 32, 3))
    gm = legofx.transform(net, o=2, m=0.5).eval()
    # c/o = 32, 32, 8 and m = 32, 8, 16: only the first is in ONNX Runtime's 16-channel blocks
    assert [blocked(gm.get_submodule(name)) for name in "012"] == [True, False, False]
    assert [blocked(gm.get_submodule(name), 8) for name in "012"] == [True, True, True]
    assert by_macs(gm, "grouped", where=blocked) == {"0": "grouped", "1": "dense", "2": "dense"}
