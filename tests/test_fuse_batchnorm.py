"""fold(..., fuse_batchnorm=True): eval BatchNorms after folded layers go into them, exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx.testing import networks


def batchnorms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def random_batchnorm(channels, generator):
    bn = nn.BatchNorm2d(channels).double().eval()
    for tensor in (bn.weight, bn.bias, bn.running_mean):
        tensor.data.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    return bn


@settings(max_examples=15)
@given(net_x=networks(data_dependent=False),
       strategy=st.sampled_from(["gather", "accumulate", "merge-conv", "dense"]))
def test_fused_networks_compute_the_same_function(net_x, strategy):
    net, x = net_x
    gm = legofx.transform(net, o=2, m=2).eval()
    randomize_lego(gm, torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    fused = legofx.fold(gm, strategy, fuse_batchnorm=True)
    with torch.no_grad():
        assert relative_error(fused(x), gm(x)) <= tolerance(torch.float64)
    folded_in = [r.lowering.split("BatchNorm ")[1].split(" ")[0]
                 for r in legofx.summary(fused) if "BatchNorm" in r.lowering]
    assert set(batchnorms(fused)) == set(batchnorms(gm)) - set(folded_in)
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is untouched


@pytest.mark.parametrize("strategy", ["gather", "accumulate", "merge-conv", "dense"])
def test_every_batchnorm_after_a_folded_conv_goes(strategy):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), random_batchnorm(8, g), nn.ReLU(),
                        nn.Conv2d(8, 6, 3), random_batchnorm(6, g),
                        nn.Conv2d(6, 5, 1), random_batchnorm(5, g)).double().eval()
    gm = legofx.transform(net, o=2, m=2).eval()  # the last conv: 6 -> 5 is rewritten; o | 6
    randomize_lego(gm, g)
    fused = legofx.fold(gm, strategy, fuse_batchnorm=True)
    assert batchnorms(fused) == []
    assert [r.lowering.endswith(f"BatchNorm {bn} folded in")
            for r, bn in zip(legofx.summary(fused), ["1", "4", "6"])] == [True] * 3
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused(x), gm(x)) <= tolerance(torch.float64)
    assert batchnorms(legofx.fold(gm, strategy)) == ["1", "4", "6"]  # off by default


def test_batchnorms_that_cannot_be_folded_stay():
    g = torch.Generator().manual_seed(0)

    class Shared(nn.Module):  # one conv called twice: folding a BN into it would change both calls
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), random_batchnorm(4, g)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    class Branch(nn.Module):  # the conv's output has a second user
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), random_batchnorm(4, g)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    skipped = nn.Sequential(nn.Conv2d(3, 4, 3), random_batchnorm(4, g))  # 3 % o != 0: a plain conv
    for net, x in [(Shared(), torch.randn(1, 4, 6, 6)), (Branch(), torch.randn(1, 4, 6, 6)),
                   (skipped, torch.randn(1, 3, 6, 6))]:
        net = net.double().eval()
        gm = legofx.transform(net, o=2, m=2).eval()
        fused = legofx.fold(gm, fuse_batchnorm=True)
        assert batchnorms(fused) == batchnorms(net)
        with torch.no_grad():
            assert relative_error(fused(x.double()), gm(x.double())) <= tolerance(torch.float64)
    training = legofx.transform(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), o=2, m=2)
    assert batchnorms(legofx.fold(training, fuse_batchnorm=True)) == ["1"]  # train mode: batch statistics


def test_fuse_batchnorm_must_be_a_bool():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(4, 4, 3)), o=2, m=2)
    with pytest.raises(TypeError, match="fuse_batchnorm='yes'"):
        legofx.fold(gm, fuse_batchnorm="yes")
