"""``legofx export``: transform, (load trained weights,) fold, export and verify a model."""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import Counter
from pathlib import Path

import torch

from legofx.cli.common import (MODEL_HELP, add_method_arguments, apply_method,
                               check_method_arguments, check_model_fits, method_settings)
from legofx.deploy.exporter import MismatchError, export
from legofx.lowering.registry import BACKENDS, by_name_only
from legofx.cli.model_spec import build_model, example_input
from legofx.core.records import summary
from legofx.lowering.auto import check_backend, check_strategy
from legofx.lowering.fold import fold

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _check_arguments(args: argparse.Namespace) -> dict | None:
    """Everything that can be checked before the slow work; returns the ``--weights``."""
    check_method_arguments(args)
    if Path(args.out).suffix.lower() not in (".onnx", ".pt2"):
        raise ValueError(f"--out must end in .pt2 (torch.export) or .onnx (ONNX), got {args.out!r}")
    check_strategy(args.strategy, {})
    check_backend(args.auto_backend, args.strategy)
    if args.strategy in by_name_only():
        raise ValueError(f"--strategy {args.strategy}: its merge is a legofx custom op, which ONNX "
                         f"and TensorRT do not take; export with gather, accumulate, merge-conv, "
                         f"dense or auto, and run {args.strategy!r} in PyTorch "
                         f"(legofx.fold(gm, {args.strategy!r}), eager or torch.compile)")
    if not args.weights:
        return None
    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights {args.weights!r} does not exist")
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"--weights {args.weights!r} is not a state_dict torch.load can read: "
                         f"{str(err).strip().splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights {args.weights!r} holds a {type(state).__name__}, not a "
                         f"state_dict (a dict of tensors, as gm.state_dict() gives)")
    return state


def _load_weights(gm: torch.nn.Module, state: dict, args: argparse.Namespace) -> None:
    try:
        gm.load_state_dict(state)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"--weights {args.weights!r} does not fit the model transformed with "
                         f"--method {args.method} {method_settings(args)}: "
                         f"{(problems or [str(err)])[0][:300]}{more}") from None


def cmd_export(args: argparse.Namespace) -> int:
    state = _check_arguments(args)
    torch.manual_seed(args.seed)
    model, shape = build_model(args.model)
    check_model_fits(model, args)
    size = (args.input_size,) * 2 if args.input_size else shape[-2:]
    shape = (args.batch, *shape[1:-2], *size)
    x = example_input(shape, args.seed)
    gm = apply_method(model.eval(), args, x)
    if state is not None:
        _load_weights(gm, state, args)
    folded = fold(gm.eval(), args.strategy, example_inputs=x, fuse_batchnorm=args.fuse_batchnorm,
                  backend=args.auto_backend)
    folded, x = folded.to(DTYPES[args.dtype]), x.to(DTYPES[args.dtype])
    records = summary(folded)
    rewritten = [record for record in records if record.rewritten]
    print(f"{args.model}: {args.method} {method_settings(args)}, {len(rewritten)} of "
          f"{len(records)} convs rewritten, folded, {args.dtype}, input {tuple(shape)}")
    if args.strategy == "auto":
        kinds = Counter(record.lowering.split(" ")[0] for record in rewritten)
        print(f"lowerings (auto, timed on {args.auto_backend}): "
              + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())))
    calibration = None
    if args.quantize:
        if not args.out.endswith(".onnx"):
            raise ValueError(f"--quantize {args.quantize} writes a QDQ ONNX file: --out must end "
                             f"in .onnx, got --out {args.out}")
        calibration = [example_input(shape, args.seed + 1 + i).to(x.dtype)
                       for i in range(args.calibration)]
    try:
        result = export(folded, x, args.out, check=None if args.check == "none" else args.check,
                        quantize=args.quantize, calibration=calibration)
    except MismatchError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    kind = "ONNX" if result.format == "onnx" else "torch.export program"
    print(f"wrote {result.path} ({kind}{', ' + args.quantize + ' QDQ' if args.quantize else ''}, "
          f"{'dynamic' if result.dynamic else 'fixed'} batch, {result.size_bytes / 1e6:.2f} MB)")
    print(result)
    print("export verified")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def add_parser(commands) -> None:
    """Add the ``export`` subcommand to the ``legofx`` parser's subparsers."""
    sub = commands.add_parser(
        "export", help="transform and fold a model, export it to .onnx or .pt2 and verify the file")
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("--out", required=True, help="output file: model.onnx or model.pt2")
    add_method_arguments(sub)
    sub.add_argument("--weights", default=None,
                     help="state_dict of the transformed model (e.g. after training) to load "
                          "before folding; without it the weights are random")
    sub.add_argument("--input-size", type=int, default=None, help="spatial size of the example input")
    sub.add_argument("--batch", type=int, default=1, help="example batch (the batch stays dynamic)")
    sub.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    sub.add_argument("--check", choices=["tensorrt", "none"], default="tensorrt",
                     help="refuse legofx layers with ops Torch-TensorRT does not convert, and "
                          "list the model's other ops it would run in PyTorch (default)")
    sub.add_argument("--quantize", choices=["int8"], default=None,
                     help="write an int8 QDQ ONNX file (ONNX Runtime's static quantizer; "
                          "TensorRT builds int8 engines from it), checked against the float model")
    sub.add_argument("--calibration", type=_positive, default=8, metavar="N",
                     help="with --quantize: calibrate on N random batches shaped like the "
                          "example input (default 8; for accuracy, calibrate on real data with "
                          "legofx.export(..., calibration=batches))")
    sub.add_argument("--fuse-batchnorm", action="store_true",
                     help="fold each BatchNorm that follows a folded layer into it "
                          "(fold(..., fuse_batchnorm=True))")
    sub.add_argument("--strategy", default=None,
                     help="each layer's lowering (fold's strategy): gather (lego default), "
                          "accumulate, merge-conv, dense, sum-pool (structured default) or auto "
                          "(the fastest per layer, timed on the example input); not fused, "
                          "whose custom op ONNX and TensorRT do not take")
    sub.add_argument("--auto-backend", choices=list(BACKENDS), default="eager",
                     help="where --strategy auto times the lowerings and then the whole "
                          "model (default eager; onnxruntime for an .onnx file, "
                          "onnxruntime-int8 with --quantize int8)")
    sub.add_argument("--seed", type=int, default=0)
    sub.set_defaults(handler=cmd_export)
