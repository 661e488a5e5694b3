"""Eager CPU latency of Structured Convolutions vs LegoNet vs the original network.

    python benchmarks/structured_speed.py              # resnet18 and mobilenet_v2, batch 1 and 8
    python benchmarks/structured_speed.py --reps 30 --threads 2

Per torchvision model (random weights, eval mode, float32, 3x224x224 inputs):

- ``original``;
- ``structured``: ``legofx.structure(c=0.5, n=...)`` then ``legofx.fold`` (pad + 3-D sum-pool
  as a channel running sum and a depthwise all-ones conv + small conv). resnet18 uses ``n=2`` (its 3x3 convs
  get 2x2 underlying kernels, the paper's ResNet setting); mobilenet_v2 uses ``n=1``: its
  only dense convs are 1x1 (the 3x3 ones are depthwise, which legofx keeps), so ``n=2`` would
  touch nothing but the stem; ``n=1`` structures the 1x1 convs along channels (the paper's
  Structured-MobileNetV2 does the same);
- ``lego``: ``legofx.transform(o=2, m=0.5)`` then ``legofx.fold``;
- ``... auto``: the same folded with ``strategy="auto"`` (per layer, the faster of the
  method's lowering and the dense reconstructed conv, timed in eager mode on this machine).

``--train-step``: instead, the cost of one training step (train mode, forward + backward of
``out.square().mean()``, gradients zeroed) of the original and of the training forms
(``structure(c=0.5, n=...)``, ``transform(o=2, m=0.5)``), batch ``--batches`` (default 2);
results go to ``benchmarks/results/structured_train_step.json``.

Latency: ``--reps`` repetitions; each runs every variant once, in turn (interleaved, so drift
of the machine hits all variants alike), after warm-up; the median is reported, with the ratio
to the original's median. Parameters are the folded model's parameters; MACs come from
``legofx.report.measure_macs`` (rewritten layers: the method's theory, for structured layers
the sum-pool's additions counted as MACs; the rest: ``FlopCounterMode``). The folded models are
checked against their training forms. Results go to ``benchmarks/results/structured_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

import legofx
from legofx.report import measure_macs
from legofx.core.timing import interleaved_times

RESULTS = Path(__file__).parent / "results" / "structured_speed.json"
STRUCTURE_N = {"resnet18": 2, "mobilenet_v2": 1}


def dense_macs(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def variants(name: str, x: torch.Tensor) -> dict[str, dict]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    n = STRUCTURE_N[name]
    out = {"original": {"model": model, "setting": "-", "macs": dense_macs(model, x),
                        "rewritten": 0, "fold_error": 0.0}}
    for label, setting, gm in (
        ("structured", f"c=0.5 n={n}", legofx.structure(model, c=0.5, n=n, init="random")),
        ("lego", "o=2 m=0.5", legofx.transform(model, o=2, m=0.5)),
    ):
        gm = gm.eval()
        for strategy in (None, "auto"):
            folded = legofx.fold(gm, strategy, example_inputs=x)
            with torch.no_grad():
                reference, result = gm(x), folded(x)
            error = ((result - reference).norm() / reference.norm()).item()
            records = [r for r in legofx.summary(folded) if r.rewritten]
            out[label + (" auto" if strategy else "")] = {
                "model": folded, "setting": setting, "macs": measure_macs(folded, x)[2],
                "rewritten": len(records), "fold_error": error,
                "dense_layers": sum(r.lowering.startswith("dense") for r in records)}
    for entry in out.values():
        entry["params"] = sum(p.numel() for p in entry["model"].parameters())
    return out


def training_steps(name: str) -> dict[str, dict]:
    """One training step of the original and of each training form, as callables of ``x``."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    n = STRUCTURE_N[name]
    forms = {"original": (model, "-"),
             "structured": (legofx.structure(model, c=0.5, n=n, init="random"), f"c=0.5 n={n}"),
             "lego": (legofx.transform(model, o=2, m=0.5), "o=2 m=0.5")}
    out = {}
    for label, (form, setting) in forms.items():
        form.train()

        def step(x, form=form):
            form.zero_grad(set_to_none=True)
            with torch.enable_grad():
                form(x).square().mean().backward()

        out[label] = {"model": step, "setting": setting,
                      "params": sum(p.numel() for p in form.parameters())}
    return out


def main_train_step(args) -> None:
    rows, results = [], []
    for name in args.models:
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224)
            entries = training_steps(name)
            times = interleaved_times({k: e["model"] for k, e in entries.items()}, x,
                                      rounds=args.reps, warmup=args.warmup)
            base = statistics.median(times["original"])
            for label, entry in entries.items():
                median = statistics.median(times[label])
                results.append({"model": name, "batch": batch, "variant": label,
                                "setting": entry["setting"], "median_ms": median * 1e3,
                                "times_ms": [t * 1e3 for t in times[label]],
                                "ratio_vs_original": median / base})
                rows.append([name, batch, label, entry["setting"], f"{median * 1e3:.1f}",
                             f"{median / base:.2f}x"])
    print(tabulate(rows, ["model", "batch", "training step", "setting", "median ms",
                          "vs original"], tablefmt="github"))
    meta = {"torch": torch.__version__, "threads": args.threads, "reps": args.reps,
            "warmup": args.warmup, "machine": platform.machine(), "processor": platform.processor(),
            "input": "Bx3x224x224 float32, train mode, forward + backward, CPU eager",
            "load_average": os.getloadavg()}
    out = args.out if args.out != RESULTS else RESULTS.with_name("structured_train_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nsaved {out} (load average {meta['load_average'][0]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(STRUCTURE_N))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--train-step", action="store_true",
                        help="time one training step (forward + backward) of the training forms")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.train_step:
        if args.batches == [1, 8]:
            args.batches = [2]
        return main_train_step(args)
    rows, results = [], []
    for name in args.models:
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224)
            entries = variants(name, x)
            models = {label: entry["model"] for label, entry in entries.items()}
            times = interleaved_times(models, x, rounds=args.reps, warmup=args.warmup)
            base = statistics.median(times["original"])
            for label, entry in entries.items():
                median = statistics.median(times[label])
                result = {key: value for key, value in entry.items() if key != "model"}
                result.update(model=name, batch=batch, variant=label, median_ms=median * 1e3,
                              times_ms=[t * 1e3 for t in times[label]],
                              ratio_vs_original=median / base)
                results.append(result)
                rows.append([name, batch, label, entry["setting"], entry["rewritten"],
                             f"{entry['params'] / 1e6:.2f}M", f"{entry['macs'] / 1e9:.3f}G",
                             f"{median * 1e3:.1f}", f"{median / base:.2f}x",
                             f"{entry['fold_error']:.1e}"])
            print(tabulate(rows[-len(entries):], tablefmt="plain"), flush=True)
    headers = ["model", "batch", "variant", "setting", "rewritten", "params", "MACs",
               "median ms", "latency vs original", "fold error"]
    print()
    print(tabulate(rows, headers, tablefmt="github"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "reps": args.reps,
            "warmup": args.warmup, "machine": platform.machine(), "processor": platform.processor(),
            "input": "Bx3x224x224 float32, eval mode, CPU eager"}
    meta["load_average"] = os.getloadavg()  # other processes skew latencies: check this
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nsaved {args.out} (load average {meta['load_average'][0]:.1f})")


if __name__ == "__main__":
    main()
