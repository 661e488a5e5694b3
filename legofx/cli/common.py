"""Arguments every ``legofx`` command that rewrites a model shares: ``--method`` and its settings."""

from __future__ import annotations

import argparse

import torch

from legofx.methods.lego.api import transform
from legofx.methods.structured.api import structure


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
        return structure(model, c=args.c, n=args.n, include=args.include, exclude=args.exclude)
    return transform(model, o=args.o, m=args.m, include=args.include, exclude=args.exclude)


def method_settings(args: argparse.Namespace) -> str:
    return f"c={args.c} n={args.n}" if args.method == "structured" else f"o={args.o} m={args.m}"
