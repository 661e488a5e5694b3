"""The Torch-TensorRT op check: folded graphs pass, an unsupported op is caught and named."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import legofx
from legofx.deploy.op_check import TENSORRT_OP_SOURCES, TENSORRT_OPS, UnsupportedOpsError
from deploy_helpers import folded_net, small_net


class Erfinv(nn.Module):
    """``aten.erfinv``: core ATen, but Torch-TensorRT has no converter for it."""

    def forward(self, x):
        return torch.erfinv(torch.tanh(x) * 0.5)


class PoolWithIndices(nn.Module):
    def forward(self, x):
        values, indices = F.max_pool2d(x, 2, return_indices=True)
        return values + indices.to(values.dtype)


def test_every_listed_op_exists():
    for name in TENSORRT_OPS:  # a typo would silently never match
        _, packet, overload = name.split(".")
        assert str(getattr(getattr(torch.ops.aten, packet), overload)) == name


def test_list_covers_the_folded_ops_and_3d_pooling():
    emitted = {"aten.convolution.default", "aten.index_select.default", "aten.mul.Tensor",
               "aten.sum.dim_IntList", "aten.view.default", "aten.add.Tensor",
               "aten._native_batch_norm_legit_no_training.default", "aten.relu.default",
               "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.mean.dim",
               "aten.addmm.default", "aten.cat.default", "aten.avg_pool3d.default",
               "aten.permute.default", "aten.constant_pad_nd.default"}
    assert emitted <= TENSORRT_OPS


def test_folded_graph_is_convertible():
    report = legofx.check_ops(folded_net(), torch.randn(1, 4, 8, 8))
    assert report.ok, report
    assert report.ops["aten.index_select.default"] == 2
    assert "aten.max_pool2d_with_indices.default" in report.ops  # values only: lowered to max_pool2d
    assert "all convertible" in str(report)


def test_an_op_of_the_users_model_is_a_warning_not_a_refusal(tmp_path):
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), Erfinv(), nn.Conv2d(8, 8, 1)).eval()
    folded = legofx.fold(legofx.transform(net).eval())
    x = torch.randn(2, 4, 8, 8)
    report = legofx.check_ops(folded, x)
    assert report.ok and not report.unsupported
    [issue] = report.outside
    assert issue.node == "erfinv" and issue.op == "aten.erfinv.default"
    assert "module '1' (Erfinv)" in issue.where
    assert "erfinv (aten.erfinv.default): module '1' (Erfinv)" in str(report)
    with pytest.warns(UserWarning, match="(?s)will run them in PyTorch.*erfinv"):
        result = legofx.export(folded, x, tmp_path / "m.pt2")  # ONNX has no erfinv either
    assert result.path.exists() and result.ops.outside


def test_an_unconvertible_op_of_a_lego_layer_is_refused_and_nothing_written(tmp_path):
    """Circular padding inside a Lego layer becomes ``slice_scatter`` (not in the list)."""
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular")).eval()
    folded = legofx.fold(legofx.transform(net, o=2, m=0.5).eval())
    x = torch.randn(2, 4, 8, 8)
    report = legofx.check_ops(folded, x)
    assert not report.ok and not report.outside
    assert {issue.op for issue in report.unsupported} >= {"aten.slice_scatter.default"}
    assert all("legofx layer '0'" in issue.where for issue in report.unsupported)
    (tmp_path / "m.onnx").write_bytes(b"an older file")
    with pytest.raises(UnsupportedOpsError, match="check=None"):
        legofx.export(folded, x, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"an older file"
    assert [f.name for f in tmp_path.iterdir()] == ["m.onnx"]
    legofx.export(folded, x, tmp_path / "m.pt2", check=None)  # the check can be skipped


def test_non_contiguous_input_and_absorbed_batchnorm_pass():
    """A conv on a permuted input (ConvNext, Segformer): the split copies explicitly (clone +
    view), not through reshape's ``_unsafe_view``; BatchNorm and ReLU absorbed pass too."""

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x.permute(0, 3, 1, 2))))

    folded = legofx.fold(legofx.transform(Permuted().eval(), o=2, m=0.5).eval(),
                         fuse_batchnorm=True)
    report = legofx.check_ops(folded, torch.randn(2, 8, 8, 8))
    assert report.ok and not report.outside, report
    assert "aten._unsafe_view.default" not in report.ops


def test_interpolate_between_lego_layers_is_not_refused():
    """``F.interpolate`` exports ``arange.default``, which Torch-TensorRT's decompositions
    take (lowering/_decomposition_groups.py)."""

    class Upsampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(F.interpolate(self.a(x), scale_factor=2.0, mode="bilinear"))

    folded = legofx.fold(legofx.transform(Upsampled().eval(), o=2, m=0.5).eval())
    report = legofx.check_ops(folded, torch.randn(2, 4, 8, 8))
    assert report.ok and not report.outside, report
    assert "aten.arange.default" in report.ops


def test_every_listed_op_names_its_source_file():
    assert set(TENSORRT_OP_SOURCES) == TENSORRT_OPS
    assert all(source.startswith("py/torch_tensorrt/dynamo/") and source.endswith(".py")
               for source in TENSORRT_OP_SOURCES.values())


def test_plain_model_issue_points_at_the_source_line():
    [issue] = legofx.check_ops(nn.Sequential(nn.Conv2d(4, 4, 1), Erfinv()).eval(),
                               torch.randn(1, 4, 8, 8)).outside
    assert "torch.erfinv(torch.tanh(x) * 0.5)" in issue.where


def test_max_pool_indices_in_use_are_not_convertible():
    [issue] = legofx.check_ops(nn.Sequential(nn.Conv2d(4, 4, 1), PoolWithIndices()).eval(),
                               torch.randn(1, 4, 8, 8)).outside
    assert issue.op == "aten.max_pool2d_with_indices.default"


def test_the_registry_answers_where_torch_tensorrt_imports(monkeypatch):
    """With ``torch_tensorrt`` importable its registry decides (a stand-in here that lacks
    a convolution converter), after its own decomposition table."""

    class Registry:
        def __contains__(self, node):
            return node.target is not torch.ops.aten.convolution.default

    modules = {"torch_tensorrt": types.ModuleType("torch_tensorrt"),
               "torch_tensorrt.dynamo.conversion._ConverterRegistry": types.ModuleType("r"),
               "torch_tensorrt.dynamo.lowering": types.ModuleType("lowering")}
    modules["torch_tensorrt"].__version__ = "9.9"
    modules["torch_tensorrt.dynamo.conversion._ConverterRegistry"].DYNAMO_CONVERTERS = Registry()
    modules["torch_tensorrt.dynamo.lowering"].get_decompositions = (
        lambda: torch._decomp.core_aten_decompositions())
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    report = legofx.check_ops(small_net(), torch.randn(1, 4, 8, 8))
    assert report.source == "torch_tensorrt 9.9 converter registry"
    assert [issue.op for issue in report.outside] == ["aten.convolution.default"] * 2
    assert "module '0' (Conv2d)" in report.outside[0].where
