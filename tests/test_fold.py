"""fold: constant-folds every selection into an int64 index; leaves its input alone."""

import copy
import warnings

import pytest
import torch
from torch import nn

import legofx
from helpers import lego_layers, randomize_lego
from legofx.methods.lego.layers import FoldedLegoConv2d


def model():
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, (1, 3), padding="same", padding_mode="circular"),
                         nn.Conv2d(6, 6, 3, groups=3))


def transformed():
    gm = legofx.transform(model(), o=2, m=3)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    return gm


def test_fold_does_not_modify_its_input():
    gm = transformed()
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    folded = legofx.fold(gm)
    with torch.no_grad():  # the folded copy shares no tensor with its input
        for tensor in [*folded.parameters(), *folded.buffers()]:
            tensor.add_(1)
    assert gm.code == code
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    assert len(lego_layers(gm)) == 2


def test_fold_is_idempotent():
    once = legofx.fold(transformed())
    twice = legofx.fold(once)
    assert twice.code == once.code
    assert once.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(v, twice.state_dict()[k]) for k, v in once.state_dict().items())
    assert twice is not once


def test_folded_graph_holds_constant_indices_and_no_selection_ops():
    gm = transformed()
    folded = legofx.fold(gm)
    layers = {n: m for n, m in folded.named_modules() if isinstance(m, FoldedLegoConv2d)}
    assert sorted(layers) == ["0", "3"]
    for name, layer in layers.items():
        trained = gm.get_submodule(name)
        assert layer.index.dtype == torch.int64
        assert layer.index.shape == (trained.out_channels * trained.o,)
        assert torch.equal(layer.selection(), trained.selection())
        assert torch.equal(layer.reconstruct_weight(), trained.reconstruct_weight())
    assert not [k for k in folded.state_dict() if k.endswith("proxy")]
    targets = {str(n.target) for n in folded.graph.nodes}
    assert not {t for t in targets if "argmax" in t or "one_hot" in t or "detach" in t}
    roles = {n.meta["legofx_region"]["role"] for n in folded.graph.nodes if "legofx_region" in n.meta}
    assert roles == {"split", "lego_conv", "merge"}
    assert any(n.target == "index_select" for n in folded.graph.nodes)
    assert [r.form for r in legofx.summary(folded)] == ["folded", "folded", "original"]
    assert [r.form for r in legofx.summary(gm)] == ["training", "training", "original"]


def test_fold_keeps_the_training_flag_and_works_without_rewrites():
    gm = transformed().train()
    with pytest.warns(UserWarning, match="training mode"):
        assert legofx.fold(gm).training
    untouched = legofx.transform(model(), o=2, m=3, include="4")  # the grouped conv only
    folded = legofx.fold(untouched)
    x = torch.randn(1, 4, 6, 6)
    untouched.eval(), folded.eval()
    assert torch.equal(untouched(x), folded(x))


@pytest.mark.parametrize("strategy", ["dense", "merge-conv", "gather"])
def test_a_folded_model_is_not_lowered_again_silently(strategy):
    folded = legofx.fold(transformed().eval())
    with pytest.raises(ValueError, match=rf"strategy='{strategy}': this model is already folded "
                                         r"\(gather.*fold the training-form model"):
        legofx.fold(folded, strategy)
    with pytest.raises(ValueError, match="strategy='no-such-strategy'"):
        legofx.fold(folded, "no-such-strategy")
    assert isinstance(legofx.fold(folded).get_submodule("0"), FoldedLegoConv2d)  # None: a copy


def test_fold_of_a_training_mode_model_warns():
    gm = transformed()
    with pytest.warns(UserWarning, match=r"training mode.*fold\(gm.eval\(\)\)"):
        assert legofx.fold(gm.train()).training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        legofx.fold(gm.eval())


def test_fold_of_a_model_on_the_meta_device_names_the_cause():
    gm = legofx.transform(model().to("meta"), o=2, m=3)
    with pytest.raises(ValueError, match=r"meta device \(no values: 0.lego.*load_state_dict"):
        legofx.fold(gm.eval())
