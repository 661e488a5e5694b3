"""``legofx demo``: the main job — a dense CNN and its Lego versions trained on real data."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from tabulate import tabulate

ROWS = (("dense", "dense CNN"), ("scratch", "Lego o=2 m=0.5, from scratch"),
        ("tuned", "Lego o=2 m=0.5, init='weights' + fine-tune"))


def results_table(results: dict) -> str:
    """The demo's results side by side, with ratios against the dense CNN."""
    dense = results["dense"]
    rows = []
    for key, label in ROWS:
        row = results[key]
        rows.append([
            label, f"{100 * row['accuracy']:.2f}",
            f"{100 * (row['accuracy'] - dense['accuracy']):+.2f}",
            f"{row['conv_params']:,}", f"{dense['conv_params'] / row['conv_params']:.2f}x",
            f"{row['macs'] / 1e6:.2f}M", f"{dense['macs'] / row['macs']:.2f}x",
            f"{row['latency_ms']:.2f}", f"{dense['latency_ms'] / row['latency_ms']:.2f}x",
            "" if "fold_error" not in row else f"{row['fold_error']:.1e}",
        ])
    headers = ["model", "test acc %", "vs dense", "conv params", "fewer", "MACs/image",
               "fewer", "latency ms (64 img)", "speed-up", "fold rel. err"]
    return tabulate(rows, headers, stralign="right", disable_numparse=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from legofx.demo.digits import Budget, run

    budget = Budget(epochs=args.epochs)
    start = time.perf_counter()
    print(f"scikit-learn digits (1,797 images, 8x8 upscaled to 16x16, 80/20 split); "
          f"{budget.epochs} epochs each from scratch, {max(1, budget.epochs // 4)} to fine-tune")
    with tempfile.TemporaryDirectory() as tmp:
        results = run(budget, seed=args.seed, quiet=args.quiet, export_dir=args.out or tmp)
        print()
        print(results_table(results))
        exported = results["export"]
        print(f"\nLego from init='weights': test accuracy {100 * results['start_accuracy']:.2f}% "
              f"right after the transform, {100 * results['recalibrated_accuracy']:.2f}% with "
              f"BatchNorm statistics re-estimated, before fine-tuning")
        print(f"folded Lego models match their training form (relative error above); exported "
              f"{'to ' + str(exported.path) if args.out else 'to ONNX'} and checked in ONNX "
              f"Runtime: max relative error {exported.max_error:.1e}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    failures = [key for key, _ in ROWS[1:] if results[key]["fold_error"] > args.tolerance]
    if failures:
        print(f"FAILED: fold error of {', '.join(failures)} exceeds --tolerance {args.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo", help="train a small CNN and its Lego versions on scikit-learn's digits; compare")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="directory to keep the exported ONNX file in")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--tolerance", type=float, default=1e-5,
                      help="largest relative error of fold vs training form (float32)")
    demo.set_defaults(handler=cmd_demo)
