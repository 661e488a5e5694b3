"""Progress reports (a bar on a terminal, plain lines otherwise) and files written whole or not
at all (:mod:`legofx.core.progress`, :mod:`legofx.core.files`)."""

import io
import os
import sys

import pytest

from legofx.core import files
from legofx.core.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    assert list(progress(["fold", "time"], "demo", "step")) == ["fold", "time"]
    assert list(progress(range(2), "training", "epoch")) == [0, 1]
    lines = capsys.readouterr().err.splitlines()
    assert [line.rsplit(",", 1)[0] for line in lines] == [
        "demo: fold (1/2)", "demo: time (2/2)", "training: epoch 1/2", "training: epoch 2/2"]


def test_a_plain_line_is_out_before_its_step_runs(capsys):
    for _ in progress(["slow step"], "demo", "step"):
        assert "demo: slow step (1/1)" in capsys.readouterr().err


def test_a_bar_on_a_terminal_and_nothing_when_quiet(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(["fold"], "demo", "step")) == ["fold"]
    assert "demo:" in terminal.getvalue() and "fold (1/1)" not in terminal.getvalue()  # tqdm's bar
    assert list(progress(["fold"], "quiet demo", "step", quiet=True)) == ["fold"]
    assert "quiet demo" not in terminal.getvalue() + capsys.readouterr().err


def test_a_failed_write_leaves_the_old_file_and_no_part(monkeypatch, tmp_path):
    path = tmp_path / "demo.json"
    files.write_atomically(path, "old")

    def fail(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomically(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["demo.json"]
    monkeypatch.undo()
    assert files.write_atomically(tmp_path / "sub" / "demo.png", b"\x89PNG").read_bytes() == b"\x89PNG"
