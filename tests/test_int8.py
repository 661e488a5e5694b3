"""``legofx.export(..., quantize="int8", calibration=...)``: a QDQ ONNX file calibrated by ONNX
Runtime's static quantizer, checked in ONNX Runtime; bad arguments refused before any work."""

import onnx
import pytest
import torch
from torch import nn

import legofx
from legofx.deploy import MismatchError
from legofx.deploy.quantize import int8_agreement
from deploy_helpers import folded_net, ort_run


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval()


def _calibration(count=4, batch=2):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 16, 8, 8, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    folded = folded_net(_net())
    x = torch.randn(2, 16, 8, 8)
    fp32 = legofx.export(folded, x, folder / "fp32.onnx")
    int8 = legofx.export(folded, x, folder / "int8.onnx", quantize="int8", calibration=_calibration())
    return folded, fp32, int8


def test_quantized_export_runs_in_onnx_runtime(exported):
    folded, fp32, int8 = exported
    assert int8.quantized == "int8" and int8.cosine >= 0.99 and int8.dynamic
    assert int8.size_bytes == int8.path.stat().st_size < fp32.size_bytes
    other = torch.randn(3, 16, 8, 8)  # another batch size than the example's
    with torch.no_grad():
        cosine, relative = int8_agreement(torch.from_numpy(ort_run(int8.path, other)), folded(other))
    # int8 rounding: each value is off by up to a quantization step; the direction holds
    assert cosine > 0.99 and 0 < relative < 0.2, (cosine, relative)
    assert "cosine similarity" in str(int8)


def test_int8_agreement_of_exact_and_opposite_outputs():
    e = torch.tensor([3.0, -4.0])
    assert int8_agreement([e], e) == (1.0, 0.0)
    assert int8_agreement([-e], e) == (-1.0, 2.0)  # exact in float64: |-e - e| / max|e| = 8/4


def test_qdq_nodes_around_the_lego_conv_and_a_float_merge(exported):
    graph = onnx.load(str(exported[2].path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:  # activation and weight dequantized just before the conv
        activation, weight = (producer[name] for name in conv.input[:2])
        assert activation.op_type == weight.op_type == "DequantizeLinear"
        assert producer[activation.input[0]].op_type == "QuantizeLinear"
        scale = initializers[weight.input[1]]
        assert list(scale.dims) == [list(initializers[weight.input[0]].dims)[0]]  # per channel
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
    merge = [node for node in graph.node if node.op_type in ("Gather", "Mul", "ReduceSum")]
    assert {node.op_type for node in merge} == {"Gather", "Mul", "ReduceSum"}
    for node in merge:  # computed in float: no quantize pair on the merge's outputs
        assert all(user.op_type != "QuantizeLinear" for user in consumers.get(node.output[0], []))


@pytest.mark.parametrize("arguments, match", [
    ({"quantize": "int8"}, "needs calibration="),
    ({"quantize": "int8", "calibration": []}, "calibration is empty"),
    ({"quantize": "int8", "calibration": [torch.randn(2, 8, 8, 8)]},
     r"calibration batch 0: example_inputs\[0\] is torch.float32 \(2, 8, 8, 8\), expected"),
    ({"quantize": "int8", "calibration": [(torch.randn(2, 16, 8, 8), torch.randn(2))]},
     "calibration batch 0 is not shaped like example_inputs"),
    ({"quantize": "int4", "calibration": _calibration(1)}, "quantize must be None or 'int8'"),
    ({"quantize": "int8", "calibration": _calibration(1), "min_cosine": 2.0}, "min_cosine must be"),
    ({"calibration": _calibration(1)}, "only used with quantize='int8'"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, arguments, match):
    def no_export(*args, **kwargs):
        raise AssertionError("torch.export ran before the arguments were checked")

    monkeypatch.setattr(torch.export, "export", no_export)
    with pytest.raises(ValueError, match=match):
        legofx.export(folded_net(_net()), torch.randn(2, 16, 8, 8), tmp_path / "m.onnx", **arguments)
    assert not list(tmp_path.iterdir())


def test_quantize_for_pt2_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ending in \.onnx \(got a \.pt2 path\)"):
        legofx.export(folded_net(_net()), torch.randn(2, 16, 8, 8), tmp_path / "m.pt2",
                      quantize="int8", calibration=_calibration(1))
    assert not list(tmp_path.iterdir())


def test_an_int8_file_below_the_threshold_leaves_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous export")
    with pytest.raises(MismatchError, match="min_cosine=1.0"):  # int8 is never exact
        legofx.export(folded_net(_net()), torch.randn(2, 16, 8, 8), path, quantize="int8",
                      calibration=_calibration(1), min_cosine=1.0)
    assert path.read_bytes() == b"the previous export"
    assert [f.name for f in tmp_path.iterdir()] == ["m.onnx"]


def test_auto_chooses_lowerings_by_their_int8_time(tmp_path):
    """fold(auto, backend="onnxruntime-int8") times each layer's lowerings as int8 QDQ files
    and checks the choice on the whole int8 model; the result exports to int8 and computes
    the training form's function in float."""
    from helpers import randomize_lego, relative_error, tolerance

    gm = legofx.transform(_net(), o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    x = torch.randn(2, 16, 8, 8)
    folded = legofx.fold(gm.eval(), "auto", example_inputs=x, backend="onnxruntime-int8")
    records = [r for r in legofx.summary(folded) if r.rewritten]
    assert len(records) == 2
    assert all("[auto on onnxruntime-int8: gather" in r.lowering for r in records)
    # the whole model is timed unless every layer was fastest dense on its own already
    assert all("whole model: dense" in r.lowering and "; kept " in r.lowering for r in records) or \
        all(r.lowering.startswith("dense") and "whole model" not in r.lowering for r in records)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float32)
    int8 = legofx.export(folded, x, tmp_path / "int8.onnx", quantize="int8", calibration=_calibration())
    assert int8.cosine >= 0.99
