"""``legofx export``: transform, (load trained weights,) fold, export and verify a model."""

from __future__ import annotations

import argparse
import sys

import torch

from legofx.cli import add_method_arguments, apply_method, method_settings
from legofx.deploy import MismatchError, export
from legofx.model_spec import build_model, example_input
from legofx.records import summary
from legofx.rewrite import fold

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cmd_export(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model, shape = build_model(args.model)
    size = (args.input_size,) * 2 if args.input_size else shape[-2:]
    shape = (args.batch, *shape[1:-2], *size)
    gm = apply_method(model.eval(), args)
    if args.weights:
        gm.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    folded = fold(gm.eval(), fuse_batchnorm=args.fuse_batchnorm).to(DTYPES[args.dtype])
    x = example_input(shape, args.seed).to(DTYPES[args.dtype])
    rewritten = sum(record.rewritten for record in summary(folded))
    print(f"{args.model}: {args.method} {method_settings(args)}, {rewritten} of "
          f"{len(summary(folded))} convs rewritten, folded, {args.dtype}, input {tuple(shape)}")
    try:
        result = export(folded, x, args.out, check=None if args.check == "none" else args.check)
    except MismatchError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    kind = "ONNX" if result.format == "onnx" else "torch.export program"
    print(f"wrote {result.path} ({kind}, dynamic batch)")
    print(result)
    print("export verified")
    return 0


def add_parser(commands) -> None:
    """Add the ``export`` subcommand to the ``legofx`` parser's subparsers."""
    sub = commands.add_parser(
        "export", help="transform and fold a model, export it to .onnx or .pt2 and verify the file")
    sub.add_argument("model", help="torchvision:NAME, timm:NAME or path/to/file.py:factory")
    sub.add_argument("--out", required=True, help="output file: model.onnx or model.pt2")
    add_method_arguments(sub)
    sub.add_argument("--weights", default=None,
                     help="state_dict of the transformed model (e.g. after training) to load "
                          "before folding; without it the weights are random")
    sub.add_argument("--input-size", type=int, default=None, help="spatial size of the example input")
    sub.add_argument("--batch", type=int, default=1, help="example batch (the batch stays dynamic)")
    sub.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    sub.add_argument("--check", choices=["tensorrt", "none"], default="tensorrt",
                     help="refuse graphs with ops Torch-TensorRT does not convert (default)")
    sub.add_argument("--fuse-batchnorm", action="store_true",
                     help="fold each BatchNorm that follows a folded layer into it "
                          "(fold(..., fuse_batchnorm=True))")
    sub.add_argument("--seed", type=int, default=0)
    sub.set_defaults(handler=cmd_export)
