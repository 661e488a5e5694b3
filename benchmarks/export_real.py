"""Export of real libraries' models (random weights, built from configs, nothing downloaded):
does the original export to ONNX, does the folded Lego model export with ``legofx.export``'s
default arguments and match in ONNX Runtime, and the ONNX Runtime latency of both.

    YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 python benchmarks/export_real.py [--models yolov8n,smp-unet]

For each model: the original through ``torch.onnx.export(dynamo=True)`` with its own example
inputs; ``legofx.transform(o=2, m=0.5)`` -> ``fold(strategy="auto", backend="onnxruntime")`` ->
``legofx.export(folded, inputs, "x.onnx")`` (defaults: dynamic batch where torch.export can,
the Torch-TensorRT op check); latency of the original and the folded ONNX files (each exported
at batch 1 and 8 with a fixed batch; the model is folded again with batch-8 example inputs for
batch 8), ONNX Runtime CPU sessions taking turns (``TAKING_TURNS``), ``interleaved_times``,
medians, with a second session of the original ("A/A": the noise between equal files) and
what ``auto``'s whole-model check kept (dense / per layer / clear wins). Writes benchmarks/results/export_real.json
and prints the table (docs/export_real.md has the last one); a run of some --models
replaces their rows in the file and keeps the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from tabulate import tabulate

import legofx
from legofx.core.timing import interleaved_times, median_ms
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule
from legofx.testing import randomize_lego

RESULTS = Path(__file__).parent / "results" / "export_real.json"


def _yolo(yaml):
    def build():
        from ultralytics import YOLO
        return YOLO(yaml).model.eval(), (torch.randn(1, 3, 320, 320),)
    return build


def _hf(name, size=224, **config):
    def build():
        import transformers
        model = getattr(transformers, f"{name}Model")(getattr(transformers, f"{name}Config")(**config))
        return model.eval(), (torch.randn(1, 3, size, size),)
    return build


def _smp(arch):
    def build():
        import segmentation_models_pytorch as smp
        return getattr(smp, arch)("resnet18", encoder_weights=None).eval(), (torch.randn(1, 3, 64, 64),)
    return build


def _unet2d():
    from diffusers import UNet2DModel
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return model.eval(), (torch.randn(1, 3, 32, 32), torch.tensor([10]))


def _vae():
    from diffusers import AutoencoderKL
    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                          norm_num_groups=8, sample_size=32)
    return model.eval(), (torch.randn(1, 3, 32, 32),)


def _fasterrcnn():
    import torchvision
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None)
    return model.eval(), ([torch.rand(3, 160, 160)],)


def _torchvision(name):
    def build():
        import torchvision
        return getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, 128, 128),)
    return build


MODELS = {
    "yolov8n": _yolo("yolov8n.yaml"),
    "yolo11n-cls": _yolo("yolo11n-cls.yaml"),
    "hf-resnet": _hf("ResNet", 128, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                     depths=[1, 1, 1, 1]),
    "hf-convnext": _hf("ConvNext", 128, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]),
    "hf-segformer": _hf("Segformer", 128),
    "hf-mobilevit": _hf("MobileViT", 256),
    "diffusers-unet2d": _unet2d,
    "diffusers-vae": _vae,
    "smp-unet": _smp("Unet"),
    "smp-fpn": _smp("FPN"),
    "smp-deeplabv3plus": _smp("DeepLabV3Plus"),
    "tv-fasterrcnn": _fasterrcnn,
    "tv-resnet18": _torchvision("resnet18"),
}


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return " ".join(text.split())[:300]


def _at_batch(args: tuple, batch: int) -> tuple:
    """Each top-level tensor of 2 dimensions or more repeated to ``batch``."""
    return tuple(a.repeat(batch, *[1] * (a.dim() - 1)) if isinstance(a, torch.Tensor) and a.dim() >= 2
                 else a for a in args)


def _session(model, args, path: Path):
    legofx.export(model, args, path, check=None, dynamic_batch=False)
    session = OnnxRuntimeModule.from_file(path, session_config=TAKING_TURNS)
    flat = [leaf for leaf in pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)]
    return lambda: session(*flat)


def run(name: str, build, folder: Path, rounds: int) -> dict:
    row = {"model": name}
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model, args = build()
    except Exception as err:  # noqa: BLE001 - a sweep records every failure
        return {**row, "stage": "build", "error": _first_line(err)}
    try:
        # on a copy: a model that caches tensors in forward (ultralytics' anchors) keeps the
        # export's fake tensors
        torch.onnx.export(copy.deepcopy(model), args, str(folder / f"{name}-original.onnx"),
                          dynamo=True, verbose=False)
        row["original_exports"] = True
    except Exception as err:  # noqa: BLE001
        row.update(original_exports=False, original_error=_first_line(err))
    try:
        gm = legofx.transform(model, o=2, m=0.5)
        randomize_lego(gm, torch.Generator().manual_seed(1))
        row["rewritten"] = sum(r.rewritten for r in legofx.summary(gm))
        folded = legofx.fold(gm.eval(), "auto", example_inputs=args, backend="onnxruntime")
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return {**row, "stage": "transform/fold", "error": _first_line(err)}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = legofx.export(folded, args, folder / f"{name}.onnx")
        row.update(folded_exports=True, max_error=result.max_error, dynamic=result.dynamic,
                   ops_outside=sorted({i.op for i in result.ops.outside}),
                   warnings=[str(w.message).splitlines()[0] for w in caught
                             if "legofx" in w.filename or "export" in str(w.message)][:3])
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return {**row, "stage": "legofx.export", "error": _first_line(err)}
    for batch in (1, 8):
        try:
            inputs = _at_batch(args, batch)
            # auto chooses for the shapes it is deployed at: fold again for batch 8
            lego = folded if batch == 1 else legofx.fold(gm, "auto", example_inputs=inputs,
                                                         backend="onnxruntime")
            kept = {r.lowering.rpartition("kept ")[2].rstrip("]") for r in legofx.summary(lego)
                    if r.rewritten and "kept " in r.lowering}
            row[f"b{batch}_kept"] = sorted(kept)
            row[f"b{batch}_lowerings"] = dict(Counter(r.lowering.split(" ")[0]
                                                      for r in legofx.summary(lego) if r.rewritten))
            original = _session(copy.deepcopy(model), inputs, folder / f"{name}-o{batch}.onnx")
            runs = {"original": original, "lego": _session(lego, inputs, folder / f"{name}-l{batch}.onnx"),
                    # a second session of the original file: the timing noise between equals
                    "original again": _session(copy.deepcopy(model), inputs, folder / f"{name}-a{batch}.onnx")}
            times = interleaved_times(runs, rounds=rounds, warmup=2)
            row[f"b{batch}"] = {key: median_ms(samples) for key, samples in times.items()}
        except Exception as err:  # noqa: BLE001
            row[f"b{batch}_error"] = _first_line(err)
    row["wall_s"] = time.perf_counter() - start
    return row


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        def ms(batch, key):
            value = r.get(f"b{batch}", {}).get(key)
            return f"{value:.2f}" if value is not None else "-"
        status = "ok" if r.get("folded_exports") else f"{r.get('stage')}: {r.get('error', '')[:70]}"
        def ratio(batch, key):
            times = r.get(f"b{batch}", {})
            return f"{times[key] / times['original']:.2f}" if key in times else "-"

        def kept(batch):
            return "/".join(r.get(f"b{batch}_kept", [])) or "-"
        lines.append([r["model"], "yes" if r.get("original_exports") else "no", r.get("rewritten", "-"),
                      status, f"{r['max_error']:.1e}" if "max_error" in r else "-",
                      ms(1, "original"), ms(1, "lego"), ratio(1, "lego"), ratio(1, "original again"),
                      kept(1), ms(8, "original"), ms(8, "lego"), ratio(8, "lego"),
                      ratio(8, "original again"), kept(8)])
    return tabulate(lines, ["model", "original exports", "convs rewritten", "folded export (defaults)",
                            "ORT error", "b1 original ms", "b1 Lego ms", "b1 Lego/orig.",
                            "b1 A/A", "b1 auto kept", "b8 original ms", "b8 Lego ms",
                            "b8 Lego/orig.", "b8 A/A", "b8 auto kept"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            row = run(name, MODELS[name], Path(folder), args.rounds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if RESULTS.exists() and args.models != ",".join(MODELS):  # a partial run updates its rows
        ran = {row["model"]: row for row in rows}
        kept = json.loads(RESULTS.read_text())["rows"]
        rows = [ran.pop(row["model"], row) for row in kept] + list(ran.values())
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
