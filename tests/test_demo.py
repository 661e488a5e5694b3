"""The main job (``legofx demo``) on a tiny budget: every stage runs, every table row and the
picture are produced, and what it prints is what its JSON renders to."""

import contextlib
import copy
import io
import json
import re

import pytest
from legofx.cli import main
from legofx.cli.demo import ROWS, SIZE_ROWS, fold_failures, render, unrepresentative
from legofx.demo import realistic
from legofx.lowering.fold import fold
from legofx.methods.lego.api import transform

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
SIZE_LABELS = tuple(label for _, label in SIZE_ROWS)
SPEED_ROWS = (*realistic.BACKENDS, "onnxruntime int8")


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
    argv = ["demo", "--epochs", "1", "--quiet", "--out", str(folder / "out"),
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
    assert [row[0] for row in table_rows(out, SIZE_LABELS)] == list(SIZE_LABELS), out
    latency = table_rows(out, SPEED_ROWS)
    assert [(row[0], row[1]) for row in latency] == [(backend, "1") for backend in SPEED_ROWS], out
    for printed, row in zip(latency, results["realistic"]["latency"]):
        assert float(printed[4]) > 0 and float(printed[5]) > 0
        # the baseline is the fastest original variant of the same run, named
        assert row["original_ms"] == min(row["baselines_ms"].values()) == row["baselines_ms"][row["baseline"]]
        assert printed[3] == row["baseline"]
    eager = results["realistic"]["latency"][0]["baselines_ms"]
    assert set(eager) == {"original", "original, BN fused", "original, channels-last",
                          "original, BN fused, channels-last"}
    # the int8 row is the float file, quantized
    assert results["realistic"]["int8"].startswith("int8: the float ONNX files above, quantized"), out
    assert results["realistic"]["size"]["accumulate"]["int8_file_bytes"] > 0

    assert out == render(results) + "\n"  # what it prints is its JSON, rendered
    picture = folder / "out" / "demo.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"picture: {picture}" in out
    # no --keep-onnx: the ONNX files went with a temporary folder, and the JSON names none
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["demo.json", "demo.png"]
    assert "path" not in results["digits"]["export"]


def test_every_duration_printed_is_measured(demo_run):
    _, out, results = demo_run
    seconds = results["seconds"]
    assert seconds["total"] >= sum(value for key, value in seconds.items() if key != "total") * 0.99
    assert f"done in {seconds['total']:.0f} s: set-up" in out
    longer = {**results, "seconds": {**seconds, "total": seconds["total"] + 1000}}
    assert f"done in {seconds['total'] + 1000:.0f} s" in render(longer)


def test_a_lego_model_with_the_originals_graph_shows_no_ratio(demo_run):
    """``auto`` may keep every layer dense: the original's graph, where a ratio is noise."""
    _, _, results = demo_run
    exec(TINY_MODEL, namespace := {})
    gm = transform(namespace["build"](), o=2, m=0.5).eval()
    assert realistic.same_graph(fold(gm, "dense")) and not realistic.same_graph(fold(gm, "accumulate"))
    rows = copy.deepcopy(results["realistic"]["latency"])
    rows[0]["same_graph"] = True
    printed = render({**results, "realistic": {**results["realistic"], "latency": rows}})
    first = table_rows(printed, SPEED_ROWS)[0]
    assert first[6] == "same graph as the original" and first[8] == "-"


def test_a_fold_error_above_the_tolerance_fails_the_demo(demo_run):
    _, _, results = demo_run
    assert fold_failures(results, 1e-5) == []
    off = copy.deepcopy(results)
    off["digits"]["tuned"]["fold_error"] = off["realistic"]["fold_error"] = 2e-5
    assert fold_failures(off, 1e-5) == [ROWS[2][1], "build (part 2)"]
    assert fold_failures(off, 3e-5) == []


def test_the_output_says_when_the_latencies_are_not_representative(demo_run):
    """Others' load at the start or end, or a large spread of the timed rounds: one line says so."""
    _, _, results = demo_run
    quiet_rows = [{**row, "spread": 0.01} for row in results["realistic"]["latency"]]
    quiet = {**results, "realistic": {**results["realistic"], "latency": quiet_rows},
             "environment": {**results["environment"], "load_start": 0.2, "load_end": 1.9, "own_load": 1.8}}
    assert unrepresentative(quiet) == [] and "NOT REPRESENTATIVE" not in render(quiet)
    for change, reason in (({"load_start": 1.5}, "load 1.5 at the start"),
                           ({"load_end": 3.5}, "others' load about 1.7 at the end (3.5 less the demo's own 1.8)")):
        busy = {**quiet, "environment": {**quiet["environment"], **change}}
        assert unrepresentative(busy) == [reason] and "NOT REPRESENTATIVE: " in render(busy)
    noisy_rows = copy.deepcopy(quiet_rows)
    noisy_rows[-1]["spread"] = 0.3
    noisy = {**quiet, "realistic": {**quiet["realistic"], "latency": noisy_rows}}
    assert unrepresentative(noisy) == [f"timed rounds spread up to 30% ({noisy_rows[-1]['backend']}, batch 1)"]


def test_int8_rows_come_from_the_float_files_quantized(tmp_path):
    exec(TINY_MODEL, namespace := {})
    model = namespace["build"]()
    before = snapshot(model)
    setup = realistic.Setup(size=16, batches=(1,), rounds=1, backends=("onnxruntime",))
    results = realistic.run(model, setup, tmp_path, quiet=True)
    assert [row["backend"] for row in results["latency"]] == ["onnxruntime", "onnxruntime int8"]
    assert [row["lowering"] for row in results["latency"]] == ["fold 'accumulate', BN fused"] * 2
    sizes = results["size"]
    assert sizes["accumulate"]["int8_file_bytes"] == (tmp_path / "model_lego_int8.onnx").stat().st_size
    assert sizes["original"]["file_bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert_unchanged(model, before)
    assert model.training  # its mode given back


def test_a_failed_quantization_leaves_the_int8_rows_out(monkeypatch, tmp_path):
    def fails(*args, **kwargs):
        raise RuntimeError("no int8 here")

    monkeypatch.setattr(realistic, "quantize_file", fails)
    exec(TINY_MODEL, namespace := {})
    setup = realistic.Setup(size=16, batches=(1,), rounds=1, backends=("onnxruntime",))
    results = realistic.run(namespace["build"](), setup, tmp_path, quiet=True)
    assert [row["backend"] for row in results["latency"]] == ["onnxruntime"]
    assert results["int8"] == "int8 row left out: quantizing failed: RuntimeError: no int8 here"


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "epochs"), (["--batches", "0"], "batch"), (["--size", "0"], "size"),
    (["--rounds", "0"], "rounds"), (["--tolerance", "0"], "tolerance"),
    (["--model", "resnet18"], "MODEL"),
])
def test_demo_rejects_bad_settings_before_any_work(argv, named, capsys, tmp_path):
    try:
        status = main(["demo", "--out", str(tmp_path / "out"), *argv])
    except SystemExit as stop:  # refused by the option's type, as argparse does
        status = stop.code
    assert status == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was made
