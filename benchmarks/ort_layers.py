"""One Lego layer (conv + BatchNorm + ReLU) on ONNX Runtime in every lowering vs the original.

    python benchmarks/ort_layers.py [--batch 8] [--rounds 15] [--m 0.5]

ResNet-50's conv shapes (3x3 and 1x1), each block ``Conv2d -> BatchNorm2d -> ReLU`` as
ONNX Runtime sees it in the model; Lego o=2, folded with ``fuse_batchnorm=True`` in each
lowering; the original exported as it is (ONNX Runtime fuses Conv+BN+ReLU itself). Interleaved
ONNX Runtime CPU sessions (taking turns), medians; ``ratio`` = original / lowering.
Results: ``results/ort_layers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import legofx
from legofx.core.timing import interleaved_times
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule

# (name, c, n, k, stride, H): ResNet-50's layer2 / layer3 convs at 224x224
SHAPES = [("l2 3x3 128", 128, 128, 3, 1, 28), ("l3 3x3 256", 256, 256, 3, 1, 14),
          ("l2 1x1 512->128", 512, 128, 1, 1, 28), ("l2 1x1 128->512", 128, 512, 1, 1, 28)]
LOWERINGS = ["gather", "merge-conv", "grouped", "grouped-compact", "grouped-gather", "dense"]


def session(model: nn.Module, x: torch.Tensor, folder: Path, name: str) -> tuple:
    path = folder / f"{name}.onnx"
    legofx.export(model, x, path, check=None, dynamic_batch=False)
    return OnnxRuntimeModule.from_file(path, session_config=TAKING_TURNS), path.stat().st_size


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@torch.no_grad()
def run(args) -> list[dict]:
    rows = []
    for name, c, n, k, stride, size in SHAPES:
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv2d(c, n, k, stride, k // 2, bias=False), nn.BatchNorm2d(n),
                              nn.ReLU()).eval()
        block[1].running_var.uniform_(0.5, 2)
        x = torch.randn(args.batch, c, size, size)
        gm = legofx.transform(block, o=2, m=args.m).eval()
        models = {"original": block}
        models.update({lw: legofx.fold(gm, lw, fuse_batchnorm=True) for lw in LOWERINGS})
        with tempfile.TemporaryDirectory() as folder:
            built = {key: session(model, x, Path(folder), key.replace(" ", "_"))
                     for key, model in models.items()}
        sessions = {key: s for key, (s, _) in built.items()}
        before = load()
        times = interleaved_times(sessions, x, rounds=args.rounds, warmup=2)
        medians = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        row = {"layer": name, "batch": args.batch, "m": args.m, "medians_ms": medians,
               "ratio": {key: medians["original"] / ms for key, ms in medians.items()},
               "file_bytes": {key: size for key, (_, size) in built.items()},
               "load": f"{before} / {load()}", "rounds": args.rounds,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        rows.append(row)
        print(name, " ".join(f"{k} {v:.2f}ms ({row['ratio'][k]:.2f}x)" for k, v in medians.items()),
              "load", row["load"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--m", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ort_layers.json")
    args = parser.parse_args()
    rows = run(args)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
