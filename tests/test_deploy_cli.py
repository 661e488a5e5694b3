"""``legofx export``: the command line verifies what it wrote, and loads trained weights."""

import textwrap

import pytest
import torch

import legofx
from deploy_helpers import assert_close
from helpers import randomize_lego
from legofx.cli import main

NET = textwrap.dedent("""
    from torch import nn
    def build():
        net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1))
        net.example_input_shape = (1, 4, 12, 12)
        return net
""")


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET)
    return f"{path}:build"


def test_export_onnx_prints_what_was_verified(net_file, tmp_path, capsys):
    out = tmp_path / "net.onnx"
    assert main(["export", net_file, "--o", "2", "--m", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists()
    assert "2 of 2 convs rewritten" in printed
    assert "ONNX Runtime vs PyTorch (float32, batch 1, 2): max error" in printed
    assert "Torch-TensorRT op check" in printed and "all convertible" in printed
    assert "export verified" in printed


def test_export_int8_calibrates_on_random_batches(net_file, tmp_path, capsys):
    out = tmp_path / "net.onnx"
    assert main(["export", net_file, "--o", "2", "--m", "0.5", "--out", str(out),
                 "--quantize", "int8", "--calibration", "2"]) == 0
    printed = capsys.readouterr().out
    assert "int8 QDQ, dynamic batch" in printed and "int8 QDQ file" in printed
    assert "cosine similarity" in printed and "export verified" in printed
    import onnx
    assert any(node.op_type == "DequantizeLinear" for node in onnx.load(str(out)).graph.node)


def test_export_can_fuse_batchnorms(net_file, tmp_path, capsys):
    import onnx

    plain, fused = tmp_path / "plain.onnx", tmp_path / "fused.onnx"
    assert main(["export", net_file, "--out", str(plain)]) == 0
    assert main(["export", net_file, "--out", str(fused), "--fuse-batchnorm"]) == 0
    assert "export verified" in capsys.readouterr().out
    ops = [{node.op_type for node in onnx.load(str(path)).graph.node} for path in (plain, fused)]
    assert "BatchNormalization" in ops[0] and "BatchNormalization" not in ops[1]


def test_export_can_pick_lowerings_timed_on_onnx_runtime(net_file, tmp_path, capsys):
    out = tmp_path / "auto.onnx"
    args = ["export", net_file, "--out", str(out), "--strategy", "auto", "--auto-backend", "onnxruntime"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lowerings (auto, timed on onnxruntime): " in printed and "export verified" in printed
    counts = printed.split("lowerings (auto, timed on onnxruntime): ")[1].split("\n")[0]
    assert sum(int(part.split()[1]) for part in counts.split(", ")) == 2  # both convs timed
    assert out.exists()


def test_export_loads_trained_weights(net_file, tmp_path, capsys):
    from legofx.cli.model_spec import build_model

    gm = legofx.transform(build_model(net_file)[0], o=2, m=4)
    randomize_lego(gm, torch.Generator().manual_seed(3))  # "trained": not the random start
    torch.save(gm.state_dict(), tmp_path / "trained.pt")
    out = tmp_path / "net.pt2"
    args = ["export", net_file, "--m", "4", "--weights", str(tmp_path / "trained.pt"),
            "--out", str(out), "--input-size", "10", "--dtype", "float16"]
    assert main(args) == 0
    assert "float16" in capsys.readouterr().out
    x = torch.randn(3, 4, 10, 10)
    with torch.no_grad():
        expected = legofx.fold(gm.eval())(x)
        assert_close(torch.export.load(str(out)).module()(x.half()).float(), expected,
                     torch.float16)


@pytest.mark.parametrize("args, message", [
    (["--out", "net.txt"], "must end in .pt2"),
    (["--out", "net.onnx", "--weights", "missing.pt"], "missing.pt"),
    (["--out", "net.onnx", "--o", "0"], "o=0"),
    (["--out", "net.onnx", "--strategy", "fast"], "got --strategy 'fast'"),
    (["--out", "net.onnx", "--strategy", "gather", "--auto-backend", "onnxruntime"],
     "--auto-backend onnxruntime says where --strategy auto times"),
    (["--out", "net.pt2", "--strategy", "fused"], "--strategy fused: its merge is a legofx custom op"),
    (["--out", "net.pt2", "--quantize", "int8"], "--out must end in .onnx"),
])
def test_errors_are_reported_not_raised(net_file, args, message, capsys):
    assert main(["export", net_file, *args]) == 2
    assert message in capsys.readouterr().err


def test_out_is_required_and_run_stays_the_default(net_file, capsys):
    with pytest.raises(SystemExit):
        main(["export", net_file])
    assert "--out" in capsys.readouterr().err
    assert main([net_file, "--o", "1", "--m", "2"]) == 0  # no subcommand: run
    assert "fold equivalence verified" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "is not a state_dict torch.load can read"),
    ("list", "holds a list, not a state_dict"),
    ("o=4", "does not fit the model transformed with --method lego o=2 m=4: 0: the checkpoint's "
            "Lego layer was made with o=4, m=4"),
])
def test_bad_or_mismatched_weights_give_one_line(net_file, tmp_path, content, message, capsys):
    from legofx.cli.model_spec import build_model

    path = tmp_path / "weights.pt"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "o=4":
        torch.save(legofx.transform(build_model(net_file)[0], o=4, m=4).state_dict(), path)
    else:
        path.write_bytes(content)
    assert main(["export", net_file, "--m", "4", "--weights", str(path), "--out",
                 str(tmp_path / "net.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err and f"--weights {str(path)!r}" in err and len(err.strip().splitlines()) == 1
