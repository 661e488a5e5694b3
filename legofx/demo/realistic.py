"""The demo's second part: a network at a realistic size, original vs Lego, on three backends.

A torchvision ResNet-18 (random weights: latency and size do not depend on them) at 224x224 is
transformed (o=2, m=0.5) and folded twice, each with its BatchNorms fused (``fuse_batchnorm``),
with the lowering that runs fastest where it is timed:

- eager PyTorch and ``torch.compile`` (inductor): ``fold(gm, "fused", fuse_batchnorm=True)``
  (the legofx C++ merge kernel), fed channels-last inputs in eager mode;
- ONNX Runtime, float32 and int8: ``fold(gm, "accumulate", fuse_batchnorm=True)``: what
  LegoNet stores (Lego filters, coefficients, selection), so the file is as small as the method
  promises. The int8 file is that same float file, quantized (:mod:`legofx.deploy.quantize`).

Every speed row is one interleaved run (:func:`legofx.core.timing.interleaved_times`, medians)
of the Lego model against every variant of the original on that backend: as is, its
conv+BatchNorm pairs fused (``torch.fx.experimental.optimization.fuse``), and in eager mode both
channels-last too; the row's baseline is the fastest of them, named. ONNX Runtime fuses
BatchNorm into the convs itself, so there the original runs as exported. Beside it, the MAC
theory: the original's MACs over the timed Lego model's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from legofx.core.arguments import check_choice, check_positive_int
from legofx.core.layer import RewrittenLayer
from legofx.core.modes import kept_modes
from legofx.core.numerics import relative_error
from legofx.core.progress import progress
from legofx.core.timing import interleaved_times, median_ms, relative_spread
from legofx.deploy.compiler import compile as compile_for
from legofx.deploy.exporter import export
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule, numpy_input
from legofx.deploy.quantize import int8_agreement, quantize_file
from legofx.lowering.fold import fold
from legofx.methods.lego.api import transform
from legofx.report import measure_macs

BACKENDS = ("eager", "inductor", "onnxruntime")
# the Lego fold timed on each backend (the keys of ``folds``) and how it is described
LEGO_FOLD = {"eager": "fused", "inductor": "fused", "onnxruntime": "accumulate",
             "onnxruntime int8": "accumulate"}
FOLD_LABELS = {"fused": "fold 'fused', BN fused", "accumulate": "fold 'accumulate', BN fused"}
CALIBRATION_BATCHES = 4


@dataclass
class Setup:
    """What the realistic part measures; the defaults are ``legofx demo``'s."""

    size: int = 224
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 7
    backends: tuple[str, ...] = BACKENDS
    o: int = 2
    m: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int("size", self.size)
        check_positive_int("rounds", self.rounds)
        self.batches = tuple(sorted({check_positive_int("batch", b) for b in self.batches}))
        if not self.batches:
            raise ValueError("batches must name at least one batch size, got batches=()")
        self.backends = tuple(check_choice("backend", b, BACKENDS) for b in self.backends)


class ChannelsLast(nn.Module):
    """A copy of ``model`` with its 4-D weights channels-last, fed channels-last inputs (the
    conversion of the input is timed): the layout oneDNN's CPU convolutions run fastest in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def float_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.is_floating_point())


def same_graph(folded: nn.Module) -> bool:
    """Whether every folded layer of ``folded`` is dense: then it computes what the original
    computes, the same way (``auto`` can keep every layer dense), and a speed ratio is noise."""
    lowered = [m for m in folded.modules() if isinstance(m, RewrittenLayer)]
    return bool(lowered) and all(getattr(m, "lowering_name", None) == "dense" for m in lowered)


def original_variants(original: nn.Module, backend: str) -> dict[str, nn.Module]:
    """The original as it could be deployed on ``backend``: as is, BatchNorm fused, and (eager)
    both channels-last; the original itself is not touched."""
    from torch.fx.experimental.optimization import fuse

    variants = {"original": original}
    try:
        variants["original, BN fused"] = fuse(copy.deepcopy(original)).eval()
    except Exception:  # noqa: BLE001 - fx cannot trace it: the original as is stays
        pass
    if backend == "eager":
        variants.update({f"{key}, channels-last": ChannelsLast(model) for key, model in list(variants.items())})
    return variants


def plan(setup: Setup) -> list[str]:
    """The names of the steps, in order (progress reports them)."""
    steps = ["transform and fold", "parameters and MACs"]
    if "eager" in setup.backends:
        steps.append("eager: timing")
    if "inductor" in setup.backends:
        steps += [f"torch.compile: compiling for batch {b}" for b in setup.batches]
        steps.append("torch.compile: timing")
    steps.append("ONNX: export, check, quantize to int8")
    if "onnxruntime" in setup.backends:
        steps.append("ONNX Runtime: timing, float32 and int8")
    return steps


def run(model: nn.Module, setup: Setup | None = None, out_dir: Path | str = ".", name: str = "model",
        quiet: bool = False, seed: int = 0) -> dict:
    """Everything the realistic part measures for ``model`` (its train/eval flags given back
    afterwards; nothing else touched); ONNX files go to ``out_dir``. Returns plain data
    (``legofx demo`` prints it and writes it as JSON)."""
    setup = setup or Setup()
    with kept_modes(model, training=False):
        return _run(model, setup, Path(out_dir), name, quiet, seed)


class Stopwatch:
    """Seconds spent per named part, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.part, self.start = None, time.perf_counter()

    def next(self, part: str | None) -> None:
        now = time.perf_counter()
        if self.part is not None:
            self.seconds[self.part] = self.seconds.get(self.part, 0.0) + now - self.start
        self.part, self.start = part, now


def _run(original: nn.Module, setup: Setup, out_dir: Path, name: str, quiet: bool, seed: int) -> dict:
    steps = iter(progress(plan(setup), f"{name} at {setup.size}x{setup.size}", "step", quiet))
    clock = Stopwatch()
    generator = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, 3, setup.size, setup.size, generator=generator) for b in setup.batches}
    smallest = inputs[setup.batches[0]]

    next(steps), clock.next("transform and fold")
    gm = transform(original, o=setup.o, m=setup.m).eval()
    folds = {lowering: fold(gm, lowering, fuse_batchnorm=True) for lowering in ("fused", "accumulate")}
    with torch.no_grad():
        reference = gm(smallest)
        fold_error = max(relative_error(f(smallest), reference) for f in folds.values())

    next(steps), clock.next("parameters and MACs")
    counts = {lowering: measure_macs(f, smallest[:1])[1:] for lowering, f in folds.items()}
    macs_before = counts["accumulate"][0]
    size = {"original": {"fold": "", "params": float_params(original), "macs": macs_before}}
    size.update({lowering: {"fold": FOLD_LABELS[lowering], "params": float_params(f),
                            "macs": counts[lowering][1], "same_graph": same_graph(f)}
                 for lowering, f in folds.items()})
    results = {"model": name, "setup": asdict(setup), "fold_error": fold_error, "size": size,
               "latency": []}

    def timed(backend: str, originals: dict, lego: nn.Module) -> None:
        lowering = LEGO_FOLD[backend]
        for batch, x in inputs.items():
            times = interleaved_times({**originals, "lego": lego}, x, rounds=setup.rounds, warmup=1)
            ms = {key: median_ms(samples) for key, samples in times.items()}
            baseline = min(originals, key=ms.get)
            results["latency"].append({
                "backend": backend, "batch": batch, "lowering": FOLD_LABELS[lowering],
                "baseline": baseline, "baselines_ms": {key: ms[key] for key in originals},
                "original_ms": ms[baseline], "lego_ms": ms["lego"],
                "speedup": ms[baseline] / ms["lego"], "theory": macs_before / size[lowering]["macs"],
                "same_graph": size[lowering]["same_graph"],
                "spread": max(relative_spread(times[key]) for key in (baseline, "lego"))})

    if "eager" in setup.backends:
        next(steps), clock.next("eager: timing")
        timed("eager", original_variants(original, "eager"), ChannelsLast(folds["fused"]))
    if "inductor" in setup.backends:
        clock.next("torch.compile: compiling")
        compiled = compiled_per_batch({**original_variants(original, "inductor"), "lego": folds["fused"]},
                                      inputs, steps)
        next(steps), clock.next("torch.compile: timing")
        lego = compiled.pop("lego")
        timed("inductor", compiled, lego)

    next(steps), clock.next("ONNX: export, check, quantize")
    files = onnx_files({"original": original, "lego": folds["accumulate"]}, smallest, out_dir, name,
                       generator, results)
    if "onnxruntime" in setup.backends:
        next(steps), clock.next("ONNX Runtime: timing")
        for backend, suffix in (("onnxruntime", ""), ("onnxruntime int8", "_int8")):
            if "original" + suffix in files and "lego" + suffix in files:
                sessions = {key: OnnxRuntimeModule.from_file(files[key + suffix], session_config=TAKING_TURNS)
                            for key in ("original", "lego")}
                timed(backend, {"original": sessions["original"]}, sessions["lego"])
    clock.next(None)
    results["seconds"] = clock.seconds
    for _ in steps:  # closes the progress bar
        pass
    return results


def compiled_per_batch(models: dict, inputs: dict, steps) -> dict:
    """``models`` compiled by inductor for every batch size of ``inputs`` (``dynamic=False``:
    one specialised compilation per shape, done here, one step each), checked against eager."""
    compiled = {}
    for x in inputs.values():
        next(steps)
        for key, module in models.items():
            if key not in compiled:  # the first call compiles and checks the outputs
                compiled[key] = compile_for(module, x, "inductor", dynamic=False)
            with torch.no_grad():  # a new shape: compiled again
                compiled[key](x)
    return compiled


def onnx_files(models: dict, example: torch.Tensor, out_dir: Path, name: str,
               generator: torch.Generator, results: dict) -> dict[str, Path]:
    """``models`` (original, Lego) exported to ONNX (checked in ONNX Runtime), and the same files
    quantized to int8 (QDQ, calibrated on random batches, checked: cosine similarity to the
    float model); their sizes go into ``results["size"]``. Returns key (``_int8`` for int8) ->
    file; int8 files are left out, with a note in ``results["int8"]``, when quantizing fails."""
    files = {}
    calibration = [torch.randn(example.shape, generator=generator) for _ in range(CALIBRATION_BATCHES)]
    cosine = 1.0
    for key, model in models.items():
        target = "accumulate" if key == "lego" else "original"
        exported = export(model, (example,), out_dir / f"{name}{'_lego' if key == 'lego' else ''}.onnx",
                          check=None)
        files[key] = exported.path
        results["size"][target].update(file_bytes=exported.path.stat().st_size, onnx_error=exported.max_error)
        int8 = exported.path.with_name(exported.path.stem + "_int8.onnx")
        session_inputs = OnnxRuntimeModule.from_file(exported.path).input_names
        try:
            quantize_file(exported.path, int8, [{session_inputs[0]: numpy_input(x)} for x in calibration])
            with torch.no_grad():
                cosine = min(cosine, int8_agreement(OnnxRuntimeModule.from_file(int8)(example), model(example))[0])
        except Exception as err:  # noqa: BLE001 - an optional row: the rest of the demo stands
            results["int8"] = f"int8 row left out: quantizing failed: {type(err).__name__}: {err}"[:300]
            continue
        files[f"{key}_int8"] = int8
        results["size"][target]["int8_file_bytes"] = int8.stat().st_size
    if "int8" not in results:
        results["int8"] = (f"int8: the float ONNX files above, quantized (QDQ, onnxruntime static "
                           f"quantization, {CALIBRATION_BATCHES} random calibration batches); "
                           f"worst cosine similarity to the float model {cosine:.4f}")
    return files
