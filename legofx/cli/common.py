"""Arguments every ``legofx`` command that rewrites a model shares: ``--method`` and its settings,
checked before any slow work."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch import nn

from legofx.cli.model_spec import build_model, example_input
from legofx.cli.options import integer, size
from legofx.core.arguments import check_positive_int, check_size_spec
from legofx.core.records import summary
from legofx.methods.lego.api import transform
from legofx.methods.structured.api import structure

MODEL_HELP = ("torchvision:NAME, timm:NAME or path/to/file.py:factory (this imports and runs "
              "the file's code, as python would: use only files you trust)")


def _patterns(text: str) -> list[str]:
    """One ``--include`` / ``--exclude`` value: names or patterns, comma-separated."""
    names = [name for name in text.split(",") if name]
    spec = next((name for name in names if ":" in name), None)
    if spec is not None:
        raise argparse.ArgumentTypeError(
            f"{spec!r} looks like a MODEL, not a conv name: give MODEL before the options")
    return names


def add_model_arguments(sub: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """MODEL, ``--method`` and its settings, ``--input-size``, ``--seed`` and ``--debug``:
    shared by ``run``, ``report`` and ``export``."""
    if default_model is None:
        sub.add_argument("model", help=MODEL_HELP)
    else:
        sub.add_argument("model", nargs="?", default=default_model,
                         help=f"{MODEL_HELP} (default: {default_model}, random weights)")
    add_method_arguments(sub)
    sub.add_argument("--input-size", type=integer, default=None, metavar="N",
                     help="spatial size of the example input (default: the model's)")
    sub.add_argument("--seed", type=integer, default=0, metavar="N",
                     help="seed of the random weights and inputs (default 0)")
    add_debug_argument(sub)


def add_debug_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show the traceback of an unexpected error (or set LEGOFX_DEBUG=1)")


def add_method_arguments(sub: argparse.ArgumentParser) -> None:
    """``--method`` and its settings."""
    sub.add_argument("--method", choices=["lego", "structured"], default="lego",
                     help="lego: legofx.transform (default); structured: legofx.structure")
    sub.add_argument("--o", type=integer, default=2, help="lego: input-channel fragments (default 2)")
    sub.add_argument("--m", type=size, default=0.5,
                     help="lego: Lego filters, a fraction of out_channels (0.5) or a count (16)")
    sub.add_argument("--c", type=size, default=0.5,
                     help="structured: underlying channels, a fraction of in_channels or a count")
    sub.add_argument("--n", type=integer, default=2, help="structured: underlying kernel size (default 2)")
    for name in ("include", "exclude"):
        sub.add_argument(f"--{name}", type=_patterns, action="extend", default=None,
                         help="conv names or glob patterns, comma-separated; repeat the option "
                              "for more (it takes one value, so MODEL may follow it)")


def check_method_arguments(args: argparse.Namespace) -> None:
    """The method's settings, before the model is built (errors name the option)."""
    checks = ([("c", check_size_spec, "each layer's in_channels"), ("n", check_positive_int, None)]
              if args.method == "structured" else
              [("o", check_positive_int, None), ("m", check_size_spec, "each layer's out_channels")])
    for name, check, of in checks:
        try:
            check(name, getattr(args, name), **({"of": of} if of else {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--{name} {getattr(args, name)}: {err}") from None
    for name in ("input_size", "batch"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value}")


def check_model_fits(model: nn.Module, args: argparse.Namespace) -> None:
    """Refuse settings no conv of ``model`` can take, before the slow rewrite."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{args.model} has no nn.Conv2d: there is nothing to rewrite")
    if args.method == "structured":
        largest = max(min(conv.kernel_size) for conv in convs)
        if args.n > largest:
            raise ValueError(f"--n {args.n} exceeds every conv's kernel size (largest {largest})")
        if isinstance(args.c, int) and args.c > max(conv.in_channels for conv in convs):
            raise ValueError(f"--c {args.c} exceeds every conv's in_channels "
                             f"(largest {max(conv.in_channels for conv in convs)})")
        return
    if not any(conv.in_channels % args.o == 0 for conv in convs):
        raise ValueError(f"--o {args.o} divides no conv's in_channels "
                         f"({', '.join(map(str, sorted({c.in_channels for c in convs})[:8]))}...)")
    if isinstance(args.m, int) and args.m > max(conv.out_channels for conv in convs):
        raise ValueError(f"--m {args.m} exceeds every conv's out_channels "
                         f"(largest {max(conv.out_channels for conv in convs)})")


def apply_method(model: torch.nn.Module, args: argparse.Namespace,
                 example: torch.Tensor | None = None) -> torch.nn.Module:
    """The training form of ``model`` under the method and settings of ``args``, checked on
    ``example`` against the original (``legofx.InterfaceError`` names a difference); warns on
    stderr when no conv could be rewritten."""
    shared = {"include": args.include, "exclude": args.exclude, "example_inputs": example}
    if args.method == "structured":
        gm = structure(model, c=args.c, n=args.n, **shared)
    else:
        gm = transform(model, o=args.o, m=args.m, **shared)
    records = summary(gm)
    if not any(record.rewritten for record in records):
        reason, count = Counter(record.reason for record in records).most_common(1)[0]
        print(f"legofx: warning: no conv was rewritten with {method_settings(args)} "
              f"({count} of {len(records)}: {reason})", file=sys.stderr)
    return gm


def method_settings(args: argparse.Namespace) -> str:
    return f"c={args.c} n={args.n}" if args.method == "structured" else f"o={args.o} m={args.m}"


def prepare_model(args: argparse.Namespace, batch: int | None = None
                  ) -> tuple[nn.Module, tuple[int, ...], torch.Tensor]:
    """The model of ``args.model`` in eval mode (its settings checked, before the rewrite), the
    example input's shape (``--input-size``; ``batch`` when given) and the example input."""
    torch.manual_seed(args.seed)
    model, shape = build_model(args.model)
    check_model_fits(model, args)
    size = (args.input_size,) * 2 if args.input_size else tuple(shape[-2:])
    shape = (shape[0] if batch is None else batch, *shape[1:-2], *size)
    return model.eval(), shape, example_input(shape, args.seed)
