"""The ``legofx`` command line: ``run`` (default), ``demo``, ``export``."""

from __future__ import annotations

import argparse
import sys

from legofx.cli import demo, export, run


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="legofx", description=__doc__)
    commands = top.add_subparsers(dest="command")
    run.add_parser(commands)
    demo.add_parser(commands)
    export.add_parser(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "demo", "export", "-h", "--help"):
        argv = ["run", *argv]
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"legofx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
