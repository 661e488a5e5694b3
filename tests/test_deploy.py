"""Deployment: folded models exported to .onnx / .pt2 and compiled compute what PyTorch does.

Exported files are compared with the eager model by ``export`` itself, and again here on
inputs of another batch size (the batch axis is dynamic), so the tests do not trust the code
they test. ONNX Runtime runs on the CPU; TensorRT is not installable here (see README), so
its path runs against a stand-in module that records the calls.
"""

import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from deploy_helpers import assert_close, folded_net, ort_run, small_net
from legofx.deploy import TOLERANCES, MismatchError
from legofx.deploy.op_check import TensorRTUnavailable, load_torch_tensorrt
from legofx.testing import networks


@given(data=st.data())
@settings(max_examples=4)
def test_generated_networks_match_in_onnx_runtime(data):
    net, x = data.draw(networks(dtype=torch.float32, data_dependent=False))
    folded = folded_net(net, seed=data.draw(st.integers(0, 100)))
    # every op converts to TensorRT but circular padding's slice_scatter (see op_check.py)
    flagged = {issue.op for issue in legofx.check_ops(folded, x).unsupported}
    assert flagged <= {"aten.slice_scatter.default"}
    assert not flagged or "padding_mode=circular" in repr(net)
    with tempfile.TemporaryDirectory() as folder:
        result = legofx.export(folded, x, Path(folder) / "net.onnx", check=None)
        assert result.max_error <= TOLERANCES[torch.float32]
        other = torch.randn(x.shape[0] + 2, *x.shape[1:])  # another batch size
        with torch.no_grad():
            assert_close(ort_run(result.path, other), folded(other))


def test_resnet18_end_to_end(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    folded = folded_net(torchvision.models.resnet18().eval())
    x = torch.randn(1, 3, 64, 64)
    onnx_result = legofx.export(folded, x, tmp_path / "r18.onnx")
    pt2_result = legofx.export(folded, x, tmp_path / "r18.pt2", check=None)
    print(onnx_result, pt2_result, sep="\n")
    assert onnx_result.ops.ok and onnx_result.batches == (1, 2)
    graph = onnx.load(str(tmp_path / "r18.onnx"))
    assert min(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert {"Conv", "Gather", "ReduceSum"} <= {node.op_type for node in graph.graph.node}
    other = torch.randn(3, 3, 64, 64)
    program = torch.export.load(str(tmp_path / "r18.pt2"))
    with torch.no_grad():
        expected = folded(other)
        assert_close(program.module()(other), expected)
        assert_close(ort_run(tmp_path / "r18.onnx", other), expected)


def test_half_precision_exports_and_matches(tmp_path):
    folded = folded_net().half()
    x = torch.randn(2, 4, 12, 12).half()
    for name in ("net.onnx", "net.pt2"):
        result = legofx.export(folded, x, tmp_path / name)
        assert result.dtype == torch.float16 and result.tolerance == TOLERANCES[torch.float16]
    out = ort_run(tmp_path / "net.onnx", x)
    assert out.dtype == np.float16
    with torch.no_grad():
        assert_close(out, folded(x), torch.float16)


def test_channels_last_model_and_inputs(tmp_path):
    folded = folded_net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 12, 12).to(memory_format=torch.channels_last)
    legofx.export(folded, x, tmp_path / "net.onnx", check=None)
    legofx.export(folded, x, tmp_path / "net.pt2", check=None)
    other = torch.randn(3, 4, 12, 12).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = folded(other)
        assert_close(ort_run(tmp_path / "net.onnx", other), expected)
        assert_close(torch.export.load(str(tmp_path / "net.pt2")).module()(other), expected)


def test_plain_models_export_too(tmp_path):
    result = legofx.export(small_net(), torch.randn(1, 4, 8, 8), tmp_path / "plain.onnx")
    assert result.ops.ok and result.max_error <= TOLERANCES[torch.float32]


def test_unfolded_or_training_mode_models_are_refused(tmp_path):
    gm = legofx.transform(small_net()).eval()
    x = torch.randn(1, 4, 8, 8)
    for call in (lambda: legofx.export(gm, x, tmp_path / "m.onnx"),
                 lambda: legofx.compile(gm, x, "onnxruntime"), lambda: legofx.check_ops(gm, x)):
        with pytest.raises(ValueError, match=r"training-form legofx layers \(0, 4\).*legofx\.fold"):
            call()
    with pytest.raises(ValueError, match="training mode"):
        legofx.export(folded_net().train(), x, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["model.onnx.txt", "model.pt", "model"])
def test_unknown_suffix_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=r"must end in \.pt2 .* or \.onnx"):
        legofx.export(folded_net(), torch.randn(1, 4, 8, 8), tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_a_wrong_onnx_file_is_reported_with_its_error(tmp_path, monkeypatch):
    from legofx.deploy import exporter

    class Skewed(exporter.OnnxRuntimeModule):  # as if ONNX Runtime computed something else
        def forward(self, *inputs):
            out = super().forward(*inputs)
            return out + 1e-3 * out.abs().max()

    monkeypatch.setattr(exporter, "OnnxRuntimeModule", Skewed)
    with pytest.raises(MismatchError, match=r"max error 1\.0\d*e-03 of the output scale"):
        legofx.export(folded_net(), torch.randn(1, 4, 8, 8), tmp_path / "m.onnx")


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_compiled_backends_match_eager(backend):
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    folded = folded_net(net)
    compiled = legofx.compile(folded, torch.randn(2, 4, 8, 8), backend)
    kind = {"onnxruntime": legofx.deploy.compiler.OnnxRuntimeModule,
            "inductor": torch._dynamo.eval_frame.OptimizedModule}[backend]
    assert isinstance(compiled, kind)
    x = torch.randn(3, 4, 8, 8)  # not the example's batch
    with torch.no_grad():
        assert_close(compiled(x), folded(x))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of inductor, onnxruntime, tensorrt"):
        legofx.compile(folded_net(), torch.randn(1, 4, 8, 8), "tvm")


# ---- TensorRT ------------------------------------------------------------------------------


def tensorrt_or_skip():
    """``torch_tensorrt`` and a GPU, or skip (its import raises a plain Exception without
    TensorRT's libraries, which ``pytest.importorskip`` would not catch)."""
    try:
        trt = load_torch_tensorrt()
    except TensorRTUnavailable as err:
        pytest.skip(str(err))
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    return trt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensorrt_compile_and_save(tmp_path, dtype):
    tensorrt_or_skip()
    folded = folded_net().cuda().to(dtype)
    x = torch.randn(2, 4, 12, 12, device="cuda", dtype=dtype)
    compiled = legofx.compile(folded, x, "tensorrt")
    legofx.deploy.save_tensorrt(compiled, tmp_path / "trt.ep", x)
    with torch.no_grad():
        assert_close(torch.export.load(str(tmp_path / "trt.ep")).module()(x), folded(x), dtype)


class _BrokenTensorRT:
    """An import hook that fails the way torch_tensorrt does without TensorRT's libraries."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_tensorrt":
            raise Exception("libnvinfer.so.10: cannot open shared object file")  # noqa: TRY002
        return None


def test_tensorrt_without_its_libraries_says_what_is_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTensorRT(), *sys.meta_path])
    with pytest.raises(TensorRTUnavailable, match=r"libnvinfer.*legofx\[tensorrt\]"):
        legofx.compile(folded_net(), torch.randn(1, 4, 8, 8), "tensorrt")
    assert legofx.check_ops(folded_net(), torch.randn(1, 4, 8, 8)).source.startswith("static list")


def test_tensorrt_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"not installed.*pip install 'legofx\[tensorrt\]'"):
        legofx.compile(folded_net(), torch.randn(1, 4, 8, 8), "tensorrt")


def test_tensorrt_path_calls_torch_tensorrt_as_documented(monkeypatch, tmp_path):
    """A stand-in ``torch_tensorrt`` records the calls legofx makes (the real one cannot be
    installed here): dynamo IR, min_block_size=1, the model's precision, ``save``."""
    calls = {}
    fake = types.ModuleType("torch_tensorrt")
    fake.compile = lambda model, **kwargs: calls.setdefault("compile", kwargs) and model
    fake.save = lambda module, path, **kwargs: calls.setdefault("save", (path, kwargs))
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    folded = folded_net().half()
    x = torch.randn(2, 4, 8, 8).half()
    compiled = legofx.compile(folded, x, "tensorrt")
    legofx.deploy.save_tensorrt(compiled, tmp_path / "m.ep", x)
    assert compiled is folded
    assert calls["compile"]["ir"] == "dynamo" and calls["compile"]["min_block_size"] == 1
    assert calls["compile"]["enabled_precisions"] == {torch.float16}
    assert calls["compile"]["arg_inputs"][0] is x
    assert calls["save"][0] == str(tmp_path / "m.ep") and calls["save"][1]["arg_inputs"][0] is x
