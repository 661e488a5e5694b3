"""``legofx run``: transform a model, fold it, verify the fold and print the report."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from legofx.cli.common import add_model_arguments, apply_method, check_method_arguments, prepare_model
from legofx.cli.options import non_negative_number
from legofx.core.numerics import relative_error
from legofx.lowering.fold import fold
from legofx.report import report


def cmd_run(args: argparse.Namespace) -> int:
    check_method_arguments(args)
    model, shape, x = prepare_model(args)
    start = time.perf_counter()
    gm = apply_method(model, args, x)
    transformed = time.perf_counter()
    folded = fold(gm.eval())
    done = time.perf_counter()
    print(report(folded, x, wide=args.wide))
    with torch.no_grad():
        error = relative_error(folded(x), gm.eval()(x))
    print(f"\ntransform {transformed - start:.2f} s, fold {done - transformed:.2f} s; "
          f"fold vs training form (eval, input {tuple(shape)}): relative error {error:.2e}")
    if error > args.tolerance:
        print(f"FAILED: relative error {error:.2e} exceeds --tolerance {args.tolerance:g}",
              file=sys.stderr)
        return 1
    print("fold equivalence verified")
    return 0


def add_wide_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--wide", action="store_true",
                     help="show every column of the report (how each conv is reached, its form, "
                          "settings, the paper's formulas); by default it fits 120 columns")


def add_parser(commands) -> None:
    """Add the ``run`` subcommand to the ``legofx`` parser's subparsers."""
    run = commands.add_parser(
        "run", help="transform a model, fold it, verify the fold and print the report (default)")
    add_model_arguments(run, default_model="torchvision:resnet18")
    run.add_argument("--tolerance", type=non_negative_number, default=1e-5,
                     help="largest relative error of fold vs training form (float32)")
    add_wide_argument(run)
    run.set_defaults(handler=cmd_run)
