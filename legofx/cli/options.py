"""Typed command-line values with errors that say what was expected, and a parser whose errors
are one line."""

from __future__ import annotations

import argparse
import re
import sys

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str) -> str:
    """``text`` without terminal escapes, its lines joined by "; " (whole, not cut)."""
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", str(text)).splitlines()]
    return "; ".join(line for line in lines if line)


def size(text: str) -> int | float:
    """``--m`` / ``--c``: a fraction (float) or a count (int)."""
    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number (a fraction like 0.5 or a count like 16), got {text!r}") from None


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_integer(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``legofx run: error: ...``."""

    def error(self, message: str):
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
