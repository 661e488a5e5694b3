"""``by_kernel``: the Lego form on k x k layers, dense on 1x1 (the ONNX Runtime form)."""

import torch
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx.lowering.by_kernel import by_kernel
from legofx.lowering.dense import DenseFoldedConv2d
from legofx.methods.lego.layers import FoldedLegoConv2d


def network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 16, 3, padding=1)).double()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    gm = legofx.transform(net, o=2, m=4)
    randomize_lego(gm, torch.Generator().manual_seed(1))
    return gm.eval()


def test_by_kernel_picks_gather_on_kxk_and_dense_on_1x1_and_equals_the_training_form():
    gm = network()
    strategy = by_kernel(gm)
    assert sorted(strategy.values()) == ["dense", "gather", "gather"]
    folded = legofx.fold(gm, strategy, fuse_batchnorm=True)
    kinds = {r.name: r.lowering for r in legofx.summary(folded)}
    assert [kinds[n].split(" ")[0] for n in sorted(strategy)] == [strategy[n] for n in sorted(strategy)]
    lowered = [m for m in folded.modules() if isinstance(m, (FoldedLegoConv2d, DenseFoldedConv2d))]
    assert sum(isinstance(m, DenseFoldedConv2d) for m in lowered) == 1
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float64)


def test_by_kernel_keeps_narrow_layers_dense():
    gm = network()
    strategy = by_kernel(gm, min_in_channels=16)
    assert sorted(strategy.values()) == ["dense", "dense", "gather"]
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(legofx.fold(gm, strategy)(x), gm(x)) <= tolerance(torch.float64)
