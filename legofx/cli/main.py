"""The ``legofx`` command line: ``run`` (default), ``report``, ``export``, ``demo``."""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch

from legofx.cli import demo, export, report, run
from legofx.cli.common import add_debug_argument
from legofx.cli.options import Parser, one_line
from legofx.core.version import VERSION

COMMANDS = ("run", "report", "export", "demo")
INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def version() -> str:
    return f"legofx {VERSION} (torch {torch.__version__})"


def parser() -> Parser:
    top = Parser(prog="legofx", description="Rewrite a model's convolutions into LegoNet or "
                 "Structured Convolution layers: run (the default), report, export, demo.")
    top.add_argument("--version", action="version", version=version())
    add_debug_argument(top)
    commands = top.add_subparsers(dest="command")
    run.add_parser(commands)
    report.add_parser(commands)
    export.add_parser(commands)
    demo.add_parser(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; returns the exit status. Errors are one line on stderr
    (2: bad arguments or a model the settings do not fit; 1: an unexpected error); Ctrl-C
    prints one line and returns 130. ``--debug`` or ``LEGOFX_DEBUG=1`` shows tracebacks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((arg for arg in argv if arg != "--debug"), None)
    if first is None or first not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(argv.index(first) if first is not None else len(argv), "run")
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        args = parser().parse_args(argv)
        debug = getattr(args, "debug", False) or os.environ.get("LEGOFX_DEBUG", "") not in ("", "0")
        try:
            return args.handler(args)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
            if debug:
                traceback.print_exc()
            print(f"legofx: error: {one_line(err)}", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001 - one line, not a traceback
            if debug:
                traceback.print_exc()
            print(f"legofx: error: unexpected {type(err).__name__}: {one_line(err)} (rerun with "
                  f"--debug or LEGOFX_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("legofx: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, ``legofx: warning: ...``, without the source line that raised it."""
    text = one_line(message).removeprefix("legofx: ")
    print(f"legofx: warning: {text}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
