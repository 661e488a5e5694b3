"""The demo's second part: a network at a realistic size, original vs Lego, on three backends.

A torchvision ResNet-18 (random weights: latency and size do not depend on them) at 224x224 is
transformed (o=2, m=0.5) and folded with the lowering the project recommends for each backend:

- eager PyTorch and ``torch.compile`` (inductor): ``fold(gm, "auto", example_inputs=x,
  custom_ops=True)``: per layer the fastest lowering, ``fused`` (the C merge kernel) included,
  timed in eager mode on this machine;
- ONNX Runtime: ``fold(gm, "accumulate")`` everywhere: it stores what LegoNet stores (Lego
  filters, coefficients, selection), so the ONNX file is as small as the method promises, and
  ran as fast in ONNX Runtime as ``auto`` timed in eager mode (which picks ``dense`` for some
  layers, a larger file) on the project's 2-core machine. Timing every layer's lowerings in
  ONNX Runtime itself (``fold(gm, "auto", backend="onnxruntime")``: one ONNX export per layer
  and lowering) took 71 s for ResNet-18 there, more than the demo's whole budget of 2 minutes.

Then parameters, ONNX file size and MACs, and the latency at each batch size on each backend,
original vs Lego timed in turn (:func:`legofx.core.timing.interleaved_times`, medians), beside
the MAC theory (the original's MACs over the timed Lego model's). In eager mode the original
also runs channels-last, the layout oneDNN's convolutions prefer and the fused Lego layers use:
the fair baseline. Where :func:`legofx.export` takes ``quantize="int8"`` an int8 ONNX row is
added (original and Lego, both quantized); where it does not, a note says so.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from legofx.core.arguments import check_choice, check_positive_int
from legofx.core.modes import kept_modes
from legofx.core.numerics import relative_error
from legofx.core.progress import progress
from legofx.core.timing import interleaved_times, median_ms
from legofx.deploy.compiler import compile as compile_for
from legofx.deploy.exporter import export
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule
from legofx.lowering.fold import fold
from legofx.methods.lego.api import transform
from legofx.report import measure_macs

BACKENDS = ("eager", "inductor", "onnxruntime")
LOWERINGS = {"eager": "auto, custom ops (timed eager)", "inductor": "auto, custom ops (timed eager)",
             "onnxruntime": "accumulate"}


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


def int8_export_available() -> bool:
    """Whether :func:`legofx.export` takes ``quantize=`` (int8 ONNX export)."""
    return "quantize" in inspect.signature(export).parameters


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


def plan(setup: Setup, int8: bool) -> list[str]:
    """The names of the steps, in order (progress reports them)."""
    steps = ["transform and fold (lowerings timed per layer)", "parameters and MACs"]
    if "eager" in setup.backends:
        steps.append("eager: timing")
    if "inductor" in setup.backends:
        steps += [f"torch.compile: compiling for batch {b}" for b in setup.batches]
        steps.append("torch.compile: timing")
    steps.append("ONNX: export and check")
    if "onnxruntime" in setup.backends:
        steps.append("ONNX Runtime: timing")
        if int8:
            steps.append("ONNX Runtime int8: export, calibrate, time")
    return steps


def run(model: nn.Module, setup: Setup | None = None, out_dir: Path | str = ".", name: str = "model",
        quiet: bool = False, seed: int = 0) -> dict:
    """Everything the realistic part measures for ``model`` (its train/eval flags given back
    afterwards; nothing else touched); ONNX files go to ``out_dir``. Returns plain data
    (``legofx demo`` prints it and writes it as JSON)."""
    setup = setup or Setup()
    with kept_modes(model, training=False):
        return _run(model, setup, Path(out_dir), name, quiet, seed)


def _run(original: nn.Module, setup: Setup, out_dir: Path, name: str, quiet: bool, seed: int) -> dict:
    int8 = "onnxruntime" in setup.backends and int8_export_available()
    steps = iter(progress(plan(setup, int8), f"{name} at {setup.size}x{setup.size}", "step", quiet))
    generator = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, 3, setup.size, setup.size, generator=generator) for b in setup.batches}
    largest, smallest = inputs[setup.batches[-1]], inputs[setup.batches[0]]

    next(steps)
    gm = transform(original, o=setup.o, m=setup.m).eval()
    folded = {"eager": fold(gm, "auto", example_inputs=largest, custom_ops=True),
              "onnxruntime": fold(gm, "accumulate")}
    folded["inductor"] = folded["eager"]
    with torch.no_grad():
        reference = gm(smallest)
        fold_error = max(relative_error(f(smallest), reference) for f in folded.values())

    next(steps)
    counts = {backend: measure_macs(f, smallest[:1])[1:] for backend, f in folded.items()}
    macs_before = counts["onnxruntime"][0]  # the original's MACs, whatever the lowering
    macs = {backend: after for backend, (_, after) in counts.items()}
    theory = {backend: macs_before / after for backend, after in macs.items()}
    results = {
        "model": name, "setup": asdict(setup), "fold_error": fold_error,
        "size": {"original": {"params": float_params(original), "macs": macs_before},
                 "lego": {"params": float_params(folded["onnxruntime"]), "macs": macs["onnxruntime"]}},
        "lowerings": {backend: LOWERINGS[backend] for backend in setup.backends},
        "latency": [],
    }

    def timed(backend: str, pair: dict, label: str | None = None) -> None:
        for batch, x in inputs.items():
            times = interleaved_times(pair, x, rounds=setup.rounds, warmup=1)
            ms = {key: median_ms(samples) for key, samples in times.items()}
            for baseline in [key for key in ms if key != "lego"]:
                results["latency"].append({
                    "backend": label or backend, "baseline": baseline, "batch": batch,
                    "original_ms": ms[baseline], "lego_ms": ms["lego"],
                    "speedup": ms[baseline] / ms["lego"], "theory": theory[backend]})

    if "eager" in setup.backends:
        next(steps)
        timed("eager", {"original": original, "original, channels-last": ChannelsLast(original),
                        "lego": folded["eager"]})
    if "inductor" in setup.backends:
        compiled = compiled_per_batch({"original": original, "lego": folded["inductor"]}, inputs, steps)
        next(steps)
        timed("inductor", compiled)

    next(steps)
    files = {key: export(module, (smallest,), out_dir / f"{name}{suffix}.onnx", check=None)
             for key, module, suffix in (("original", original, ""),
                                         ("lego", folded["onnxruntime"], "_lego"))}
    for key, exported in files.items():
        size = results["size"][key]
        size["file_mb"] = exported.path.stat().st_size / 2**20
        size["onnx_error"] = exported.max_error
    if "onnxruntime" in setup.backends:
        next(steps)
        timed("onnxruntime", {key: OnnxRuntimeModule.from_file(exported.path, session_config=TAKING_TURNS)
                              for key, exported in files.items()})
        if int8:
            next(steps)
            # int8 changes which lowering is fastest: each layer's, timed as int8, then the model
            lego_int8 = fold(gm, "auto", example_inputs=largest, backend="onnxruntime-int8",
                             fuse_batchnorm=True)
            results["int8"] = int8_rows(results, {"original": original, "lego": lego_int8},
                                        inputs, setup, out_dir, name, generator, timed)
            results["lowerings"]["onnxruntime int8"] = "auto timed as int8 (onnxruntime-int8), BN fused"
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


def int8_rows(results: dict, models: dict, inputs: dict, setup: Setup, out_dir: Path, name: str,
              generator: torch.Generator, timed) -> str:
    """Time original and Lego exported with ``quantize="int8"`` in ONNX Runtime (rows
    "onnxruntime int8"); returns what happened, for the printed note."""
    calibration = [torch.randn(inputs[setup.batches[-1]].shape, generator=generator) for _ in range(4)]
    smallest = inputs[setup.batches[0]]
    try:
        files = {key: export(module, (smallest,), out_dir / f"{name}{suffix}_int8.onnx", check=None,
                             quantize="int8", calibration=calibration)
                 for key, module, suffix in (("original", models["original"], ""),
                                             ("lego", models["lego"], "_lego"))}
    except Exception as err:  # an optional feature of another module: the rest of the demo stands
        return f"int8 export failed, row left out: {type(err).__name__}: {err}"
    for key, exported in files.items():
        results["size"][key]["int8_file_mb"] = exported.path.stat().st_size / 2**20
    timed("onnxruntime", {key: OnnxRuntimeModule.from_file(exported.path, session_config=TAKING_TURNS)
                          for key, exported in files.items()}, label="onnxruntime int8")
    return ("int8: original and Lego (fold(auto, backend='onnxruntime-int8')) exported with "
            "legofx.export(quantize='int8'), 4 random calibration batches")
