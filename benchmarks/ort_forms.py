"""ONNX Runtime: batch-1 and batch-8 latency of Lego forms against the BN-fused original.

    python benchmarks/ort_forms.py                      # issue 26 item 2 rows, ~9 min when quiet
    python benchmarks/ort_forms.py --quick              # item 3: resnet50, yolov8n, smp Unet/FPN, m=0.5
    python benchmarks/ort_forms.py --models smp-unet smp-fpn --ms 0.5

For each model (torchvision ResNet-18 / ResNet-50 / MobileNetV2 at 224x224, ultralytics
YOLOv8n from its yaml at 320x320, smp Unet / FPN with a resnet18 encoder at 256x256; random
weights, float32) and each ``m`` (o=2): the original and each Lego form exported once with a
dynamic batch (``legofx.export``), then ONNX Runtime CPU sessions (default threads, taking
turns) timed interleaved per batch, medians. ONNX Runtime fuses the original's Conv+BN(+ReLU)
itself, so the exported original is the BN-fused original. Lego forms (BatchNorms folded in):

- ``gather``: every layer ``gather`` (the default lowering; today's Lego file);
- ``grouped-compact by MACs``: ``by_macs(gm, "grouped-compact")``: the Lego conv as one
  grouped conv and the merge as a 1x1 conv where that needs <= 0.8 of the dense MACs, dense
  elsewhere; the file holds the gather form's small tensors, ONNX Runtime builds the conv
  kernels when it loads it;
- ``grouped-compact by MACs, blocked``: the same, but dense where the grouped conv's channels
  per group are not multiples of 16 (``blocked``: ONNX Runtime's NCHWc convs with AVX-512);
- with ``--forms`` only: ``grouped by MACs`` (``, blocked``): the same graphs from files that
  store the repeated Lego filters and the merge kernel; ``grouped kxk``: ``grouped`` on the
  layers with a kernel larger than 1x1, dense on 1x1; ``grouped-compact kxk, blocked``: the
  blocked compact form on kxk layers only.

``theory``: MACs original / form (``legofx.report.measure_macs`` of the folded model; the
``grouped`` merge counts ``n*o*m`` per pixel). File sizes in MB (10^6 bytes).
Results: ``results/ort_forms.json`` (rewritten after every model).
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
from legofx.lowering.by_macs import by_macs  # noqa: E402
from legofx.methods.lego.lowerings.grouped import blocked  # noqa: E402
from legofx.report import measure_macs  # noqa: E402

SIZES = {"resnet18": 224, "resnet50": 224, "mobilenet_v2": 224, "yolov8n": 320,
         "smp-unet": 256, "smp-fpn": 256}
# seconds per model and m on this project's 2-core machine at load ~2 (exports + timing, 2 batches)
SECONDS = {"resnet18": 40, "resnet50": 75, "mobilenet_v2": 50, "yolov8n": 90, "smp-unet": 70,
           "smp-fpn": 70}
FORMS = ["gather", "grouped by MACs", "grouped by MACs, blocked", "grouped kxk",
         "grouped-compact by MACs", "grouped-compact by MACs, blocked", "grouped-compact kxk, blocked"]
DEFAULT_FORMS = ["gather", "grouped-compact by MACs", "grouped-compact by MACs, blocked"]


def build(name: str) -> torch.nn.Module:
    if name == "yolov8n":
        from ultralytics import YOLO  # AGPL-3.0: benchmarks only
        return YOLO("yolov8n.yaml").model.eval()
    if name.startswith("smp-"):
        import segmentation_models_pytorch as smp
        arch = {"smp-unet": "Unet", "smp-fpn": "FPN"}[name]
        return getattr(smp, arch)("resnet18", encoder_weights=None).eval()
    import torchvision
    return torchvision.models.get_model(name, weights=None).eval()


def strategy(form: str, gm: torch.nn.Module):
    if form == "gather":
        return "gather"
    if form == "grouped by MACs":
        return by_macs(gm, "grouped")
    if form == "grouped by MACs, blocked":
        return by_macs(gm, "grouped", where=blocked)
    if form == "grouped-compact by MACs":
        return by_macs(gm, "grouped-compact")
    if form == "grouped-compact by MACs, blocked":
        return by_macs(gm, "grouped-compact", where=blocked)
    if form == "grouped-compact kxk, blocked":
        return by_macs(gm, "grouped-compact", where=lambda layer: blocked(layer) and layer.kernel_size != (1, 1))
    if form == "grouped kxk":
        return {name: "grouped" if layer.kernel_size != (1, 1) else "dense"
                for name, layer in gm.named_modules() if getattr(layer, "form", None) == "training"}
    raise ValueError(form)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@torch.no_grad()
def measure(name: str, m: float, args, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    original = build(name)
    size = SIZES[name]
    x1 = torch.randn(1, 3, size, size)
    gm = legofx.transform(original, o=2, m=m).eval()
    models, strategies, same_as = {"original": original}, {}, {}
    for form in args.forms:  # a form with another's per-layer choice is that form's graph
        chosen = strategy(form, gm)
        same_as[form] = next((f for f, other in strategies.items() if other == chosen), None)
        if same_as[form] is None:
            strategies[form] = chosen
            models[form] = legofx.fold(gm, chosen, fuse_batchnorm=True)
    sessions, file_mb, theory = {}, {}, {}
    _, base, _ = measure_macs(gm, x1)
    for key, model in models.items():
        path = folder / f"{name}-{m}-{key.replace(' ', '_')}.onnx"
        legofx.export(model, x1, path, check=None, dynamic_batch=True)
        sessions[key] = OnnxRuntimeModule.from_file(path, session_config=TAKING_TURNS)
        if key == "original":  # A/A: a second session of the same file, the noise between equals
            sessions["original A/A"] = OnnxRuntimeModule.from_file(path, session_config=TAKING_TURNS)
        file_mb[key] = path.stat().st_size / 1e6
        theory[key] = 1.0 if key == "original" else base / measure_macs(model, x1)[2]
        path.unlink()
    for form, same in same_as.items():
        if same:
            theory[form], file_mb[form] = theory[same], file_mb[same]
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size)
        before = load_average()
        times = interleaved_times(sessions, x, rounds=args.rounds, warmup=2)
        medians = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        medians.update({form: medians[same] for form, same in same_as.items() if same})
        baseline = min(medians["original"], medians["original A/A"])
        rows.append({"model": name, "size": size, "m": m, "batch": batch, "medians_ms": medians,
                     "speedup": {k: baseline / v for k, v in medians.items() if not k.startswith("original")},
                     "a_a": medians["original"] / medians["original A/A"],
                     "theory": theory, "file_mb": file_mb, "same_as": same_as, "load_before": before,
                     "load_after": load_average(), "rounds": args.rounds,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(table(rows[-1:], args.forms), flush=True)
    return rows


def table(rows: list[dict], forms: list[str]) -> str:
    body = []
    for r in rows:
        best = max(forms, key=r["speedup"].get)
        original = min(r["medians_ms"]["original"], r["medians_ms"]["original A/A"])
        body.append([r["model"], r["m"], r["batch"], f"{original:.2f}",
                     f"{r['a_a']:.2f}x",
                     *[f"{r['medians_ms'][f]:.2f} ({r['speedup'][f]:.2f}x, th {r['theory'][f]:.2f}x)"
                       for f in forms],
                     f"{best} {r['speedup'][best]:.2f}x",
                     f"{r['file_mb']['original']:.1f} -> {r['file_mb'][best]:.1f}",
                     f"{r['load_before']} / {r['load_after']}"])
    return tabulate(body, ["model", "m", "batch", "original ms", "A/A", *[f"{f} ms" for f in forms],
                           "best", "file MB orig -> best", "load before / after"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "yolov8n"],
                        choices=list(SIZES))
    parser.add_argument("--ms", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--forms", nargs="+", default=DEFAULT_FORMS, choices=FORMS)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true",
                        help="issue 26 item 3's models only: resnet50, yolov8n, smp-unet, smp-fpn at m=0.5")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ort_forms.json")
    args = parser.parse_args()
    if args.quick:
        args.models, args.ms = ["resnet50", "yolov8n", "smp-unet", "smp-fpn"], [0.5]
    expected = sum(SECONDS[n] for n in args.models) * len(args.ms) * (args.rounds + 2) / 11
    print(f"expected duration: about {expected / 60:.0f} min on a quiet 2-core machine", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for m in args.ms:
                start = time.perf_counter()
                rows += measure(name, m, args, Path(folder))
                print(f"{name} m={m}: {time.perf_counter() - start:.0f} s", flush=True)
                args.out.write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows, args.forms))


if __name__ == "__main__":
    main()
