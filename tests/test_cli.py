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


def test_include_takes_one_value_so_the_model_can_follow(tmp_path, capsys):
    spec = model_file(tmp_path, "nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)", (2, 3, 12, 12))
    assert main(["run", "--include", "2", spec, "--o", "1", "--m", "2"]) == 0
    out = capsys.readouterr().out
    assert "input (2, 3, 12, 12)" in out  # the file's model, not the default resnet18
    assert main(["run", "--exclude", "0", "--exclude", "x,y", spec]) == 2
    assert "exclude pattern 'x' matches no Conv2d" in capsys.readouterr().err  # all three kept
    with pytest.raises(SystemExit):
        main(["run", "--include", f"0,{spec}"])
    assert "looks like a MODEL" in capsys.readouterr().err


def _no_model_building(monkeypatch):
    """Checks run before any slow work: building the model would fail the test."""
    from legofx.cli import common

    def refuse(spec):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(common, "build_model", refuse)


@pytest.mark.parametrize("args, message", [
    (["export", "torchvision:resnet18", "--out", "x.xyz"], "--out must end in .pt2"),
    (["export", "torchvision:resnet18", "--out", "x.onnx", "--strategy", "fast"], "got --strategy 'fast'"),
    (["export", "torchvision:resnet18", "--out", "x.onnx", "--batch", "0"], "--batch must be"),
    (["run", "torchvision:resnet18", "--input-size", "0"], "--input-size must be an int >= 1, got 0"),
    (["run", "torchvision:resnet18", "--method", "structured", "--n", "0"], "n=0"),
])
def test_bad_options_are_refused_before_any_slow_work(args, message, monkeypatch, capsys):
    _no_model_building(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("layers, args, message", [
    ("nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)", ["--o", "1000"],
     "--o 1000 divides no conv's in_channels"),
    ("nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)", ["--o", "1", "--m", "100000"],
     "--m 100000 exceeds every conv's out_channels (largest 8)"),
    ("nn.Linear(3, 4)", [], "has no nn.Conv2d: there is nothing to rewrite"),
    ("nn.Conv2d(3, 8, 3)", ["--method", "structured", "--n", "5"], "--n 5 exceeds every conv's kernel"),
])
def test_settings_no_conv_can_take_are_refused_before_the_rewrite(tmp_path, layers, args, message,
                                                                  monkeypatch, capsys):
    from legofx.cli import common

    monkeypatch.setattr(common, "transform", None)  # calling it would fail the test
    monkeypatch.setattr(common, "structure", None)
    spec = model_file(tmp_path, layers, (1, 3, 8, 8))
    assert main(["run", spec, *args]) == 2
    assert message in capsys.readouterr().err


def test_a_rewrite_that_rewrites_nothing_warns(tmp_path, capsys):
    spec = model_file(tmp_path, "nn.Conv2d(4, 4, 3, groups=2)", (1, 4, 8, 8))
    assert main(["run", spec, "--o", "1", "--m", "2"]) == 0
    assert "warning: no conv was rewritten with o=1 m=2 (1 of 1: groups=2" in capsys.readouterr().err


def test_help_says_a_model_file_is_run(capsys):
    for command in ("run", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "runs the file's code" in " ".join(capsys.readouterr().out.split())


def test_every_option_is_documented():
    from pathlib import Path

    from legofx.cli.main import parser

    docs = Path(__file__).parents[1] / "docs" / "api.md"
    section = docs.read_text().split("## Command line\n")[1].split("\n## ")[0]
    commands = next(a for a in parser()._actions if a.dest == "command").choices
    for name in ("run", "report", "export"):
        assert f"legofx {name}" in section
        for action in commands[name]._actions:
            for option in action.option_strings:
                assert option in ("-h", "--help") or f"`{option}" in section, (name, option)
    assert "`legofx --version`" in section
