"""``legofx run``: transform a model, fold it, verify the fold and print the report."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from legofx.cli.common import (MODEL_HELP, add_method_arguments, apply_method,
                               check_method_arguments, check_model_fits)
from legofx.cli.model_spec import build_model, example_input
from legofx.core.numerics import relative_error
from legofx.lowering.fold import fold
from legofx.report import report


def cmd_run(args: argparse.Namespace) -> int:
    check_method_arguments(args)
    torch.manual_seed(args.seed)
    model, shape = build_model(args.model)
    check_model_fits(model, args)
    if args.input_size:
        shape = (*shape[:-2], args.input_size, args.input_size)
    model.eval()
    x = example_input(shape, args.seed)
    start = time.perf_counter()
    gm = apply_method(model, args, x)
    transformed = time.perf_counter()
    folded = fold(gm.eval())
    done = time.perf_counter()
    print(report(folded, x))
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


def add_parser(commands) -> None:
    """Add the ``run`` subcommand to the ``legofx`` parser's subparsers."""
    run = commands.add_parser(
        "run", help="transform a model, fold it, verify the fold and print the report (default)")
    run.add_argument("model", nargs="?", default="torchvision:resnet18",
                     help=MODEL_HELP + " (default: torchvision:resnet18, random weights)")
    add_method_arguments(run)
    run.add_argument("--input-size", type=int, default=None, help="spatial size of the example input")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--tolerance", type=float, default=1e-5,
                     help="largest relative error of fold vs training form (float32)")
    run.set_defaults(handler=cmd_run)
