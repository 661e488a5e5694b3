"""``legofx export``: transform, (load trained weights,) fold, export and verify a model."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

from legofx.cli.common import (add_model_arguments, apply_method, check_method_arguments,
                               method_settings, prepare_model)
from legofx.cli.model_spec import example_input
from legofx.cli.options import integer, one_line, positive_integer
from legofx.cli.output import check_out, out_folders
from legofx.cli.weights import load_weights, read_weights
from legofx.core.records import summary
from legofx.deploy.exporter import MismatchError, export
from legofx.lowering.auto import check_backend
from legofx.lowering.fold import fold
from legofx.lowering.registry import BACKENDS, by_name_only, known_lowerings

DTYPES = {"float32": torch.float32, "float16": torch.float16}
CALIBRATION_BATCHES = 8


def auto_backend(args: argparse.Namespace) -> str:
    """Where ``--strategy auto`` times: ``--auto-backend``, else the runtime of the file written
    (ONNX Runtime for .onnx, int8 with ``--quantize int8``; eager PyTorch for .pt2)."""
    if args.auto_backend is not None:
        return args.auto_backend
    if args.strategy != "auto" or not args.out.lower().endswith(".onnx"):
        return "eager"
    return "onnxruntime-int8" if args.quantize else "onnxruntime"


def _check_arguments(args: argparse.Namespace) -> dict | None:
    """Everything that can be checked before the slow work; returns the ``--weights``."""
    check_method_arguments(args)
    check_out(args.out)
    if args.quantize and not args.out.lower().endswith(".onnx"):
        raise ValueError(f"--quantize {args.quantize} writes a QDQ ONNX file: --out must end "
                         f"in .onnx, got --out {args.out!r}")
    if args.calibration is not None and not args.quantize:
        raise ValueError(f"--calibration {args.calibration} calibrates the int8 file: it needs "
                         f"--quantize int8")
    if args.strategy is not None and args.strategy not in {"auto", *known_lowerings()}:
        raise ValueError(f"--strategy must be auto or a lowering "
                         f"({', '.join(sorted(known_lowerings() - by_name_only()))}), "
                         f"got --strategy {args.strategy!r}")
    if args.auto_backend is not None and args.strategy != "auto":
        raise ValueError(f"--auto-backend {args.auto_backend} says where --strategy auto times "
                         f"the lowerings; with --strategy {args.strategy} nothing is timed: drop "
                         f"--auto-backend or use --strategy auto")
    check_backend(auto_backend(args), args.strategy)
    if args.strategy in by_name_only():
        raise ValueError(f"--strategy {args.strategy}: its merge is a legofx custom op, which ONNX "
                         f"and TensorRT do not take; export with gather, accumulate, merge-conv, "
                         f"dense or auto, and run {args.strategy!r} in PyTorch "
                         f"(legofx.fold(gm, {args.strategy!r}), eager or torch.compile)")
    return read_weights(args.weights) if args.weights else None


def cmd_export(args: argparse.Namespace) -> int:
    state = _check_arguments(args)
    model, shape, x = prepare_model(args, batch=args.batch)
    with out_folders(args.out) as created:
        status = _export(model, shape, x, state, args)
        if status != 0:
            created.remove()
        return status


def _export(model, shape, x, state, args: argparse.Namespace) -> int:
    gm = apply_method(model, args, x)
    if state is not None:
        load_weights(gm, state, args, method_settings(args))
    backend = auto_backend(args)
    folded = fold(gm.eval(), args.strategy, example_inputs=x, fuse_batchnorm=args.fuse_batchnorm,
                  backend=backend)
    folded, x = folded.to(DTYPES[args.dtype]), x.to(DTYPES[args.dtype])
    records = summary(folded)
    rewritten = [record for record in records if record.rewritten]
    print(f"{args.model}: {args.method} {method_settings(args)}, {len(rewritten)} of "
          f"{len(records)} convs rewritten, folded, {args.dtype}, input {tuple(shape)}")
    if args.strategy == "auto":
        kinds = Counter(record.lowering.split(" ")[0] for record in rewritten)
        print(f"lowerings (auto, timed on {backend}): "
              + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())))
    calibration = None
    if args.quantize:
        calibration = [example_input(shape, args.seed + 1 + i).to(x.dtype)
                       for i in range(args.calibration or CALIBRATION_BATCHES)]
    try:
        result = export(folded, x, args.out, check=None if args.check == "none" else args.check,
                        quantize=args.quantize, calibration=calibration)
    except MismatchError as err:
        print(f"FAILED: {one_line(err)}", file=sys.stderr)
        return 1
    kind = "ONNX" if result.format == "onnx" else "torch.export program"
    print(f"wrote {result.path} ({kind}{', ' + args.quantize + ' QDQ' if args.quantize else ''}, "
          f"{'dynamic' if result.dynamic else 'fixed'} batch, {result.size_bytes / 1e6:.2f} MB)")
    print(result)
    print("export verified")
    return 0


def add_parser(commands) -> None:
    """Add the ``export`` subcommand to the ``legofx`` parser's subparsers."""
    sub = commands.add_parser(
        "export", help="transform and fold a model, export it to .onnx or .pt2 and verify the file")
    add_model_arguments(sub)
    sub.add_argument("--out", required=True, metavar="FILE",
                     help="output file: model.onnx or model.pt2 (missing folders are created)")
    sub.add_argument("--weights", default=None, metavar="PATH",
                     help="state_dict of the transformed model (e.g. after training) to load "
                          "before folding; without it the weights are random")
    sub.add_argument("--batch", type=integer, default=1, metavar="N",
                     help="example batch (the file's batch stays dynamic)")
    sub.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                     help="precision of the exported file (default float32)")
    sub.add_argument("--check", choices=["tensorrt", "none"], default="tensorrt",
                     help="refuse legofx layers with ops Torch-TensorRT does not convert, and "
                          "list the model's other ops it would run in PyTorch (default)")
    sub.add_argument("--quantize", choices=["int8"], default=None,
                     help="write an int8 QDQ ONNX file (ONNX Runtime's static quantizer; "
                          "TensorRT builds int8 engines from it), checked against the float model")
    sub.add_argument("--calibration", type=positive_integer, default=None, metavar="N",
                     help=f"with --quantize: calibrate on N random batches shaped like the "
                          f"example input (default {CALIBRATION_BATCHES}; for accuracy, calibrate "
                          f"on real data with legofx.export(..., calibration=batches))")
    sub.add_argument("--fuse-batchnorm", action="store_true",
                     help="fold each BatchNorm that follows a folded layer into it "
                          "(fold(..., fuse_batchnorm=True))")
    sub.add_argument("--strategy", default=None, metavar="NAME",
                     help="each layer's lowering (fold's strategy): gather (lego default), "
                          "accumulate, merge-conv, dense, sum-pool (structured default) or auto "
                          "(the fastest per layer, timed on the example input); not fused, "
                          "whose custom op ONNX and TensorRT do not take")
    sub.add_argument("--auto-backend", choices=list(BACKENDS), default=None,
                     help="where --strategy auto times the lowerings and then the whole model "
                          "(default: where the file runs: onnxruntime for .onnx, "
                          "onnxruntime-int8 with --quantize int8, eager for .pt2)")
    sub.set_defaults(handler=cmd_export)
