"""The main job (``legofx demo``) on a tiny budget: every stage runs, every table row and the
picture are produced, and what it prints is what its JSON renders to."""

import contextlib
import copy
import io
import json
import re

import pytest
from legofx.cli import main
from legofx.cli.demo import ROWS, fold_failures, render
from legofx.demo import realistic

from helpers import snapshot, assert_unchanged

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

TINY_MODEL = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))
"""
SIZE_ROWS = ("original", "Lego, folded for ONNX Runtime")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"\s{2,}", line.strip())]


def table_rows(out: str, first: tuple[str, ...]) -> list[list[str]]:
    return [row for row in map(cells, out.splitlines()) if row[0] in first]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny run of the whole demo, every backend: 1 epoch, a two-conv model at 16x16;
    returns its folder, what it printed, and its JSON."""
    folder = tmp_path_factory.mktemp("demo")
    (folder / "tiny.py").write_text(TINY_MODEL)
    argv = ["demo", "--epochs", "1", "--quiet", "--out", str(folder / "out"), "--keep-onnx",
            "--model", f"{folder / 'tiny.py'}:build", "--size", "16", "--batches", "1",
            "--rounds", "1"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    return folder, out.getvalue(), json.loads((folder / "out" / "demo.json").read_text())


def test_demo_prints_every_row_and_saves_the_picture(demo_run):
    folder, out, results = demo_run
    digits = table_rows(out, tuple(label for _, label in ROWS))
    assert [row[0] for row in digits] == [label for _, label in ROWS], out
    dense = digits[0]
    for row in digits[1:]:
        # the Lego nets' conv parameters: at least 3x fewer (a property of o=2, m=0.5)
        assert int(dense[3].replace(",", "")) >= 3 * int(row[3].replace(",", ""))
        assert float(row[-1]) < 1e-5  # fold vs training form, float32
    assert [row[0] for row in table_rows(out, SIZE_ROWS)] == list(SIZE_ROWS), out
    latency = table_rows(out, realistic.BACKENDS)
    expected = [(backend, baseline, batch) for backend, baselines in
                (("eager", ("original", "original, channels-last")), ("inductor", ("original",)),
                 ("onnxruntime", ("original",)))
                for batch in ("1",) for baseline in baselines]
    assert [(row[0], row[2], row[3]) for row in latency] == expected, out
    for row in latency:
        assert float(row[4]) > 0 and float(row[5]) > 0
    # legofx.export takes quantize="int8": the int8 rows are there, with the file sizes
    assert results["realistic"]["int8"].startswith("int8: original and Lego (fold(auto"), out
    assert results["realistic"]["lowerings"]["onnxruntime int8"].startswith("auto timed as int8")
    assert results["realistic"]["size"]["lego"]["int8_file_mb"] > 0

    assert out == render(results) + "\n"  # what it prints is its JSON, rendered
    picture = folder / "out" / "demo.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"picture: {picture}" in out
    assert (folder / "out" / "build_lego.onnx").stat().st_size > 0
    assert (folder / "out" / "lego_digits.onnx").stat().st_size > 0


def test_a_fold_error_above_the_tolerance_fails_the_demo(demo_run):
    _, _, results = demo_run
    assert fold_failures(results, 1e-5) == []
    off = copy.deepcopy(results)
    off["digits"]["tuned"]["fold_error"] = off["realistic"]["fold_error"] = 2e-5
    assert fold_failures(off, 1e-5) == [ROWS[2][1], "build (part 2)"]
    assert fold_failures(off, 3e-5) == []


def test_the_output_says_when_the_machine_was_busy(demo_run):
    """Latencies measured while others load the machine are not representative: said so."""
    _, _, results = demo_run
    env = copy.deepcopy(results)["environment"]
    for load, busy in ((0.0, False), (env["cpus"], True)):
        results_at = {**results, "environment": {**env, "load_start": load, "load_end": env["cpus"]}}
        assert ("busy: the latencies" in render(results_at)) == busy


class QuantizingExport:
    """A stand-in for an ``export`` that takes ``quantize=``: records the call, exports as is."""

    def __init__(self, export):
        self.export, self.calls = export, []

    def __call__(self, model, example_inputs, path, *, check=None, quantize=None, calibration=None):
        if quantize is not None:
            self.calls.append((quantize, len(calibration)))
        return self.export(model, example_inputs, path, check=check)


def test_an_int8_row_appears_where_export_quantizes(monkeypatch, tmp_path):
    exec(TINY_MODEL, namespace := {})
    model = namespace["build"]()
    before = snapshot(model)
    setup = realistic.Setup(size=16, batches=(1,), rounds=1, backends=("onnxruntime",))
    fake = QuantizingExport(realistic.export)
    monkeypatch.setattr(realistic, "export", fake)
    results = realistic.run(model, setup, tmp_path, quiet=True)
    assert fake.calls == [("int8", 4), ("int8", 4)]  # original and Lego
    assert [row["backend"] for row in results["latency"]] == ["onnxruntime", "onnxruntime int8"]
    assert results["size"]["lego"]["int8_file_mb"] > 0
    assert_unchanged(model, before)
    assert model.training  # its mode given back


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "epochs"), (["--batches", "0"], "batch"), (["--size", "0"], "size"),
    (["--rounds", "0"], "rounds"), (["--tolerance", "0"], "tolerance"),
    (["--model", "resnet18"], "MODEL"),
])
def test_demo_rejects_bad_settings_before_any_work(argv, named, capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was made
