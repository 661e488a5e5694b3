"""Issue 25 item 5: the command line as a new user meets it. Every error is one line, names the
option and the value, comes before any slow work and names nothing internal; Ctrl-C leaves
nothing behind; ``report``, ``--version``, ``--wide``; the report's numbers; the kernel's
fallback directory is removed."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import legofx
from legofx.cli import main
from legofx.core.version import VERSION

NET = """
import time
from pathlib import Path
import torch
from torch import nn

torch.fx.wrap("pause")


def pause(x):
    time.sleep({pause})
    return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.{name} = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        return self.{name}(pause(torch.relu(self.stem(x))))


def build():
    Path({marker!r}).write_text("built")
    net = Net()
    net.example_input_shape = (1, 4, 8, 8)
    return net
"""


@pytest.fixture
def net(tmp_path):
    """``(spec, marker)``: a tiny model file whose factory writes ``marker`` when it runs."""
    return model_file(tmp_path)


def model_file(tmp_path, pause: float = 0.0, name: str = "head") -> tuple[str, Path]:
    marker = tmp_path / "model-was-built"
    path = tmp_path / "net.py"
    path.write_text(NET.format(pause=pause, name=name, marker=str(marker)))
    return f"{path}:build", marker


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "\x1b" not in err and "Traceback" not in err
    return lines[0]


# 1. a text file as --weights
def test_weights_that_are_not_a_checkpoint_give_one_line(net, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("remember to train the model\n")
    assert main(["export", net[0], "--weights", str(notes), "--out", str(tmp_path / "x.onnx")]) == 2
    line = one_error_line(capsys)
    assert f"--weights {str(notes)!r}" in line and "is not a state_dict torch.load can read" in line
    assert not net[1].exists()  # read before the model was built


# 2. --out that cannot be written, refused before the model is built
def test_out_under_a_file_is_refused_before_any_work(net, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("somefile.txt").write_text("a file")
    assert main(["export", net[0], "--out", "somefile.txt/x.onnx"]) == 2
    assert one_error_line(capsys) == ("legofx: error: --out 'somefile.txt/x.onnx': 'somefile.txt' "
                                      "is a file, not a folder")
    assert not net[1].exists()


def test_unwritable_out_is_refused_before_any_work(net, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere but on a read-only file system
        out = "/proc/legofx-no-such-folder/x.onnx"
        folder = "/proc"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out, folder = str(locked / "x.onnx"), str(locked)
    assert main(["export", net[0], "--out", out]) == 2
    line = one_error_line(capsys)
    assert line == f"legofx: error: --out {out!r}: the folder {folder!r} is not writable"
    assert not net[1].exists()


# 3. a pickled whole model, and keys that do not fit: whole messages
def test_a_pickled_model_as_weights_gives_one_whole_line(net, tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Conv2d(4, 8, 3)), path)
    assert main(["export", net[0], "--weights", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
    line = one_error_line(capsys)
    assert line.endswith("(legofx does not unpickle objects: that could run any code)")
    assert "torch.save(model)" in line and "(torch.nn.modules.container.Sequential:" in line


def test_keys_that_do_not_fit_are_named_whole(net, tmp_path, capsys):
    from legofx.cli.model_spec import build_model

    state = legofx.transform(build_model(net[0])[0], o=2, m=0.5).state_dict()
    extra = [f"extra_{i}.{'very_long_module_name.' * 6}weight" for i in range(5)]
    state.update({key: torch.zeros(1) for key in extra})
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    out = tmp_path / "new" / "x.onnx"
    assert main(["export", net[0], "--weights", str(path), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "does not fit the model transformed with --method lego o=2 m=0.5" in line
    shown = [key for key in extra if key in line]
    assert line.count("extra_") == len(shown) >= 1  # every key named is whole
    assert f"and {len(extra) - len(shown)} more" in line
    assert not (tmp_path / "new").exists()  # the folder made for --out is gone again


# 4. Ctrl-C
def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(tmp_path):
    spec, marker = model_file(tmp_path, pause=10.0)  # the work outlasts the signal on a busy machine
    out = tmp_path / "made" / "by" / "export" / "x.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "legofx", "export", spec, "--out", str(out)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # pytest-xdist's workers ignore SIGINT, and an ignored signal is
                               # inherited: give the child a terminal's default, as a user's shell does
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # inside the transform: every call of the model pauses 10 s
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip() == "legofx: interrupted"
    assert not (tmp_path / "made").exists()


def test_a_failed_verification_leaves_no_folder_behind(net, tmp_path, capsys, monkeypatch):
    from legofx.cli import export
    from legofx.deploy.verify import MismatchError

    def mismatch(*args, **kwargs):
        raise MismatchError("outputs differ\nby a lot")

    monkeypatch.setattr(export, "export", mismatch)
    assert main(["export", net[0], "--out", str(tmp_path / "new" / "x.onnx")]) == 1
    assert capsys.readouterr().err == "FAILED: outputs differ; by a lot\n"
    assert not (tmp_path / "new").exists()


# 5. typed options: what was expected, not a function name
@pytest.mark.parametrize("args, message", [
    (["run", "--m", "abc"], "argument --m: expected a number (a fraction like 0.5 or a count like "
                            "16), got 'abc'"),
    (["run", "--method", "structured", "--c", "half"], "argument --c: expected a number"),
    (["run", "--o", "two"], "argument --o: expected an integer, got 'two'"),
    (["run", "--n", "2.5"], "argument --n: expected an integer, got '2.5'"),
    (["run", "--input-size", "big"], "argument --input-size: expected an integer, got 'big'"),
    (["run", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
    (["run", "--tolerance", "tiny"], "argument --tolerance: expected a number, got 'tiny'"),
    (["report", "m.py:f", "--m", "x"], "argument --m: expected a number"),
    (["export", "m.py:f", "--out", "x.onnx", "--batch", "b"], "argument --batch: expected an integer"),
    (["export", "m.py:f", "--out", "x.onnx", "--quantize", "int8", "--calibration", "0"],
     "argument --calibration: expected an integer >= 1, got '0'"),
    (["demo", "--epochs", "ten"], "argument --epochs: expected an integer, got 'ten'"),
    (["demo", "--batches", "1", "0"], "argument --batches: expected an integer >= 1, got '0'"),
    (["demo", "--rounds", "0"], "argument --rounds: expected an integer >= 1, got '0'"),
    (["demo", "--tolerance", "-1"], "argument --tolerance: expected a number >= 0, got '-1'"),
])
def test_typed_options_say_what_they_expected(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    line = one_error_line(capsys)
    assert message in line and "invalid" not in line and "_" not in line.split("error: ")[1]


# 6. options that do not go together, refused up front
@pytest.mark.parametrize("args, message", [
    (["--out", "x.pt2", "--quantize", "int8"],
     "--quantize int8 writes a QDQ ONNX file: --out must end in .onnx, got --out 'x.pt2'"),
    (["--out", "x.onnx", "--calibration", "4"],
     "--calibration 4 calibrates the int8 file: it needs --quantize int8"),
    (["--out", "x.onnx", "--auto-backend", "onnxruntime"],
     "--auto-backend onnxruntime says where --strategy auto times the lowerings"),
])
def test_options_that_do_not_go_together_are_refused_up_front(net, args, message, capsys,
                                                               monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["export", net[0], *args]) == 2
    assert one_error_line(capsys).startswith(f"legofx: error: {message}")
    assert not net[1].exists()


# 7. legofx report, legofx --version
def test_report_prints_what_would_be_rewritten_without_exporting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, _ = model_file(tmp_path)
    assert main(["report", spec, "--o", "2", "--m", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| stem " in out and "| head " in out and "skipped [" not in out
    assert "layers: 2 found, rewritten 2" in out and "network MACs" in out
    assert "fold equivalence" not in out and list(tmp_path.glob("*.onnx")) == []


def test_report_names_why_a_conv_is_skipped(tmp_path, capsys):
    spec, _ = model_file(tmp_path)
    assert main(["report", spec, "--o", "8", "--m", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| stem +\| skipped \[1\]", out)
    assert "[1] skipped 1 x: in_channels=4 is not divisible by o=8" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"legofx {VERSION} (torch {torch.__version__})"


# 8. the report's width and its numbers
def test_report_fits_120_columns_and_cuts_long_names_in_the_middle():
    blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)) for _ in range(2)])
    model = nn.Sequential()
    model.add_module("an_unusually_long_stage_name_from_a_model_zoo_with_deep_nesting", blocks)
    x = torch.randn(1, 8, 8, 8)
    folded = legofx.fold(legofx.transform(model, o=2, m=0.5).eval())
    text = legofx.report(folded, x)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert max(len(line) for line in table) <= 120
    assert "an_unusua" in text and "\u2026" in text and "nesting.1.0 " in text  # ends kept
    wide = legofx.report(folded, x, wide=True)
    assert "an_unusually_long_stage_name_from_a_model_zoo_with_deep_nesting.1.0" in wide
    assert "paper eq.1" in wide and "via" in wide


def test_report_ratio_of_a_1x1_conv_is_its_parameter_ratio(tmp_path, capsys):
    spec, _ = model_file(tmp_path)
    assert main(["report", spec, "--o", "2", "--m", "0.5"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| head "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    before, after = 8 * 16 + 16, 8 * 4 + 16 * 2 + 16  # dense; Lego filters, coef, bias
    assert cells[3] == f"{before}->{after}" and cells[4] == f"{before / after:.2f}x"
    assert main(["report", spec, "--o", "2", "--m", "0.5", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "params ratio" in wide and "paper eq.1" in wide and "counts the selection M" in wide


# 9. --strategy auto times where the file will run
@pytest.mark.parametrize("out, extra, backend", [
    ("auto.onnx", [], "onnxruntime"),
    ("auto.onnx", ["--quantize", "int8", "--calibration", "1"], "onnxruntime-int8"),
    ("auto.pt2", [], "eager"),
    ("auto.pt2", ["--auto-backend", "inductor"], "inductor"),
])
def test_auto_times_where_the_file_runs(net, tmp_path, capsys, monkeypatch, out, extra, backend):
    from legofx.cli import export

    seen = []

    def fold_untimed(gm, strategy, backend, **kwargs):  # timing is fold's own business
        seen.append((strategy, backend))
        return legofx.fold(gm, None, **kwargs)

    monkeypatch.setattr(export, "fold", fold_untimed)
    assert main(["export", net[0], "--out", str(tmp_path / out), "--strategy", "auto", *extra]) == 0
    assert seen == [("auto", backend)]
    assert f"lowerings (auto, timed on {backend}): " in capsys.readouterr().out


# 10. the kernel's private fallback directory
def test_the_private_kernel_directory_is_removed_at_exit(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "LEGOFX_CACHE_DIR": "/proc/legofx-cannot-exist",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    script = "from legofx.methods.lego.kernel import loader; print(loader.build())"
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(temp / "legofx-kernel-"))  # it was used
    assert list(temp.iterdir()) == []


# 11. an unexpected error: one line, the traceback on request
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys,
                                                                      monkeypatch):
    path = tmp_path / "broken.py"
    path.write_text("def build():\n    raise RuntimeError('the factory broke\\nat line two')\n")
    assert main(["run", f"{path}:build"]) == 1
    line = one_error_line(capsys)
    assert line == ("legofx: error: unexpected RuntimeError: the factory broke; at line two "
                    "(rerun with --debug or LEGOFX_DEBUG=1 for the traceback)")
    assert main(["--debug", "run", f"{path}:build"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("LEGOFX_DEBUG", "1")
    assert main([f"{path}:build"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_warnings_are_one_line_without_source_lines(tmp_path, capsys):
    path = tmp_path / "warns.py"
    path.write_text("import warnings\nfrom torch import nn\n"
                    "def build():\n    warnings.warn('careful\\nnow', UserWarning)\n"
                    "    net = nn.Sequential(nn.Conv2d(4, 8, 1))\n"
                    "    net.example_input_shape = (1, 4, 4, 4)\n    return net\n")
    assert main(["report", f"{path}:build"]) == 0
    assert capsys.readouterr().err == "legofx: warning: careful; now\n"
