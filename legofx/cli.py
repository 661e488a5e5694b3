"""The ``legofx`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from legofx.lego import transform
from legofx.model_spec import build_model, example_input
from legofx.report import report
from legofx.rewrite import fold


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` over the whole tensor (in float64)."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _size_arg(text: str) -> int | float:
    return float(text) if any(ch in text for ch in ".eE") else int(text)


def add_method_arguments(sub: argparse.ArgumentParser) -> None:
    """``--method`` and its settings, shared by ``run`` and ``export``."""
    sub.add_argument("--method", choices=["lego", "structured"], default="lego",
                     help="lego: legofx.transform (default); structured: legofx.structure")
    sub.add_argument("--o", type=int, default=2, help="lego: input-channel fragments (default 2)")
    sub.add_argument("--m", type=_size_arg, default=0.5,
                     help="lego: Lego filters, a fraction of out_channels (0.5) or a count (16)")
    sub.add_argument("--c", type=_size_arg, default=0.5,
                     help="structured: underlying channels, a fraction of in_channels or a count")
    sub.add_argument("--n", type=int, default=2, help="structured: underlying kernel size (default 2)")
    sub.add_argument("--include", nargs="*", default=None, help="conv names or glob patterns")
    sub.add_argument("--exclude", nargs="*", default=None, help="conv names or glob patterns")


def apply_method(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The training form of ``model`` under the method and settings of ``args``."""
    if args.method == "structured":
        from legofx.structure import structure

        return structure(model, c=args.c, n=args.n, include=args.include, exclude=args.exclude)
    return transform(model, o=args.o, m=args.m, include=args.include, exclude=args.exclude)


def method_settings(args: argparse.Namespace) -> str:
    return f"c={args.c} n={args.n}" if args.method == "structured" else f"o={args.o} m={args.m}"


def cmd_run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model, shape = build_model(args.model)
    if args.input_size:
        shape = (*shape[:-2], args.input_size, args.input_size)
    model.eval()
    x = example_input(shape, args.seed)
    start = time.perf_counter()
    gm = apply_method(model, args)
    transformed = time.perf_counter()
    folded = fold(gm)
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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="legofx", description=__doc__)
    commands = top.add_subparsers(dest="command")
    run = commands.add_parser(
        "run", help="transform a model, fold it, verify the fold and print the report (default)")
    run.add_argument("model", nargs="?", default="torchvision:resnet18",
                     help="torchvision:NAME, timm:NAME or path/to/file.py:factory "
                          "(default: torchvision:resnet18, random weights)")
    add_method_arguments(run)
    run.add_argument("--input-size", type=int, default=None, help="spatial size of the example input")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--tolerance", type=float, default=1e-5,
                     help="largest relative error of fold vs training form (float32)")
    run.set_defaults(handler=cmd_run)
    from legofx.cli_demo import add_parser as add_demo
    from legofx.cli_export import add_parser as add_export  # it imports this module

    add_demo(commands)
    add_export(commands)
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
