"""The main job (``legofx demo``) on a one-epoch budget: every stage runs and is reported."""

import re

import pytest

from legofx.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")


def test_demo_trains_folds_exports_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "lego_digits.onnx").stat().st_size > 0
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in re.split(r"\s{2,}", line.strip())]
        if cells[0] in ("dense CNN", "Lego o=2 m=0.5, from scratch",
                        "Lego o=2 m=0.5, init='weights' + fine-tune"):
            rows[cells[0]] = cells
    assert len(rows) == 3, out
    dense = rows["dense CNN"]
    for label, cells in rows.items():
        accuracy = float(cells[1])
        assert 0.0 <= accuracy <= 100.0
        if label != "dense CNN":
            # the Lego nets' conv parameters: at least 3x fewer (a property of o=2, m=0.5)
            assert int(dense[3].replace(",", "")) >= 3 * int(cells[3].replace(",", ""))
            assert float(cells[-1]) < 1e-5  # fold vs training form, float32
    assert "checked in ONNX Runtime" in out


def test_demo_rejects_a_bad_budget(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err
