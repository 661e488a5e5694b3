"""balance_loss, freeze_selection and init="weights"."""

import math

import pytest
import torch
from torch import nn

import legofx
from helpers import TOL64, lego_layers, relative_error
from legofx.methods.lego.init import fit_lego
from legofx.methods.lego.training import usage


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3)).double()


def test_balance_loss_counts_selections_outside_the_fair_band_and_pushes_them():
    gm = legofx.transform(net(), o=2, m=5)
    layer = lego_layers(gm)["0"]
    assert legofx.balance_loss(gm).item() == 0  # the start is balanced
    with torch.no_grad():  # every (channel, fragment) of layer 0 picks filter 0
        layer.proxy.zero_()
        layer.proxy[..., 0] = 1.0
    share = 12 * 2 / 5  # 4.8: band [4, 5]
    assert usage(layer).tolist() == [24, 0, 0, 0, 0]
    assert legofx.balance_loss(gm).item() == pytest.approx((24 - math.ceil(share)) + 4 * math.floor(share))
    legofx.balance_loss(gm).backward()
    grad = layer.proxy.grad
    assert torch.all(grad[..., 0] == 1) and torch.all(grad[..., 1:] == -1)
    assert torch.all(lego_layers(gm)["2"].proxy.grad == 0)  # balanced layer: no push


def test_freeze_selection_fixes_the_selection_and_zeroes_proxy_gradients():
    gm = legofx.transform(net(), o=2, m=5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    optimizer = torch.optim.SGD(gm.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    gm(x).square().mean().backward()
    optimizer.step()
    before = {n: l.selection() for n, l in lego_layers(gm).items()}
    assert legofx.freeze_selection(gm) == 2
    lego_before = lego_layers(gm)["0"].lego.detach().clone()
    with torch.no_grad():  # even if the proxies are moved by hand, the selection stays
        for layer in lego_layers(gm).values():
            layer.proxy.add_(torch.randn_like(layer.proxy) * 10)
    for _ in range(3):
        optimizer.zero_grad()
        (gm(x).square().mean() + legofx.balance_loss(gm)).backward()
        assert all(torch.all(l.proxy.grad == 0) for l in lego_layers(gm).values())
        optimizer.step()
    assert all(torch.equal(l.selection(), before[n]) for n, l in lego_layers(gm).items())
    assert not torch.equal(lego_layers(gm)["0"].lego, lego_before)  # B keeps training
    folded = legofx.fold(gm.eval())
    assert torch.equal(folded.get_submodule("0").selection(), before["0"])
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= TOL64
    legofx.unfreeze_selection(gm)
    assert not torch.equal(lego_layers(gm)["0"].selection(), before["0"])


def test_training_aids_refuse_models_without_lego_layers():
    with pytest.raises(ValueError, match="no training-form Lego layers"):
        legofx.balance_loss(net())
    with pytest.raises(ValueError, match="no training-form Lego layers"):
        legofx.freeze_selection(legofx.fold(legofx.transform(net())))


def test_init_from_weights_is_exact_for_one_fragment_and_all_filters():
    model = net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    gm = legofx.transform(model, o=1, m=1.0, init="weights")
    assert all(r.extra["init_error"] < 1e-12 for r in legofx.summary(gm))
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= TOL64
        assert relative_error(legofx.fold(gm)(x), model(x)) <= TOL64


def test_init_from_weights_recovers_weights_made_of_few_filters():
    torch.manual_seed(1)
    atoms = torch.randn(6, 8 * 9, dtype=torch.float64)
    choice = torch.randint(0, 6, (32 * 2,))
    weight = (atoms[choice] * torch.randn(64, 1, dtype=torch.float64)).reshape(32, 16, 3, 3)
    lego, selection, coef, error = fit_lego(weight, o=2, m=6)
    assert error < 1e-10
    rebuilt = (lego[selection] * coef[..., None, None, None]).flatten(1, 2)
    assert torch.allclose(rebuilt, weight, atol=1e-10)
    noisy = weight + 1e-3 * torch.randn_like(weight)
    assert fit_lego(noisy, o=2, m=6)[3] < 5e-3


def test_init_from_weights_beats_random_and_is_recorded_in_the_report():
    model = net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    fitted = legofx.transform(model, o=2, m=6, init="weights")
    random = legofx.transform(model, o=2, m=6)
    with torch.no_grad():
        assert relative_error(fitted(x), model(x)) < 0.75 * relative_error(random(x), model(x))
    errors = [r.extra["init_error"] for r in legofx.summary(fitted)]
    assert all(0 < e < 1 for e in errors)
    assert "init error" in legofx.report(fitted)


def test_without_coefficients_coef_is_a_constant_buffer():
    gm = legofx.transform(net(), o=2, m=5, coefficients=False)
    layer = lego_layers(gm)["0"]
    assert "0.coef" not in dict(gm.named_parameters()) and torch.all(layer.coef == 1)
    record = legofx.summary(gm)[0]
    assert record.params_after == 5 * 2 * 9 + 12 and record.settings.endswith("no-coef")
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(legofx.fold(gm.eval())(x), gm(x)) <= TOL64


@pytest.mark.parametrize("kwargs, error", [({"init": "pretrained"}, ValueError),
                                           ({"coefficients": 1}, TypeError)])
def test_bad_training_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        legofx.transform(net(), **kwargs)


def test_recalibrate_batchnorm_re_estimates_statistics_and_restores_the_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU())
    gm = legofx.transform(net, o=2, m=3, init="weights").eval()
    batches = [torch.randn(5, 4, 7, 7, dtype=torch.float64) for _ in range(3)]
    gm.double()
    assert legofx.recalibrate_batchnorm(gm, batches) == 1
    norm = gm.get_submodule("1")
    with torch.no_grad():
        features = torch.cat([gm.get_submodule("0")(x) for x in batches])
    assert torch.allclose(norm.running_mean, features.mean((0, 2, 3)), rtol=0, atol=1e-12)
    assert norm.momentum == 0.3 and not norm.training and not gm.training
    assert legofx.recalibrate_batchnorm(nn.Sequential(nn.ReLU()), batches) == 0
