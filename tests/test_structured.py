"""Structured Convolutions (``legofx.structure``): training form == conv with ``A alpha``, fold ==
training form, projection, counts, ``structural_loss``, arguments, skips, export."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import assert_unchanged, conv_with, relative_error, snapshot, tolerance
from legofx.methods.structured.layers import (
    FoldedStructuredConv2d, StructuredLinear, compose_weight, structure_matrix,
)
from legofx.testing import conv_cases


@st.composite
def structured_cases(draw, dtype=torch.float64):
    """A conv case (any stride, padding incl. 'same'/'valid' and modes, dilation, bias) with an
    underlying size ``(c, n, n)`` that ``structure`` rewrites."""
    case = draw(conv_cases(dtype=dtype))
    conv = case.conv
    kh, kw = conv.kernel_size
    c = draw(st.integers(1, conv.in_channels))
    n = draw(st.integers(1, min(kh, kw)))
    assume(c * n * n < conv.in_channels * kh * kw)
    return case, c, n


@torch.no_grad()
def randomize(gm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for module in gm.modules():
        if isinstance(module, (legofx.StructuredConv2d, StructuredLinear)):
            for p in (module.alpha, module.bias):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def structured(case, c, n, **kwargs):
    gm = legofx.structure(nn.Sequential(case.conv), c=c, n=n, init="random", **kwargs)
    randomize(gm)
    assert [r.status for r in legofx.summary(gm)] == ["rewritten"]
    return gm, gm.get_submodule("0")


@given(data=st.data())
def test_training_form_equals_conv_with_composed_weight(data):
    case, c, n = data.draw(structured_cases())
    gm, layer = structured(case, c, n)
    C, (kh, kw) = case.conv.in_channels, case.conv.kernel_size
    A = structure_matrix(C, kh, kw, c, n, n)
    weight = (A @ layer.alpha.detach().flatten(1).T).T.reshape(-1, C, kh, kw)
    assert torch.allclose(layer.weight, weight, rtol=0, atol=1e-12)
    expected = conv_with(case.conv, case.x, weight, layer.bias)
    actual = gm(case.x)
    assert actual.shape == expected.shape == case.conv(case.x).shape
    assert relative_error(actual, expected) <= tolerance(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_fold_equals_training_form(dtype, data):
    case, c, n = data.draw(structured_cases(dtype=dtype))
    gm, _ = structured(case, c, n)
    folded = legofx.fold(gm.eval())
    assert isinstance(folded.get_submodule("0"), FoldedStructuredConv2d)
    with torch.no_grad():
        assert relative_error(folded(case.x), gm(case.x)) <= tolerance(dtype)
        assert torch.equal(folded.get_submodule("0")(case.x), folded(case.x))  # eager == graph
    roles = {node.meta["legofx_region"]["role"] for node in folded.graph.nodes
             if "legofx_region" in node.meta}
    assert {"sum_pool", "conv"} <= roles <= {"param", "pad", "sum_pool", "conv"}


@given(data=st.data())
@settings(max_examples=20)
def test_projection_of_a_structured_weight_is_exact(data):
    case, c, n = data.draw(structured_cases())
    conv = case.conv
    alpha = torch.randn(conv.out_channels, c, n, n, dtype=torch.float64)
    window = (conv.in_channels - c + 1, conv.kernel_size[0] - n + 1, conv.kernel_size[1] - n + 1)
    with torch.no_grad():
        conv.weight.copy_(compose_weight(alpha, window, (c, n, n)))
    gm = legofx.structure(nn.Sequential(conv), c=c, n=n)  # init="project"
    record = legofx.summary(gm)[0]
    assert record.extra["init_error"] <= 1e-12
    assert torch.allclose(gm.get_submodule("0").alpha, alpha, atol=1e-10)
    with torch.no_grad():
        assert relative_error(legofx.fold(gm)(case.x), conv(case.x)) <= 1e-12
        assert legofx.structural_loss(nn.Sequential(conv), c=c, n=n).item() <= 1e-12


def test_projection_of_a_random_weight_is_the_least_squares_solution():
    conv = nn.Conv2d(5, 4, 3, dtype=torch.float64)
    gm = legofx.structure(nn.Sequential(conv), c=2, n=2)
    A = structure_matrix(5, 3, 3, 2, 2, 2)
    best = torch.linalg.lstsq(A, conv.weight.detach().flatten(1).T).solution.T
    assert torch.allclose(gm.get_submodule("0").alpha.flatten(1), best, atol=1e-10)
    error = (A @ best.T - conv.weight.detach().flatten(1).T).norm() / conv.weight.norm()
    assert legofx.summary(gm)[0].extra["init_error"] == pytest.approx(error.item())
    assert "init error" in legofx.report(gm)


@given(case=structured_cases())
@settings(max_examples=20)
def test_counts(case):
    case, c, n = case
    gm, layer = structured(case, c, n)
    record = legofx.summary(gm)[0]
    conv = case.conv
    bias = 0 if conv.bias is None else conv.out_channels
    assert layer.alpha.shape == (conv.out_channels, c, n, n)
    assert record.params_after == conv.out_channels * c * n * n + bias
    assert record.params_before == conv.weight.numel() + bias
    assert record.settings == f"c={c} n={n}x{n}"
    assert record.theory_compression == pytest.approx(record.params_before / record.params_after)
    assert record.method == "structured" and record.o is None and record.m is None


def test_float_c_is_a_fraction_of_in_channels():
    net = nn.Sequential(nn.Conv2d(6, 4, 3), nn.Conv2d(4, 4, 3))
    records = legofx.summary(legofx.structure(net, c=0.5, n=2))
    assert [r.settings for r in records] == ["c=3 n=2x2", "c=2 n=2x2"]


def test_macs_count_the_sum_pool():
    gm = legofx.structure(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)), c=4, n=2)
    layer = gm.get_submodule("0")
    dense, after = layer.macs((1, 16, 10, 10))
    assert dense == 100 * 16 * 8 * 9
    assert after == 100 * 16 * 4 * 4 + (8 + 4) * 12 * 12 + 4 * 11 * 11 * (2 * 2 - 1)


def test_structural_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2),
                        nn.Conv2d(6, 4, 1))
    loss = legofx.structural_loss(net, c=0.5, n=2)
    assert loss.item() > 0.1 and loss.requires_grad
    # the 3x3 conv only: grouped and 1x1 convs are left out; compare with the full A A^+
    A = structure_matrix(4, 3, 3, 2, 2, 2)
    w = net[0].weight.detach().double().flatten(1).T
    expected = ((w - A @ torch.linalg.pinv(A) @ w).norm() / w.norm()).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert net[0].weight.grad.abs().sum() > 0 and net[2].weight.grad is None
    with torch.no_grad():  # project: the loss vanishes
        net[0].weight.copy_(legofx.structure(net, c=0.5, n=2).get_submodule("0").weight)
    assert legofx.structural_loss(net, c=0.5, n=2).item() <= 1e-6


@pytest.mark.parametrize("kwargs, error, text", [
    ({"c": 0}, ValueError, "c=0"), ({"c": 1.5}, ValueError, "c=1.5"),
    ({"c": "half"}, TypeError, "c='half'"), ({"c": True}, TypeError, "c=True"),
    ({"n": 0}, ValueError, "n=0"), ({"n": 2.0}, TypeError, "n=2.0"),
    ({"n": True}, TypeError, "n=True"),
    ({"init": "zeros"}, ValueError, "init='zeros'"), ({"linear": 1}, TypeError, "linear=1"),
    ({"include": "nothing"}, ValueError, "'nothing'"),
])
def test_bad_arguments_name_the_argument(kwargs, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(".", r"\.")):
        legofx.structure(nn.Sequential(nn.Conv2d(4, 4, 3)), **kwargs)


def test_structural_loss_bad_arguments():
    with pytest.raises(ValueError, match="n=0"):
        legofx.structural_loss(nn.Conv2d(4, 4, 3), n=0)
    with pytest.raises(TypeError, match="model"):
        legofx.structural_loss("net")


def test_skip_reasons():
    net = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1),
                        nn.Conv2d(8, 4, (1, 3)), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 2))
    gm = legofx.structure(net, c=6, n=2)
    reasons = [r.reason for r in legofx.summary(gm)]
    assert reasons[0] == ""
    assert reasons[1].startswith("groups=2: grouped convolutions are kept")
    assert reasons[2] == "n=2 exceeds kernel_size=(1, 1)"
    assert reasons[3] == "n=2 exceeds kernel_size=(1, 3)"
    assert reasons[4] == "c=6 exceeds in_channels=4"
    gm = legofx.structure(nn.Sequential(nn.Conv2d(4, 4, 2)), c=1.0, n=2)
    assert "nothing to save" in legofx.summary(gm)[0].reason


def test_input_model_is_not_modified():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    before = snapshot(net)
    gm = legofx.structure(net, linear=True)
    legofx.fold(gm)
    assert_unchanged(net, before)


def test_linear_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
                        nn.ReLU(), nn.Linear(10, 5, bias=False)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = legofx.structure(net, c=0.25, n=2, linear=True)
    records = {r.name: r for r in legofx.summary(gm)}
    assert [records[k].status for k in ("0", "3", "5")] == ["rewritten"] * 3
    assert records["3"].params_after == 10 * 72 + 10 and records["3"].settings == "c=72"
    assert records["5"].settings == "c=3"
    randomize(gm)
    folded = legofx.fold(gm.eval())
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float64)
    linear, rows = gm.get_submodule("3"), torch.randn(4, 288, dtype=torch.float64)
    band = structure_matrix(288, 1, 1, 72, 1, 1)
    expected = rows @ (band @ linear.alpha.detach().T) + linear.bias
    assert relative_error(linear(rows), expected) <= tolerance(torch.float64)
    assert relative_error(folded.get_submodule("3")(rows), expected) <= tolerance(torch.float64)
    assert "network MACs" in legofx.report(folded, x)


def test_include_patterns_cover_convs_and_linears():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    records = legofx.summary(legofx.structure(net, linear=True, include="2"))
    assert [r.status for r in records] == ["skipped", "rewritten"]
    assert legofx.summary(legofx.structure(net, linear=True, exclude="0"))[1].rewritten
    with pytest.raises(ValueError, match="'fc'"):
        legofx.structure(net, linear=True, include="fc")


def test_resnet18_folded_exports_to_onnx(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("onnxruntime")
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = legofx.structure(model, c=0.5, n=2, init="random").eval()
    records = legofx.summary(gm)
    assert sum(r.rewritten for r in records) == 17  # 16 3x3 convs and the 7x7 stem; 1x1 kept
    folded = legofx.fold(gm)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float32)
    result = legofx.export(folded, x, tmp_path / "structured.onnx", check=None)
    original_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < (tmp_path / "structured.onnx").stat().st_size < original_bytes, result


class DoubledConv(nn.Conv2d):
    """A conv with its own forward: legofx keeps the forward and generates the weight."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_conv_with_own_forward_gets_a_generated_weight():
    conv = DoubledConv(4, 6, 3, padding=1, dtype=torch.float64)
    gm = legofx.structure(nn.Sequential(conv), c=2, n=2)
    randomize(gm)
    generator = gm.get_submodule("0").generator
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected = 2 * conv_with(conv, x, generator.weight, conv.bias)
    assert relative_error(gm(x), expected) <= tolerance(torch.float64)
    with torch.no_grad():
        assert relative_error(legofx.fold(gm)(x), gm(x)) <= tolerance(torch.float64)


def test_training_form_composes_its_weight_by_matrix_products_not_a_transposed_conv():
    """A transposed 3-D conv runs off oneDNN on CPU (a ResNet-18 training step took 12x the
    dense one; the speed is measured by benchmarks/structured_speed.py --train-step, not here):
    the graph composes W = A alpha with one small matrix product per axis (float64: exact to
    rounding)."""
    gm = legofx.structure(nn.Sequential(nn.Conv2d(6, 4, 3)).double(), c=2, n=2)
    targets = {str(node.target) for node in gm.graph.nodes}
    assert not any("conv_transpose" in target for target in targets)
    assert any("tensordot" in target for target in targets)
    layer = gm.get_submodule("0")
    expected = (structure_matrix(6, 3, 3, 2, 2, 2) @ layer.alpha.flatten(1).T).T.reshape(4, 6, 3, 3)
    assert relative_error(layer.weight, expected) <= tolerance(torch.float64)
