"""Batch-1 and batch-8 ONNX Runtime latency of Lego models in several forms against the original.

    python benchmarks/ort_latency.py      # 4 models x 2 m x 2 forms: ~13 min at load 5, est. 7-9 quiet
    python benchmarks/ort_latency.py --models resnet50 --ms 0.5 --batches 8 --rounds 9
    python benchmarks/ort_latency.py --models unet fpn --forms "3x3 gather"

For each model (torchvision ResNet-18, ResNet-50, MobileNetV2 at 224x224; ultralytics YOLOv8n
from its yaml at 320x320; smp Unet and FPN, resnet18 encoder, 256x256; random weights, float32),
each ``m`` (o=2) and each batch: one interleaved run of ONNX Runtime CPU sessions (default
threads, no spinning; every round runs every variant once, in turn, after warm-up; medians):

- ``original``: the model with its conv+BatchNorm pairs fused (ONNX Runtime fuses them itself
  anyway), exported as it is;
- one Lego file per form in ``FORMS``, folded with ``fuse_batchnorm=True``: a form picks each
  Lego layer's lowering from its kernel size and input channels (``"dense"`` keeps the layer
  a plain conv; ``legofx.lowering.by_kernel`` builds the same strategies): ``gather`` every
  layer; ``3x3 gather`` k x k layers, 1x1 dense; ``wide`` / ``mid 3x3 gather`` only k x k
  layers with >= 128 / >= 64 input channels.

Each file is exported once with a dynamic batch. ``theory`` is the MAC ratio original / Lego
of the form (dense layers counted dense); ``mb`` the ONNX file sizes (10^6 bytes).
Results: ``results/ort_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import legofx  # noqa: E402
from legofx.core.timing import interleaved_times  # noqa: E402
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule  # noqa: E402
from legofx.lowering.by_kernel import by_kernel  # noqa: E402
from legofx.report import measure_macs  # noqa: E402

SIZES = {"resnet18": 224, "resnet50": 224, "mobilenet_v2": 224, "yolov8n": 320, "unet": 256,
         "fpn": 256}
DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "yolov8n"]
WIDE, MID = 128, 64  # "wide" / "mid" layers: at least this many input channels
# form -> per-layer strategy (``by_kernel``: kxk layers ``spatial`` above a width, 1x1 dense)
FORMS = {"gather": lambda gm: by_kernel(gm, "gather", "gather"),
         "3x3 gather": lambda gm: by_kernel(gm),
         "3x3 grouped": lambda gm: by_kernel(gm, "grouped"),
         "wide 3x3 gather": lambda gm: by_kernel(gm, min_in_channels=WIDE),
         "mid 3x3 gather": lambda gm: by_kernel(gm, min_in_channels=MID)}
DEFAULT_FORMS = ["3x3 gather", "wide 3x3 gather"]


def build(name: str) -> torch.nn.Module:
    if name == "yolov8n":
        from ultralytics import YOLO  # AGPL-3.0: benchmarks only
        return YOLO("yolov8n.yaml").model.eval()
    if name in ("unet", "fpn"):
        import segmentation_models_pytorch as smp
        model = {"unet": smp.Unet, "fpn": smp.FPN}[name]
        return model("resnet18", encoder_weights=None).eval()
    import torchvision
    return torchvision.models.get_model(name, weights=None).eval()


def bn_fused(name: str, model: torch.nn.Module) -> torch.nn.Module:
    if name == "yolov8n":
        import copy
        return copy.deepcopy(model).fuse(verbose=False).eval()
    from torch.fx.experimental.optimization import fuse
    try:
        return fuse(model).eval()
    except Exception:  # noqa: BLE001  (not symbolically traceable: ONNX Runtime fuses BN itself)
        return model


def theory(layers: dict, before: int, after: int, strategy: dict[str, str]) -> float:
    dense = sum(layers[n].before - layers[n].after for n, s in strategy.items()
                if s == "dense" and n in layers)
    return before / (after + dense)


def export_all(models: dict, x: torch.Tensor, folder: Path, dynamic: bool) -> dict:
    """name -> (ONNX Runtime session, file MB) of every model exported on ``x``."""
    built = {}
    for key, model in models.items():
        path = folder / f"{key.replace(' ', '_')}_{'dyn' if dynamic else len(x)}.onnx"
        legofx.export(model, x, path, check=None, dynamic_batch=dynamic)
        built[key] = OnnxRuntimeModule.from_file(path, session_config=TAKING_TURNS), path.stat().st_size / 1e6
    return built


def sessions_per_batch(models: dict, size: int, batches: list[int], folder: Path) -> dict:
    """batch -> built: one dynamic-batch export for all batches, or one per batch where
    torch.export specialises the batch (ultralytics' Detect head)."""
    try:
        built = export_all(models, torch.randn(2, 3, size, size), folder, dynamic=True)
        return {batch: built for batch in batches}
    except ValueError:
        return {b: export_all(models, torch.randn(b, 3, size, size), folder, dynamic=False)
                for b in batches}


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@torch.no_grad()
def run(args) -> list[dict]:
    rows = []
    for name in args.models:
        size = SIZES[name]
        original = build(name)
        fused = bn_fused(name, original)
        for m in args.ms:
            t0 = time.time()
            gm = legofx.transform(original, o=2, m=m).eval()
            layers, before, after = measure_macs(gm, torch.randn(1, 3, size, size))
            models, theories = {"original": fused}, {"original": 1.0}
            for form in args.forms:
                strategy = FORMS[form](gm)
                models[form] = legofx.fold(gm, strategy, fuse_batchnorm=True)
                theories[form] = theory(layers, before, after, strategy)
            with tempfile.TemporaryDirectory() as folder:
                per_batch = sessions_per_batch(models, size, args.batches, Path(folder))
                print(f"{name} m={m}: folded and exported in {time.time() - t0:.0f} s", flush=True)
                for batch, built in per_batch.items():
                    rows.append(timed(name, size, m, batch, built, theories, args))
                    print(table(rows[-1:]), flush=True)
    return rows


def timed(name, size, m, batch, built, theories, args) -> dict:
    sessions = {key: s for key, (s, _) in built.items()}
    load = load_average()
    times = interleaved_times(sessions, torch.randn(batch, 3, size, size), rounds=args.rounds, warmup=2)
    medians = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    return {"model": name, "size": size, "m": m, "o": 2, "batch": batch, "backend": "onnxruntime",
            "medians_ms": medians, "speedup": {f: medians["original"] / medians[f] for f in args.forms},
            "best_form": min(args.forms, key=medians.get), "theory": theories,
            "mb": {key: mb for key, (_, mb) in built.items()}, "threads": torch.get_num_threads(),
            "rounds": args.rounds, "load_before": load, "load_after": load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        best = r["best_form"]
        body.append([r["model"], r["m"], r["batch"], f"{r['medians_ms']['original']:.2f}",
                     " / ".join(f"{f} {r['speedup'][f]:.2f}x" for f in r["speedup"]), best,
                     f"{r['theory'][best]:.2f}x", f"{r['mb']['original']:.1f} / {r['mb'][best]:.1f}",
                     f"{r['load_before']} / {r['load_after']}"])
    return tabulate(body, ["model", "m", "batch", "original ms", "speed-up per form", "best",
                           "its MAC theory", "MB orig / best", "load before / after"],
                    tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(SIZES))
    parser.add_argument("--ms", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--forms", nargs="+", default=DEFAULT_FORMS, choices=list(FORMS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ort_latency.json")
    args = parser.parse_args()
    rows = run(args)
    print("\n" + table(rows))
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
