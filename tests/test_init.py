"""Initialisation: a transformed layer's activations keep the scale of a fresh dense conv's."""

import pytest
import torch
from torch import nn

import legofx
from helpers import lego_layers


@pytest.mark.parametrize("o, m, kernel", [(1, 0.5, 3), (2, 0.5, 3), (4, 0.25, 3), (4, 0.5, 1),
                                          (8, 0.125, 3)])
def test_activation_scale_matches_dense_conv(o, m, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, kernel, padding=kernel // 2)
    gm = legofx.transform(nn.Sequential(conv), o=o, m=m)
    x = torch.randn(8, 128, 16, 16)
    with torch.no_grad():
        ratio = (gm(x) - conv.bias.view(-1, 1, 1)).std() / (conv(x) - conv.bias.view(-1, 1, 1)).std()
    # the Lego filter's own fan-in would give sqrt(o) (up to 2.8x); the reconstructed one ~1
    assert 0.85 < ratio < 1.15


def test_selection_starts_balanced_and_bias_is_kept():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3)
    gm = legofx.transform(nn.Sequential(conv), o=4, m=5)
    layer = lego_layers(gm)["0"]
    counts = torch.bincount(layer.selection().flatten(), minlength=5)
    assert counts.min() >= (24 * 4) // 5 and counts.max() <= -(-(24 * 4) // 5)
    assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    assert torch.equal(layer.coef, torch.ones(24, 4))
