"""Model-zoo sweep: legofx.transform / fold on every torchvision model and one model per timm family.

    python benchmarks/zoo.py                       # everything (hours on 2 cores)
    python benchmarks/zoo.py --suite torchvision   # or --suite timm
    python benchmarks/zoo.py --models torchvision:resnet18 timm:vgg11
    python benchmarks/zoo.py --report              # re-print the summary of saved results

Per model, in a fresh subprocess (a crash or hang costs one model, not the sweep): build it
with random weights; ``transform(o=2, m=0.5)``; a train-mode forward + backward (detection
models get synthetic targets); an eval forward; ``fold``; the relative error of fold vs the
training form; ``torch.export`` of the folded model; eligible / rewritten conv counts; the
times of transform and fold; the process's peak resident memory. Results are appended to
``benchmarks/results/zoo.jsonl`` (a rerun skips models already there unless ``--fresh``),
and written as CSV/JSON with a ``tabulate`` summary: totals, failures grouped by cause.

A model passes when >= 90% of its eligible convs are rewritten (eligible: ``groups == 1``,
``in_channels % o == 0``, called by the forward), every output is finite, and the relative
fold error is < 1e-3 (float32). Inputs: each model's default size, except where noted in
``INPUT_NOTES`` (detection at 320 px, segmentation at 224 px, optical flow at 128 px).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import re
import resource
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

import legofx
from legofx.core.numerics import relative_error
from legofx.report import reason_kind

RESULTS = Path(__file__).parent / "results"
FOLD_TOLERANCE = 1e-3
MIN_COVERAGE = 0.9
INPUT_NOTES = {
    "detection": "2 images of 3x320x320 (min_size=max_size=320 for the R-CNNs, RetinaNet, FCOS)",
    "segmentation": "2x3x224x224 (default 520 is slow on 2 cores)",
    "optical_flow": "2 image pairs of 3x128x128",
    "video": "1x3x16x112x112 (MViT, Swin3D and S3D: 1x3x16x224x224)",
}


@dataclass
class Result:
    model: str
    family: str = ""
    input: str = ""
    eligible: int = 0
    rewritten: int = 0
    convs: int = 0
    where: str = ""
    untraced: int = 0
    transform_s: float = math.nan
    fold_s: float = math.nan
    train_ok: bool = False
    fold_error: float = math.nan
    compared: str = "output"
    export: str = "not run"
    export_s: float = math.nan
    peak_rss_mb: float = math.nan
    passed: bool = False
    failure: str = ""
    wall_s: float = math.nan
    skipped_reasons: dict = field(default_factory=dict)


# ---- model catalogue --------------------------------------------------------------------------

def torchvision_models() -> list[str]:
    import torchvision.models as tvm

    quantized = set(tvm.list_models(module=tvm.quantization))
    return [f"torchvision:{n}" for n in sorted(tvm.list_models()) if n not in quantized]


SIZE_WORDS = {"tiny", "small", "base", "large", "huge", "giant", "gigantic", "medium", "nano",
              "pico", "femto", "atto", "zepto", "micro", "mini", "xxs", "xs", "s", "m", "l", "xl",
              "xxl", "t", "b", "h", "g", "e", "n", "x", "lite", "light", "wide", "plus",
              "xtiny", "xxtiny", "xlarge", "xxlarge", "enormous"}


def timm_family(name: str) -> str:
    """The model name up to its first size/variant token: ``tf_efficientnet_b0`` ->
    ``tf_efficientnet``, ``resnet50d`` -> ``resnet``, ``vit_base_patch16_224`` -> ``vit``."""
    tokens = name.split("_")
    stem = [re.sub(r"(?<=[a-z])\d+[a-z]?$", "", tokens[0]) or tokens[0]]
    for token in tokens[1:]:
        if not token.isalpha() or token in SIZE_WORDS:
            break
        stem.append(token)
    return "_".join(stem)


def timm_models(cache: Path = RESULTS / "timm_families.json") -> list[str]:
    """One model per timm family (timm's own ``test_*`` models excluded): the one with the
    fewest parameters, counted on the ``meta`` device. Cached, so the list is stable."""
    import timm

    if cache.exists():
        chosen = json.loads(cache.read_text())
        if chosen.get("timm") == timm.__version__:
            return [f"timm:{n}" for n in chosen["models"].values()]
    families: dict[str, list[tuple[float, str]]] = {}
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:
            size = math.inf
        families.setdefault(timm_family(name), []).append((size, name))
    models = {fam: min(entries)[1] for fam, entries in sorted(families.items())}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"timm": timm.__version__, "models": models}, indent=1))
    return [f"timm:{n}" for n in models.values()]


# ---- one model --------------------------------------------------------------------------------

def _images(batch: int, size: int) -> list[torch.Tensor]:
    return [torch.rand(3, size, size) for _ in range(batch)]


def _targets(batch: int, size: int, name: str) -> list[dict]:
    targets = []
    for _ in range(batch):
        boxes = torch.tensor([[10.0, 20.0, 120.0, 160.0], [60.0, 40.0, 200.0, 210.0]])
        labels = [1, 1] if "keypointrcnn" in name else [1, 2]  # keypointrcnn: 2 classes
        target = {"boxes": boxes, "labels": torch.tensor(labels)}
        if "maskrcnn" in name:
            target["masks"] = torch.zeros(2, size, size, dtype=torch.uint8)
            target["masks"][:, 30:150, 30:150] = 1
        if "keypointrcnn" in name:
            target["keypoints"] = torch.rand(2, 17, 3) * 100
            target["keypoints"][..., 2] = 1
        targets.append(target)
    return targets


def build(spec: str):
    """``(model, eval_args, train_args, input description)`` for ``spec``, random weights."""
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        shape = (2, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
        x = torch.randn(shape)
        return model, (x,), (x,), "x".join(map(str, shape))
    import torchvision.models as tvm

    if name in tvm.list_models(module=tvm.detection):
        kwargs = {} if name.startswith("ssd") else {"min_size": 320, "max_size": 320}
        model = tvm.get_model(name, weights=None, weights_backbone=None, **kwargs)
        images = _images(2, 320)
        return model, (images,), (images, _targets(2, 320, name)), INPUT_NOTES["detection"]
    if name in tvm.list_models(module=tvm.optical_flow):
        model = tvm.get_model(name, weights=None)
        pair = (torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128))
        return model, pair, pair, INPUT_NOTES["optical_flow"]
    if name in tvm.list_models(module=tvm.video):
        model = tvm.get_model(name, weights=None)
        size = 224 if name.startswith(("mvit", "swin3d", "s3d")) else 112
        x = torch.randn(1, 3, 16, size, size)
        return model, (x,), (x,), f"1x3x16x{size}x{size}"
    if name in tvm.list_models(module=tvm.segmentation):
        model = tvm.get_model(name, weights=None, weights_backbone=None)
        x = torch.randn(2, 3, 224, 224)
        return model, (x,), (x,), INPUT_NOTES["segmentation"]
    model = tvm.get_model(name, weights=None)
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(2, 3, size, size)
    return model, (x,), (x,), f"2x3x{size}x{size}"


def tensors(value) -> list[torch.Tensor]:
    """Every floating-point tensor in a nested output (tensors, dicts, lists, namedtuples)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def flat_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """:func:`legofx.core.numerics.relative_error` over all outputs together."""
    return relative_error(torch.cat([t.detach().flatten() for t in actual]),
                          torch.cat([t.detach().flatten() for t in expected]))


def _child_outputs(model, args) -> list[torch.Tensor]:
    """Outputs of the root's direct children, for models whose final output is reshaped by
    data-dependent post-processing (detection: NMS may keep other boxes for tiny differences)."""
    outputs: list[torch.Tensor] = []
    handles = [child.register_forward_hook(lambda m, i, o: outputs.extend(tensors(o)))
               for _, child in model.named_children()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _coverage(records, o: int) -> tuple[int, int]:
    eligible = [r for r in records if r.rewritten or (
        r.groups == 1 and r.in_channels % o == 0 and r.kernel_size
        and not r.reason.startswith("never called"))]
    return len(eligible), sum(r.rewritten for r in records)


def run_model(spec: str, o: int = 2, m: float = 0.5, export: bool = True) -> Result:
    """Everything the sweep measures for one model, in this process."""
    start = time.perf_counter()
    result = Result(spec, family=timm_family(spec.partition(":")[2]) if spec.startswith("timm:") else "")
    stage = "build"
    try:
        torch.manual_seed(0)
        model, eval_args, train_args, result.input = build(spec)
        stage = "transform"
        t0 = time.perf_counter()
        gm = legofx.transform(model, o=o, m=m)
        result.transform_s = time.perf_counter() - t0
        records = legofx.summary(gm)
        result.convs = len(records)
        result.eligible, result.rewritten = _coverage(records, o)
        result.where = " ".join(f"{k}:{v}" for k, v in sorted(Counter(
            r.where for r in records if r.rewritten).items()))
        result.untraced = len(legofx.core.records.stored_meta(gm)["untraced"])
        result.skipped_reasons = dict(Counter(reason_kind(r.reason) for r in records if not r.rewritten))
        stage = "train step"
        gm.train()
        # squares: a mean of outputs is linear, and a train-mode BatchNorm before the head
        # (LeViT, EfficientViT-M) turns its gradient into exactly zero
        loss = sum(t.float().square().mean() for t in tensors(gm(*train_args)))
        loss.backward()
        flowing = {n for n, p in gm.named_parameters()
                   if p.grad is not None and p.grad.abs().sum() > 0}
        # gradients reach the Lego filters but not the selection: the straight-through
        # estimator is broken (a zero-initialised head, as in timm's Sequencer, reaches neither)
        if any(n.endswith(".lego") for n in flowing) and not any(
                n.endswith(".proxy") for n in flowing):
            raise RuntimeError("no Lego proxy received a gradient")
        if not torch.isfinite(loss):
            raise RuntimeError(f"train-mode loss is not finite ({loss.item()})")
        result.train_ok = True
        del loss
        stage = "eval forward"
        gm.zero_grad(set_to_none=True)
        gm.eval()
        with torch.no_grad():
            expected = tensors(gm(*eval_args))
        stage = "fold"
        t0 = time.perf_counter()
        folded = legofx.fold(gm)
        result.fold_s = time.perf_counter() - t0
        with torch.no_grad():
            actual = tensors(folded(*eval_args))
        if not all(torch.isfinite(t).all() for t in expected + actual):
            raise RuntimeError("eval outputs are not finite")
        if [t.shape for t in actual] != [t.shape for t in expected]:
            result.compared = "children"  # data-dependent post-processing
            actual, expected = _child_outputs(folded, eval_args), _child_outputs(gm, eval_args)
        result.fold_error = flat_relative_error(actual, expected)
        if export:
            stage = "export"
            t0 = time.perf_counter()
            try:
                torch.export.export(folded, tuple(eval_args), strict=False)
                result.export = "ok"
            except Exception as err:  # recorded, not part of the pass criterion
                result.export = legofx.fx.tracing.describe_failure(err)[:160]
            result.export_s = time.perf_counter() - t0
        coverage = result.rewritten / result.eligible if result.eligible else 1.0
        if coverage < MIN_COVERAGE:
            result.failure = f"coverage {result.rewritten}/{result.eligible} < {MIN_COVERAGE:.0%}"
        elif not result.fold_error < FOLD_TOLERANCE:
            result.failure = f"fold error {result.fold_error:.1e} >= {FOLD_TOLERANCE:g}"
        result.passed = not result.failure
    except Exception as err:  # one model's failure is a result, not a crash of the sweep
        result.failure = f"{stage}: {legofx.fx.tracing.describe_failure(err)}"
        result.skipped_reasons["traceback"] = traceback.format_exc(limit=-3)[-1500:]
    result.peak_rss_mb = _peak_rss_mb()
    result.wall_s = time.perf_counter() - start
    return result


# ---- the sweep --------------------------------------------------------------------------------

def _worker(spec: str, o: int, m: float, export: bool, queue) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)  # torch.export failures print whole graphs
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    warnings.simplefilter("ignore")
    queue.put(asdict(run_model(spec, o, m, export)))


def run_isolated(spec: str, o: int, m: float, export: bool, timeout: float) -> Result:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(spec, o, m, export, queue), daemon=True)
    process.start()
    try:
        return Result(**queue.get(timeout=timeout))
    except Exception:
        reason = (f"timed out after {timeout:.0f} s" if process.is_alive()
                  else f"worker died (exit code {process.exitcode}, out of memory or a crash)")
        return Result(spec, failure=reason)
    finally:
        process.kill()
        process.join()


def load(path: Path) -> dict[str, Result]:
    if not path.exists():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        data = json.loads(line)
        results[data["model"]] = Result(**data)
    return results


def failure_cause(result: Result) -> str:
    """A failure with its specifics blanked, to group models that fail the same way."""
    return reason_kind(re.sub(r"\(at [^)]*\)", "", result.failure)).strip()


def summary_table(results: list[Result]) -> str:
    lines = []
    for suite in ("torchvision", "timm"):
        group = [r for r in results if r.model.startswith(suite + ":")]
        if not group:
            continue
        passed = sum(r.passed for r in group)
        exported = sum(r.export == "ok" for r in group)
        eligible = sum(r.eligible for r in group)
        rewritten = sum(r.rewritten for r in group)
        slowest = max(group, key=lambda r: r.transform_s if r.transform_s == r.transform_s else -1)
        lines.append([suite, f"{passed}/{len(group)}", f"{rewritten}/{eligible}",
                      sum(r.untraced > 0 for r in group), f"{exported}/{len(group)}",
                      f"{slowest.model} {slowest.transform_s:.1f} s",
                      f"{max((r.fold_error for r in group if r.fold_error == r.fold_error), default=0):.1e}",
                      f"{max((r.peak_rss_mb for r in group if r.peak_rss_mb == r.peak_rss_mb), default=0):.0f}"])
    text = tabulate(lines, ["suite", "passed", "convs rewritten/eligible", "models with untraced parts",
                            "torch.export ok", "slowest transform", "worst fold error",
                            "peak RSS MB"], tablefmt="github")
    failures = [r for r in results if not r.passed]
    if failures:
        causes = Counter(failure_cause(r) for r in failures)
        rows = [[count, cause, ", ".join(r.model for r in failures if failure_cause(r) == cause)]
                for cause, count in causes.most_common()]
        text += "\n\nfailures by cause:\n" + tabulate(rows, ["models", "cause", "which"], tablefmt="github")
    export_failures = Counter(failure_cause(Result("", failure=r.export)) for r in results
                              if r.export not in ("ok", "not run"))
    if export_failures:
        text += "\n\ntorch.export failures (not part of the pass criterion), by cause:\n" + tabulate(
            [[n, cause] for cause, n in export_failures.most_common()], ["models", "cause"],
            tablefmt="github")
    return text


def write(results: list[Result], stem: Path) -> None:
    rows = [asdict(r) for r in results]
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    with stem.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["all", "torchvision", "timm"], default="all")
    parser.add_argument("--models", nargs="*", help="specs such as torchvision:resnet18 timm:vgg11")
    parser.add_argument("--o", type=int, default=2)
    parser.add_argument("--m", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per model")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="rerun models already in the results")
    parser.add_argument("--report", action="store_true", help="only summarise saved results")
    parser.add_argument("--results", type=Path, default=RESULTS / "zoo.jsonl")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    specs = args.models or (
        (torchvision_models() if args.suite in ("all", "torchvision") else [])
        + (timm_models() if args.suite in ("all", "timm") else []))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {} if args.fresh else load(args.results)
    if not args.report:
        todo = [s for s in specs if s not in done]
        with tqdm(todo, unit="model", dynamic_ncols=True) as bar:
            for spec in bar:
                bar.set_postfix_str(spec)
                result = run_isolated(spec, args.o, args.m, not args.no_export, args.timeout)
                done[spec] = result
                with args.results.open("a") as handle:
                    handle.write(json.dumps(asdict(result), default=str) + "\n")
                if not result.passed:
                    tqdm.write(f"FAIL {spec}: {result.failure}")
    results = [done[s] for s in specs if s in done]
    if not results:
        print("no results")
        return 1
    write(results, args.results.with_suffix(""))
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
