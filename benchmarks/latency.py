"""Batch-1 and batch-8 latency of the fused Lego model against the fastest original.

    python benchmarks/latency.py                                  # eager, all four models
    python benchmarks/latency.py --models resnet18 --batches 1 --ms 0.5 --rounds 31
    python benchmarks/latency.py --backend inductor

For each model (torchvision ResNet-18, ResNet-50, MobileNetV2 at 224x224; ultralytics YOLOv8n
from its yaml at 320x320; random weights, float32, CPU), each ``m`` (o=2) and each batch, one
interleaved run (every round runs every variant once, in turn, after warm-up; medians):

- the original as it is, with its conv+BatchNorm pairs fused, and both channels-last (model
  and input converted, the input's conversion timed) - the *fastest original* is the fastest
  of these four;
- the Lego model folded ``fused`` with its BatchNorms fused (``fold(gm, "fused",
  fuse_batchnorm=True)``), channels-last.

``theory`` is the network's MAC ratio original / Lego (:func:`legofx.report.measure_macs`).
``--backend inductor`` compiles every variant with ``torch.compile`` (which picks its own
layouts: the channels-last copies are then left out). Results: ``results/latency.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import legofx  # noqa: E402
from legofx.core.timing import interleaved_times  # noqa: E402
from legofx.report import measure_macs  # noqa: E402

SIZES = {"resnet18": 224, "resnet50": 224, "mobilenet_v2": 224, "yolov8n": 320}


def build(name: str) -> torch.nn.Module:
    if name == "yolov8n":
        from ultralytics import YOLO  # AGPL-3.0: benchmarks only
        return YOLO("yolov8n.yaml").model.eval()
    import torchvision
    return torchvision.models.get_model(name, weights=None).eval()


def bn_fused(name: str, model: torch.nn.Module) -> torch.nn.Module:
    if name == "yolov8n":
        return copy.deepcopy(model).fuse(verbose=False).eval()
    from torch.fx.experimental.optimization import fuse
    return fuse(model).eval()


class ChannelsLast(torch.nn.Module):
    """``model`` channels-last, fed channels-last inputs (the conversion is timed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def variants(name: str, m: float, x: torch.Tensor, backend: str) -> tuple[dict, float]:
    original = build(name)
    gm = legofx.transform(original, o=2, m=m).eval()
    lego = legofx.fold(gm, "fused", fuse_batchnorm=True)
    _, before, after = measure_macs(gm, x[:1])
    models = {"original": original, "original, BN fused": bn_fused(name, original)}
    if backend == "eager":
        models.update({f"{key}, channels-last": ChannelsLast(model) for key, model in list(models.items())})
        models["lego fused"] = ChannelsLast(lego)
    else:
        models["lego fused"] = lego
        models = {key: torch.compile(model) for key, model in models.items()}
    return models, before / after


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@torch.no_grad()
def run(args) -> list[dict]:
    rows = []
    for name in args.models:
        for m in args.ms:
            for batch in args.batches:
                x = torch.randn(batch, 3, SIZES[name], SIZES[name])
                models, theory = variants(name, m, x, args.backend)
                before = load_average()
                times = interleaved_times(models, x, rounds=args.rounds, warmup=3)
                medians = {key: statistics.median(t) * 1e3 for key, t in times.items()}
                originals = {k: v for k, v in medians.items() if k.startswith("original")}
                fastest = min(originals, key=originals.get)
                rows.append({"model": name, "m": m, "batch": batch, "backend": args.backend,
                             "medians_ms": medians, "fastest_original": fastest,
                             "speedup": originals[fastest] / medians["lego fused"],
                             "theory": theory, "load_before": before, "load_after": load_average(),
                             "rounds": args.rounds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
                print(table(rows[-1:]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    body = [[r["model"], r["m"], r["batch"], r["backend"], r["fastest_original"],
             f"{r['medians_ms'][r['fastest_original']]:.2f}", f"{r['medians_ms']['lego fused']:.2f}",
             f"{r['speedup']:.2f}x", f"{r['theory']:.2f}x", f"{r['speedup'] / r['theory']:.2f}",
             f"{r['load_before']} / {r['load_after']}"] for r in rows]
    return tabulate(body, ["model", "m", "batch", "backend", "fastest original", "its ms",
                           "lego fused ms", "speed-up", "MAC theory", "meas./theory",
                           "load before / after"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--ms", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--backend", choices=["eager", "inductor"], default="eager")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    args = parser.parse_args()
    rows = run(args)
    print("\n" + table(rows))
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
