"""``legofx report``: what a rewrite would do to a model, conv by conv, without exporting."""

from __future__ import annotations

import argparse

from legofx.cli.common import add_model_arguments, apply_method, check_method_arguments, prepare_model
from legofx.cli.run import add_wide_argument
from legofx.lowering.fold import fold
from legofx.report import report


def cmd_report(args: argparse.Namespace) -> int:
    check_method_arguments(args)
    model, _, x = prepare_model(args)
    folded = fold(apply_method(model, args, x).eval())
    print(report(folded, x, wide=args.wide))
    return 0


def add_parser(commands) -> None:
    """Add the ``report`` subcommand to the ``legofx`` parser's subparsers."""
    sub = commands.add_parser(
        "report", help="print which convs a rewrite takes (and why not the others), their "
                       "parameters and MACs before and after, without exporting")
    add_model_arguments(sub)
    add_wide_argument(sub)
    sub.set_defaults(handler=cmd_report)
