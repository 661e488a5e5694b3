"""The legofx command line: the README's main job and clear errors."""

import textwrap

import pytest

from legofx.cli import main


def test_default_main_job(capsys):
    pytest.importorskip("torchvision")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "rewritten" in out
    assert "fold equivalence verified" in out
    assert "layers: 20 found, rewritten 19 (graph 19), skipped 1" in out


def model_file(tmp_path, layers: str, shape: tuple) -> str:
    """A ``path.py:build`` model spec: ``nn.Sequential(<layers>)`` with its input shape."""
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(f"""
        from torch import nn
        def build():
            net = nn.Sequential({layers})
            net.example_input_shape = {shape!r}
            return net
    """))
    return f"{path}:build"


def test_model_from_file(tmp_path, capsys):
    spec = model_file(tmp_path, "nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)", (2, 3, 12, 12))
    assert main(["run", spec, "--o", "1", "--m", "2", "--exclude", "0"]) == 0
    out = capsys.readouterr().out
    assert "excluded by exclude pattern '0'" in out
    assert "input (2, 3, 12, 12)" in out


@pytest.mark.parametrize("args, message", [
    (["run", "resnet18"], "MODEL must look like"),
    (["run", "torchvision:no_such_model"], "unknown torchvision model"),
    (["run", "missing.py:build"], "does not exist"),
    (["run", "torchvision:resnet18", "--o", "0"], "o=0"),
    (["run", "torchvision:resnet18", "--m", "1.5"], "m=1.5"),
])
def test_errors_are_reported_not_raised(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_structured_method_from_the_command_line(tmp_path, capsys):
    spec = model_file(tmp_path, "nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)", (2, 4, 12, 12))
    assert main(["run", spec, "--method", "structured", "--c", "0.5", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "fold equivalence verified" in out
    assert "n=2 exceeds kernel_size=(1, 1)" in out
    onnx = tmp_path / "net.onnx"
    assert main(["export", spec, "--method", "structured", "--n", "2",
                 "--out", str(onnx)]) == 0
    assert onnx.stat().st_size > 0
    assert "structured c=0.5 n=2" in capsys.readouterr().out
