"""Lego and int8 together: file size, ONNX Runtime latency and accuracy of the original fp32,
original int8, Lego fp32 and Lego int8 models.

    python benchmarks/int8.py [--models resnet18,resnet50] [--size 224] [--rounds 10]

Sizes and latency: torchvision ResNet-18 / ResNet-50 (random weights), Lego o=2, m=0.5
(random selections) folded with BatchNorm fused and ``strategy="auto"`` on
``backend="onnxruntime-int8"`` (each layer's lowering by its int8 time, checked on the whole
int8 model), once per batch (``--strategy gather`` etc. for one lowering everywhere); every
file written by ``legofx.export``, int8 with ``quantize="int8"`` calibrated on 4 random
batches of 8. Latency: the four ONNX Runtime CPU sessions taking turns (``TAKING_TURNS``,
``interleaved_times``), medians, batch 1 and 8, one run.
Accuracy: the demo's digits task (legofx.demo.digits: ``cnn()`` trained dense, and as Lego
from scratch, with the demo's budget), test accuracy of the PyTorch fp32 model and of the int8
file in ONNX Runtime, calibrated on 8 training batches of 64.
Writes benchmarks/results/int8.json (int8_STRATEGY.json for another --strategy) and prints the
tables (docs/int8.md has the last ones).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import legofx
from legofx.core.timing import interleaved_times, median_ms
from legofx.demo.digits import Budget, accuracy, cnn, digits, train
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule
from legofx.testing import randomize_lego

RESULTS = Path(__file__).parent / "results" / "int8.json"


STRATEGY = "auto"  # fold's strategy for the Lego models (--strategy)


def lego(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``model`` as Lego (o=2, m=0.5, random selections), folded with ``STRATEGY`` and
    BatchNorm fused; ``"auto"`` chooses by int8 ONNX Runtime time on ``x``."""
    gm = legofx.transform(model.eval(), o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    return fold_lego(gm, x)


def fold_lego(gm: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    if STRATEGY == "auto":
        return legofx.fold(gm.eval(), "auto", example_inputs=x, backend="onnxruntime-int8",
                           fuse_batchnorm=True)
    return legofx.fold(gm.eval(), STRATEGY, fuse_batchnorm=True)


def kept(model: torch.nn.Module) -> dict:
    """How many layers took each lowering, and what auto's whole-model check kept."""
    records = [r for r in legofx.summary(model) if r.rewritten]
    return {"lowerings": dict(Counter(r.lowering.split(" ")[0] for r in records)),
            "kept": sorted({r.lowering.rpartition("kept ")[2].rstrip("]") for r in records
                            if "kept " in r.lowering})}


def variants(models: dict, x: torch.Tensor, calibration: list, folder: Path, name: str) -> dict:
    """name -> ExportResult for fp32 and int8 files of each of ``models``."""
    results = {}
    for kind, model in models.items():
        results[f"{kind} fp32"] = legofx.export(model, x, folder / f"{name}-{kind}-fp32.onnx", check=None)
        results[f"{kind} int8"] = legofx.export(model, x, folder / f"{name}-{kind}-int8.onnx",
                                                check=None, quantize="int8", calibration=calibration)
    return results


def size_and_latency(name: str, size: int, rounds: int, folder: Path) -> dict:
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)().eval()
    calibration = [torch.randn(8, 3, size, size) for _ in range(4)]
    row = {"model": name, "input": size, "strategy": STRATEGY}
    for batch in (1, 8):  # auto chooses for the batch it is deployed at: fold per batch
        inputs = torch.randn(batch, 3, size, size)
        folded = lego(original, inputs)
        results = variants({"original": original, "Lego": folded}, inputs, calibration, folder,
                           f"{name}-b{batch}")
        if batch == 1:
            row.update(size_mb={k: r.size_bytes / 1e6 for k, r in results.items()},
                       cosine={k: r.cosine for k, r in results.items() if r.cosine is not None},
                       int8_max_error={k: r.int8_max_error for k, r in results.items()
                                       if r.cosine is not None})
        row[f"b{batch}_lowerings"] = kept(folded)
        sessions = {k: OnnxRuntimeModule.from_file(r.path, session_config=TAKING_TURNS)
                    for k, r in results.items()}
        times = interleaved_times(sessions, inputs, rounds=rounds, warmup=2)
        row[f"b{batch}_ms"] = {k: median_ms(samples) for k, samples in times.items()}
    print(json.dumps(row), flush=True)
    return row


def digits_accuracy(folder: Path, budget: Budget) -> dict:
    data = digits()
    x_test, y_test = data[2], data[3]
    torch.manual_seed(0)
    dense = train(cnn(), data, budget, "dense CNN", quiet=True)
    torch.manual_seed(0)
    scratch = fold_lego(train(legofx.transform(cnn(), o=2, m=0.5), data, budget,
                              "Lego (from scratch)", quiet=True), x_test[:64])
    calibration = list(data[0][:512].split(64))
    row = {}
    for kind, model in {"original": dense, "Lego": scratch}.items():
        int8 = legofx.export(model, x_test[:8], folder / f"digits-{kind}-int8.onnx", check=None,
                             quantize="int8", calibration=calibration)
        session = OnnxRuntimeModule.from_file(int8.path)
        with torch.no_grad():
            int8_accuracy = (session(x_test).argmax(1) == y_test).float().mean().item()
        row[kind] = {"fp32": accuracy(model, x_test, y_test), "int8": int8_accuracy,
                     "cosine": int8.cosine}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=Budget().epochs)
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="sizes and latency only (no digits training)")
    parser.add_argument("--strategy", default="auto",
                        help="fold's strategy for the Lego models (default auto: each layer's "
                             "lowering by its int8 ONNX Runtime time, checked on the whole model)")
    args = parser.parse_args()
    global STRATEGY
    STRATEGY = args.strategy
    with tempfile.TemporaryDirectory() as folder:
        rows = [size_and_latency(name, args.size, args.rounds, Path(folder))
                for name in args.models.split(",")]
        accuracies = {} if args.skip_accuracy else digits_accuracy(Path(folder), Budget(epochs=args.epochs))
    results = RESULTS if args.strategy == "auto" else RESULTS.with_name(f"int8_{args.strategy}.json")
    results.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "strategy": args.strategy,
                                   "rows": rows, "digits": accuracies}, indent=1) + "\n")
    kinds = ["original fp32", "original int8", "Lego fp32", "Lego int8"]
    print(tabulate([[r["model"], *(f"{r['size_mb'][k]:.1f}" for k in kinds),
                     f"{r['size_mb']['original fp32'] / r['size_mb']['Lego int8']:.1f}x"] for r in rows],
                   ["model", *(f"{k} MB" for k in kinds), "original fp32 / Lego int8"], tablefmt="github"))
    print(tabulate([[r["model"], batch, *(f"{r[f'b{batch}_ms'][k]:.2f}" for k in kinds),
                     f"{r[f'b{batch}_ms']['Lego int8'] / r[f'b{batch}_ms']['original int8']:.2f}",
                     " ".join(f"{n} {c}" for n, c in r[f"b{batch}_lowerings"]["lowerings"].items()),
                     "/".join(r[f"b{batch}_lowerings"]["kept"]) or "-"]
                    for r in rows for batch in (1, 8)],
                   ["model", "batch", *(f"{k} ms" for k in kinds), "Lego int8 / original int8",
                    "Lego layers", "auto kept"], tablefmt="github"))
    if accuracies:
        print(tabulate([[kind, f"{100 * a['fp32']:.1f}", f"{100 * a['int8']:.1f}", f"{a['cosine']:.5f}"]
                        for kind, a in accuracies.items()],
                       ["digits model", "fp32 accuracy %", "int8 accuracy % (ONNX Runtime)",
                        "int8 cosine"], tablefmt="github"))


if __name__ == "__main__":
    main()
