"""Latency of folded Lego models vs the originals, on the same backend, beside the MAC theory.

    python benchmarks/speed.py                       # resnet18 b8, vgg16 b4, resnet50 b8, mobilenet_v2 b8
    python benchmarks/speed.py --models resnet18 --backends eager onnxruntime --rounds 5
    python benchmarks/speed.py --sweep               # speed-up vs m for o in {1, 2, 4} (resnet18)
    python benchmarks/speed.py --breakdown           # eager time per op group (profiler)
    python benchmarks/speed.py --layers              # every rewritten conv alone: original vs fused
    python benchmarks/speed.py --device cuda --backends eager inductor tensorrt   # on a GPU
    python benchmarks/speed.py --models resnet18 vgg16 --backends inductor --variants "lego fused"
    python benchmarks/speed.py --against main --models resnet18 --rounds 15   # A/B (against.py)

For each torchvision model (random weights, 224x224, float32, CPU) the original, the
original with its conv-BatchNorm pairs fused (models with BatchNorm), and the folded Lego
model (o=2, m=0.5) lowered as ``gather`` everywhere, as ``accumulate`` everywhere, with
``strategy="auto"`` (per layer, the fastest lowering in eager mode on the benchmark's own
input) and with ``auto`` plus ``fuse_batchnorm=True`` run on each backend: eager PyTorch,
``torch.compile`` (inductor) and ONNX Runtime (CPU provider; the models go through
``legofx.compile``). On inductor and ONNX Runtime one more variant, ``lego auto on
backend``, picks each layer's lowering by timing it compiled for that backend
(``fold(..., backend=...)``, BatchNorms fused where the model has them). On eager and
inductor (CPU) one more: ``lego fused`` (``fold(gm, "fused")``, Lego conv and merge as one
operator with a C kernel, :mod:`legofx.methods.lego.lowerings.fused`, with the BatchNorms, where the model has
them, and the ReLUs that follow a layer folded in; not run on ONNX Runtime / TensorRT, which
do not take its custom op). Timings are
interleaved: every round runs every variant once, in turn, after warm-up; medians with
min-max (ONNX Runtime sessions without spinning threads, which would take the cores of the
session that runs next: :data:`legofx.deploy.onnx_runtime.TAKING_TURNS`). In eager mode on a CPU the
original (and its BN-fused form) and the fused Lego model also run channels-last (model and
input converted, the input's conversion timed), as oneDNN's convolutions prefer; torch.compile
does this itself. Speed-ups are against the original, the BN-fused original and the fastest
original variant on the same backend. ``theory`` is the network's MAC ratio original / Lego
(Lego conv + merge, LegoNet eq. 2 summed with the untouched layers);
``measured / theory`` is the speed-up divided by it. ``--memory`` measures instead the
growth of the process's peak resident memory during one eager forward (see
:func:`peak_growth_mb`). Results: ``results/speed.json``, ``results/speed_memory.json``,
``results/speed_sweep.json`` and ``results/speed_sweep.png`` (``--sweep``).

``--device cuda`` runs the latency table and the sweep on the GPU (eager, inductor and, with
the ``legofx[tensorrt]`` extra, TensorRT; timings wait for the GPU to finish each run) and
writes ``speed_cuda.json`` / ``speed_sweep_cuda.*``; the memory and profiler views are CPU-only.
A run of some models or backends replaces their rows in the result file and keeps the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate

import legofx
from legofx.methods.lego import kernel as merge_kernel
from legofx.deploy.onnx_runtime import TAKING_TURNS
from legofx.core.progress import progress
from legofx.report import measure_macs
from legofx.core.timing import interleaved_times

from against import load

RESULTS = Path(__file__).parent / "results"
BATCH = {"resnet18": 8, "vgg16": 4, "resnet50": 8, "mobilenet_v2": 8}
DEVICE_BACKENDS = {"cpu": ("eager", "inductor", "onnxruntime"), "cuda": ("eager", "inductor", "tensorrt")}
LOWERINGS = ("gather", "accumulate", "merge-conv", "dense")
FUSED = ("fused",)  # with the model's BatchNorms (if any) and ReLUs folded in
EXPORTED = ("onnxruntime", "tensorrt")


def build(name: str, device: str = "cpu") -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval().to(device)


def peak_growth_mb(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    """Growth of the process's peak resident memory during one forward pass (Linux).

    Run with :func:`exact_rss` in effect (``--memory``): then every tensor of 64 KiB or more
    is its own mapping, returned to the system when freed, so resident memory follows the live
    tensors instead of what the allocator keeps for reuse."""
    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        raise KeyError(key)

    try:
        with torch.no_grad():
            model(x)  # kernels and caches warmed up
            Path("/proc/self/clear_refs").write_text("5")
            before = status("VmRSS:")
            model(x)
            return (status("VmHWM:") - before) / 1024
    except OSError:
        return None


def exact_rss() -> None:
    """glibc: a fixed 64 KiB mmap threshold (``M_MMAP_THRESHOLD``), no heap reuse of tensors."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)


def memory(names: list[str], o: int = 2, m: float = 0.5) -> list[dict]:
    exact_rss()
    rows = []
    for name in names:
        x = torch.randn(BATCH.get(name, 8), 3, 224, 224)
        models, _ = variants(name, o, m, x)
        models["lego gather, uint8 index"] = legofx.fold(
            legofx.transform(models["original"], o=o, m=m).eval(), index_dtype="smallest")
        peaks = {variant: peak_growth_mb(model, x) for variant, model in models.items()}
        sizes = {variant: file_mb(model) for variant, model in models.items()}
        rows += [{"model": name, "batch": x.shape[0], "variant": variant, "peak_mb": peak,
                  "ratio": peak / peaks["original"], "file_mb": sizes[variant],
                  "file_ratio": sizes["original"] / sizes[variant],
                  "tensor_mb": tensor_mb(models[variant])}
                 for variant, peak in peaks.items()]
    print(tabulate([[r["model"], r["batch"], r["variant"], f"{r['peak_mb']:.0f}",
                     f"{r['ratio']:.2f}", f"{r['file_mb']:.2f}", f"{r['file_ratio']:.2f}x",
                     f"{r['tensor_mb']:.2f}"] for r in rows],
                   ["model", "batch", "variant", "peak MB (one forward)", "vs original",
                    "state_dict MB", "smaller", "tensor bytes MB"], tablefmt="github"))
    return rows


def file_mb(model: torch.nn.Module) -> float:
    """Size of ``torch.save(model.state_dict())``."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def tensor_mb(model: torch.nn.Module) -> float:
    """What the model must store: every tensor at its own width. For a folded Lego model
    that is the Lego filters, coefficients and one index entry per (output channel, fragment)
    (the paper's eq. 1 counts M as n*o*m bits; an index needs only log2(o*m) bits)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def variants(name: str, o: int, m: float, x: torch.Tensor,
             wanted: list[str] | None = None) -> tuple[dict, dict]:
    """The models timed for ``name``: the original; with BatchNorms, the original with every
    conv-BN pair fused (``torch.fx.experimental.optimization.fuse``, the fair baseline for
    the Lego models that fold their BatchNorms too); Lego folded as ``gather`` and as
    ``accumulate`` everywhere, ``auto``, and ``auto`` with ``fuse_batchnorm=True``.
    ``wanted``: only these (``--variants``; the original is always timed, the baseline)."""
    from torch.fx.experimental.optimization import fuse

    def keep(variant: str) -> bool:
        return wanted is None or variant in wanted

    original = build(name, x.device.type)
    gm = legofx.transform(original, o=o, m=m).eval()
    models = {"original": original}
    if has_batchnorm(original) and keep("original, BN fused"):
        models["original, BN fused"] = fuse(original).eval()
    gather = models["lego gather"] = legofx.fold(gm)  # LegoNet's MACs: the theory
    if keep("lego accumulate"):
        models["lego accumulate"] = legofx.fold(gm, "accumulate")
    if keep("lego auto"):
        models["lego auto"] = legofx.fold(gm, "auto", example_inputs=x)
    if has_batchnorm(original) and keep("lego auto, BN fused"):
        models["lego auto, BN fused"] = legofx.fold(gm, "auto", example_inputs=x,
                                                    fuse_batchnorm=True)
    if x.device.type == "cpu" and merge_kernel.available() is None:
        for strategy in FUSED:
            if keep(f"lego {strategy}"):
                models[f"lego {strategy}"] = legofx.fold(gm, strategy,
                                                         fuse_batchnorm=has_batchnorm(original))
    macs = {variant: measure_macs(model, x[:1])[1:] for variant, model in models.items()
            if variant.startswith("lego")}
    base = macs["lego gather"][0]  # the original's MACs (BN fusion does not change them)
    macs = {"original": base, "original, BN fused": base,
            **{variant: after for variant, (_, after) in macs.items()}}
    if not keep("lego gather"):
        del models["lego gather"]
    auto = models.get("lego auto")
    info = {"macs": base, "theory": {variant: base / after for variant, after in macs.items()},
            "auto_choices": "" if auto is None else choices(auto), "gm": gm,
            "rewritten": sum(r.rewritten for r in legofx.summary(gather)),
            "layers": layers(models.get("lego auto, BN fused", auto or gather)), "wanted": wanted}
    return models, info


def choices(model: torch.nn.Module) -> str:
    """How many layers took each of :data:`LOWERINGS`, as "gather/accumulate/merge-conv/dense"."""
    chosen = [r.lowering.split(" ")[0] for r in legofx.summary(model) if r.rewritten]
    return "/".join(str(chosen.count(kind)) for kind in LOWERINGS)


def layers(model: torch.nn.Module) -> list[dict]:
    return [{"name": r.name, "lowering": r.lowering} for r in legofx.summary(model) if r.rewritten]


def timed_on_backend(models: dict, info: dict, backend: str, x: torch.Tensor) -> dict:
    """``models`` plus "lego auto on backend": the lowerings timed compiled for ``backend``."""
    if backend == "eager" or info["wanted"] is not None and "lego auto on backend" not in info["wanted"]:
        return models
    fused = has_batchnorm(models["original"])
    model = legofx.fold(info["gm"], "auto", example_inputs=x, backend=backend, fuse_batchnorm=fused)
    info["theory"]["lego auto on backend"] = info["macs"] / measure_macs(model, x[:1])[2]
    info[f"auto_choices {backend}"] = choices(model)
    info[f"layers {backend}"] = layers(model)
    return {**models, "lego auto on backend": model}


class ChannelsLast(torch.nn.Module):
    """``model`` with its 4-D tensors channels-last, fed channels-last inputs (the conversion
    of the input is timed): the layout oneDNN's CPU convolutions run fastest in eager mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def on_backend(models: dict, backend: str, x: torch.Tensor, wanted: list[str] | None = None) -> dict:
    """``models`` as they run on ``backend``; in eager mode on a CPU also the original and the
    fused Lego model channels-last (inductor makes its convolutions channels-last itself)."""
    if backend == "eager":
        if x.device.type == "cpu":
            extra = {f"{name}, channels-last": ChannelsLast(models[name])
                     for name in ("original", "original, BN fused", *(f"lego {s}" for s in FUSED))
                     if name in models and (wanted is None or f"{name}, channels-last" in wanted)}
            models = {**models, **extra}
        return models
    if backend in EXPORTED:  # the fused lowerings' custom op does not export
        models = {name: model for name, model in models.items() if not name.startswith("lego fused")}
    options = {"session_config": TAKING_TURNS} if backend == "onnxruntime" else {}
    return {name: legofx.compile(model, x, backend=backend, **options) for name, model in models.items()}


def run_model(name: str, backends: list[str], rounds: int, o: int = 2, m: float = 0.5,
              device: str = "cpu", wanted: list[str] | None = None) -> list[dict]:
    x = torch.randn(BATCH.get(name, 8), 3, 224, 224, device=device)
    models, info = variants(name, o, m, x, wanted)
    rows = []
    for backend in backends:
        compiled = on_backend(timed_on_backend(models, info, backend, x), backend, x, wanted)
        times = interleaved_times(compiled, x, rounds=rounds, warmup=2)
        base = statistics.median(times["original"])
        fused = statistics.median(times.get("original, BN fused", times["original"]))
        originals = {v: statistics.median(t) for v, t in times.items() if v.startswith("original")}
        fastest = min(originals, key=originals.get)  # the most demanding baseline on this backend
        lego_theory = info["theory"]["lego gather"]
        for variant, samples in times.items():
            median = statistics.median(samples)
            rows.append({
                "model": name, "batch": x.shape[0], "device": device, "backend": backend,
                "variant": variant,
                "median_ms": 1000 * median, "min_ms": 1000 * min(samples),
                "max_ms": 1000 * max(samples), "speedup": base / median,
                "speedup_vs_bn_fused": fused / median,
                "speedup_vs_fastest_original": originals[fastest] / median, "fastest_original": fastest,
                "theory": info["theory"][variant.removesuffix(", channels-last")],
                "lego_theory": lego_theory, "measured_over_theory": base / median / lego_theory,
                "auto_choices": ("" if not variant.startswith("lego auto") else
                                 info[f"auto_choices {backend}"] if variant.endswith("on backend")
                                 else info["auto_choices"]),
                "rewritten": info["rewritten"], "rounds": rounds,
            })
        print(table([r for r in rows if r["backend"] == backend]), flush=True)
    rows.append({"model": name, "layers": info["layers"],
                 **{key: value for key, value in info.items() if key.startswith("layers ")}})
    return rows


def table(rows: list[dict]) -> str:
    body = [[r["model"], r["batch"], r["backend"], r["variant"], f"{r['median_ms']:.1f}",
             f"{r['min_ms']:.1f}-{r['max_ms']:.1f}", f"{r['speedup']:.2f}x",
             f"{r['speedup_vs_bn_fused']:.2f}x", f"{r['speedup_vs_fastest_original']:.2f}x",
             *(["", ""] if r["variant"].startswith("original") else
               [f"{r['lego_theory']:.2f}x", f"{r['measured_over_theory']:.2f}"]),
             r["auto_choices"]]
            for r in rows if "variant" in r]
    return tabulate(body, ["model", "batch", "backend", "variant", "median ms", "min-max ms",
                           "speed-up", "vs BN-fused original", "vs fastest original", "theory",
                           "meas./theory",
                           "auto: " + "/".join(LOWERINGS)],
                    tablefmt="github", disable_numparse=True)


OP_GROUPS = {"convolution": ("convolution",), "batch norm": ("batch_norm",),
             "index_select / mul / add / sum": ("index_select", "mul", "add", "sum", "fill_")}


def breakdown(names: list[str], rounds: int, o: int = 2, m: float = 0.5) -> list[dict]:
    """Where eager time goes: ``torch.profiler`` self CPU time per forward, by op group, for the
    original and the Lego lowerings. ``conv-only speed-up`` (original's convolution time over
    the variant's) is the ceiling any merge, however fast, leaves: the Lego convs' own
    efficiency on this machine."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name in names:
        x = torch.randn(BATCH.get(name, 8), 3, 224, 224)
        original = build(name)
        gm = legofx.transform(original, o=o, m=m).eval()
        models = {"original": original, "lego gather": legofx.fold(gm),
                  "lego accumulate": legofx.fold(gm, "accumulate")}
        groups = {}
        with torch.no_grad():
            for variant, model in models.items():
                model(x)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(rounds):
                        model(x)
                ms = {key: 0.0 for key in [*OP_GROUPS, "other"]}
                for event in prof.key_averages():
                    group = next((g for g, parts in OP_GROUPS.items()
                                  if any(part in event.key for part in parts)), "other")
                    ms[group] += event.self_cpu_time_total / rounds / 1000
                groups[variant] = ms
        for variant, ms in groups.items():
            conv = groups["original"]["convolution"] / ms["convolution"]
            rows.append({"model": name, "batch": x.shape[0], "variant": variant, **ms,
                         "total": sum(ms.values()), "conv_only_speedup": conv})
    print(tabulate([[r["model"], r["variant"], *(f"{r[g]:.1f}" for g in [*OP_GROUPS, "other"]),
                     f"{r['total']:.1f}", f"{r['conv_only_speedup']:.2f}x"] for r in rows],
                   ["model", "variant", *(f"{g} ms" for g in OP_GROUPS), "other ms",
                    "total ms", "conv-only speed-up"], tablefmt="github"))
    return rows


def per_layer(names: list[str], rounds: int, o: int = 2, m: float = 0.5) -> list[dict]:
    """Every rewritten conv alone, eager, on the input it gets in the model: the original conv
    vs the ``fused`` Lego layer (without the BatchNorm or ReLU it would take in) and vs its
    Lego conv alone (the grouped conv inside it, no merge: what any merge leaves), all
    channels-last, and the layer's MAC theory (dense / Lego conv + merge)."""
    from legofx.core.geometry import padded
    from legofx.methods.lego.lowerings.fused import FusedLegoConv2d
    from legofx.lowering.auto import layer_inputs

    rows = []
    for name in names:
        x = torch.randn(BATCH.get(name, 8), 3, 224, 224)
        original = build(name)
        gm = legofx.transform(original, o=o, m=m).eval()
        layers = {n: mod for n, mod in gm.named_modules() if isinstance(mod, legofx.LegoConv2d)}
        convs = {n: original.get_submodule(n) for n in layers}  # the same names, hooks see them
        inputs = layer_inputs(original, convs, (x,))
        for layer_name, layer in progress(layers.items(), f"{name}: layers", "layer"):
            if layer_name not in inputs:
                continue
            fmt = torch.channels_last
            conv = copy.deepcopy(convs[layer_name]).to(memory_format=fmt)
            fused = FusedLegoConv2d(layer).eval()
            weight = merge_kernel.grouped_weight(fused.lego, fused.o)
            padding = padded(inputs[layer_name], fused.geometry, conv_pads="symmetric")[1]
            pair = {"original": conv, "fused": fused,
                    "lego conv": lambda x, f=fused, w=weight, p=padding: torch.nn.functional.conv2d(
                        x, w, None, f.stride, p, f.dilation, f.o)}
            times = interleaved_times(pair, inputs[layer_name].contiguous(memory_format=fmt),
                                      rounds=rounds, warmup=2)
            ms = {key: 1000 * statistics.median(t) for key, t in times.items()}
            with torch.no_grad():
                shape = conv(inputs[layer_name]).shape
            dense, lego = layer.macs(tuple(shape))
            rows.append({"model": name, "layer": layer_name, "input": list(inputs[layer_name].shape),
                         "original_ms": ms["original"], "fused_ms": ms["fused"],
                         "lego_conv_ms": ms["lego conv"],
                         "speedup": ms["original"] / ms["fused"], "theory": dense / lego})
    slowest = sorted(rows, key=lambda r: r["speedup"])
    print(tabulate([[r["model"], r["layer"], "x".join(map(str, r["input"])), f"{r['original_ms']:.2f}",
                     f"{r['fused_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['theory']:.2f}x"]
                    for r in slowest[:15]],
                   ["model", "layer (15 slowest)", "input", "original ms", "fused ms", "speed-up",
                    "MAC theory"], tablefmt="github"))
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        below = [r["layer"] for r in mine if r["speedup"] < 1]
        total = {key: sum(r[key] for r in mine) for key in ("original_ms", "fused_ms", "lego_conv_ms")}
        print(f"{name}: {len(mine)} layers, speed-up {min(r['speedup'] for r in mine):.2f}x-"
              f"{max(r['speedup'] for r in mine):.2f}x, slower than the original: {below or 'none'}; "
              f"summed: original {total['original_ms']:.1f} ms, fused {total['fused_ms']:.1f} ms "
              f"({total['original_ms'] / total['fused_ms']:.2f}x), Lego conv alone "
              f"{total['lego_conv_ms']:.1f} ms ({total['original_ms'] / total['lego_conv_ms']:.2f}x)")
    return rows


def sweep(rounds: int, backends: list[str], out: Path, device: str = "cpu") -> list[dict]:
    """Speed-up of resnet18 (batch 8) vs m for o in {1, 2, 4}, folded with ``strategy="auto"``
    (lowerings timed in eager mode on the benchmark's input) on each of ``backends``, beside
    LegoNet's MAC theory (Lego conv + gather merge; the merge-conv or dense lowerings ``auto``
    may pick cost more MACs). On a CPU also ``fused`` (BatchNorms folded in) against the
    BN-fused original, both channels-last, in eager mode (panel "eager fused")."""
    from torch.fx.experimental.optimization import fuse

    x = torch.randn(8, 3, 224, 224, device=device)
    original = build("resnet18", device)
    fast_original = ChannelsLast(fuse(original)) if device == "cpu" else None
    panels = [*backends, *(["eager fused"] if device == "cpu" and "eager" in backends else [])]
    rows = []
    for o in (1, 2, 4):
        for m in (0.125, 0.25, 0.5):
            gm = legofx.transform(original, o=o, m=m).eval()
            folded = legofx.fold(gm, "auto", example_inputs=x)
            _, before, after = measure_macs(legofx.fold(gm, "gather"), x[:1])  # LegoNet's MACs
            for backend in panels:
                if backend == "eager fused":
                    lego = ChannelsLast(legofx.fold(gm, "fused", fuse_batchnorm=True))
                    pair = {"original": fast_original, "lego": lego}
                else:
                    pair = on_backend({"original": original, "lego": folded}, backend, x)
                    pair = {key: pair[key] for key in ("original", "lego")}
                times = interleaved_times(pair, x, rounds=rounds, warmup=2)
                speedup = statistics.median(times["original"]) / statistics.median(times["lego"])
                rows.append({"o": o, "m": m, "backend": backend, "speedup": speedup,
                             "theory": before / after,
                             "lowerings": "fused" if backend == "eager fused" else choices(folded)})
                print(f"o={o} m={m} {backend}: {speedup:.2f}x (theory {before / after:.2f}x)", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, backend in zip(axes[0], panels):
        for o, color in zip((1, 2, 4), ("tab:blue", "tab:orange", "tab:green")):
            points = [r for r in rows if r["o"] == o and r["backend"] == backend]
            axis.plot([r["m"] for r in points], [r["speedup"] for r in points], "o-", color=color,
                      label=f"o={o} measured")
            axis.plot([r["m"] for r in points], [r["theory"] for r in points], "--", color=color,
                      alpha=0.6, label=f"o={o} MAC theory")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("m (fraction of out_channels)")
        axis.set_title(f"resnet18 b8, {device} eager, fused vs BN-fused original, channels-last"
                       if backend == "eager fused" else
                       f"resnet18 b8, {device} {backend}, fold strategy auto", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up vs original (same backend)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / f"speed_sweep{suffix(device)}.png", dpi=110)
    return rows


def suffix(device: str) -> str:
    """Result files of a GPU run get their own names (``speed_cuda.json``)."""
    return "" if device == "cpu" else f"_{device}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BATCH))
    parser.add_argument("--device", choices=list(DEVICE_BACKENDS), default="cpu")
    parser.add_argument("--backends", nargs="+", choices=["eager", "inductor", "onnxruntime", "tensorrt"],
                        help="default: eager inductor onnxruntime on cpu, eager inductor on cuda")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="speed-up vs m for o in {1, 2, 4}")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of one eager forward instead of latency")
    parser.add_argument("--layers", action="store_true",
                        help="every rewritten conv alone, original vs fused (eager, CPU)")
    parser.add_argument("--breakdown", action="store_true",
                        help="eager time per op group (torch.profiler) instead of latency")
    parser.add_argument("--variants", nargs="+", metavar="VARIANT",
                        help="time only these (the original always): e.g. 'lego fused' "
                             "'original, BN fused'; with --against: original and 'lego STRATEGY'")
    parser.add_argument("--against", metavar="REV", nargs="+",
                        help="A/B this checkout against git revisions or checkout directories, "
                             "each in its own process, taking turns round by round "
                             "(benchmarks/against.py; default --variants original 'lego fused', "
                             "--backends inductor)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, here %d)" % torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    backends_given = args.backends is not None
    if args.backends is None:
        args.backends = [b for b in DEVICE_BACKENDS[device] if b != "tensorrt"]
    wrong = [b for b in args.backends if b not in DEVICE_BACKENDS[device]]
    if wrong:
        parser.error(f"--backends {' '.join(wrong)}: not run on --device {device} "
                     f"(choose from {', '.join(DEVICE_BACKENDS[device])})")
    if device != "cpu" and (args.memory or args.breakdown or args.layers):
        parser.error(f"--memory, --breakdown and --layers measure CPU memory and CPU time: "
                     f"drop --device {device}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.against:
        from against import against

        args.threads = torch.get_num_threads()
        args.o, args.m = 2, 0.5
        args.variants = args.variants or ["original", "lego fused"]
        args.variants = list(dict.fromkeys(["original", *args.variants]))
        args.backends = args.backends if backends_given else ["inductor"]
        if device != "cpu" or set(args.backends) - {"eager", "inductor"}:
            parser.error("--against times on the CPU, with --backends eager and/or inductor")
        against(args, args.models, BATCH, args.out)
        return 0
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    if args.memory:
        rows = memory(args.models)
        (args.out / "speed_memory.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        return 0
    if args.layers:
        rows = per_layer(args.models, args.rounds)
        (args.out / "speed_layers.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        return 0
    if args.breakdown:
        rows = breakdown(args.models, args.rounds)
        (args.out / "speed_breakdown.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        return 0
    if args.sweep:
        rows = sweep(args.rounds, [b for b in args.backends if b != "inductor"], args.out, device)
        (args.out / f"speed_sweep{suffix(device)}.json").write_text(
            json.dumps({**meta, "rows": rows}, indent=1))
        return 0
    rows, meta["load_before"] = [], load()
    for name in args.models:
        rows += run_model(name, args.backends, args.rounds, device=device, wanted=args.variants)
    meta["load_after"] = load()
    print("\n" + table(rows))
    print(f"load average (1, 5, 15 min) before: {meta['load_before']}, after: {meta['load_after']}")
    path = args.out / f"speed{suffix(device)}.json"
    path.write_text(json.dumps({**meta, "rows": kept_rows(path, rows) + rows}, indent=1))
    return 0


def kept_rows(path: Path, new: list[dict]) -> list[dict]:
    """The rows of an earlier result file that this run did not measure again (other models,
    or other backends of the same model), each still carrying its own ``rounds``."""
    if not path.exists():
        return []
    measured = {(r["model"], r.get("backend")) for r in new}
    return [r for r in json.loads(path.read_text())["rows"]
            if (r["model"], r.get("backend")) not in measured]


if __name__ == "__main__":
    sys.exit(main())
