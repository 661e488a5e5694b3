"""A/B of this checkout's legofx against other revisions, interleaved: ``speed.py --against REV``.

    python benchmarks/speed.py --against main~3 --models resnet18 --backends inductor --rounds 15
    python benchmarks/speed.py --against /path/to/checkout --variants original "lego fused"
    python benchmarks/speed.py --against 05c7f43 d106b7c   # three revisions taking turns

Two revisions of one package cannot be imported in one process, so each runs in a worker
process of its own (this file with ``--worker``, ``PYTHONPATH`` set to that revision's tree;
``REV`` is extracted with ``git archive`` into a temporary directory, or is a directory that
holds a checkout). Each worker builds the same models (random weights from seed 0), compiles
them for each backend and warms them up, then waits. Round after round the parent asks each
worker in turn (the order alternating) to run every variant once; while one runs the other
only waits on its input, so the two never share the cores (with more revisions, the order
rotates each round). Medians over the rounds, with
min-max, speed-up against the same revision's original and measured / MAC theory (the theory
computed once, here: it does not depend on the revision). Workers use only the public API
both sides have (``transform``, ``fold``, ``compile``) and report ``legofx.__file__``, which is
checked to lie in the tree asked for. Results: ``results/speed_against.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent  # this checkout


def build_models(name: str, variants: list[str], o: float, m: float) -> dict:
    """``original``, ``original, BN fused`` and ``lego <strategy>`` (fused with the model's
    BatchNorms folded in, as speed.py's ``lego fused``) with the legofx on ``sys.path``."""
    import legofx
    import torchvision
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None).eval()
    has_bn = any(isinstance(mod, torch.nn.BatchNorm2d) for mod in original.modules())
    gm = legofx.transform(original, o=o, m=m).eval()
    models = {}
    for variant in variants:
        if variant == "original":
            models[variant] = original
        elif variant == "original, BN fused":
            models[variant] = fuse(original).eval()
        elif variant.startswith("lego "):
            strategy = variant.removeprefix("lego ")
            models[variant] = legofx.fold(gm, strategy, fuse_batchnorm=strategy == "fused" and has_bn)
        else:
            raise SystemExit(f"--variants: unknown variant {variant!r}")
    return models


def worker(args) -> None:
    """Serve rounds on stdin: ``run`` times every (backend, variant) once, in turn, and prints
    their seconds as one JSON line; ``quit`` ends."""
    import legofx

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    models = build_models(args.model, args.variants, args.o, args.m)
    runs = {}
    with torch.no_grad():
        for backend in args.backends:
            for variant, model in models.items():
                runs[f"{backend}|{variant}"] = (model if backend == "eager" else
                                                legofx.compile(model, x, backend=backend))
        for run in runs.values():
            for _ in range(2):
                run(x)
        print(json.dumps({"ready": legofx.__file__}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            times = {}
            for key, run in runs.items():
                start = time.perf_counter()
                run(x)
                times[key] = time.perf_counter() - start
            print(json.dumps(times), flush=True)


def checkout(rev: str) -> tuple[Path, Path | None]:
    """The tree of ``rev`` (a directory, or a git revision extracted into a temporary one) and
    the temporary directory to remove afterwards."""
    if Path(rev).is_dir():
        return Path(rev).resolve(), None
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode:
        raise SystemExit(f"--against {rev}: neither a directory nor a git revision "
                         f"({commit.stderr.strip()})")
    tree = Path(tempfile.mkdtemp(prefix=f"legofx-against-{commit.stdout.strip()[:8]}-"))
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit.stdout.strip()],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise SystemExit(f"--against {rev}: git archive failed")
    return tree, tree


def revision_name(tree: Path) -> str:
    described = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                               capture_output=True, text=True)
    return described.stdout.strip() if described.returncode == 0 else tree.name


class Worker:
    def __init__(self, label: str, tree: Path, args, log: Path) -> None:
        self.label, self.tree, self.log = label, tree, log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, str(HERE), "--worker", "--model", args.model, "--batch",
                   str(args.batch), "--threads", str(args.threads), "--o", str(args.o), "--m",
                   str(args.m), "--backends", *args.backends, "--variants", *args.variants]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log.open("w"), text=True, env=env,
                                        cwd=tempfile.gettempdir())

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.label} stopped; its log: "
                             f"{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def ready(self) -> None:
        imported = Path(self.read()["ready"]).resolve()
        if self.tree not in imported.parents:
            raise SystemExit(f"the worker for {self.label} imported {imported}, not {self.tree}")

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait()


def theory(name: str, o: float, m: float, batch: int) -> float:
    """The network's MAC ratio original / Lego (conv + merge), with this checkout's legofx."""
    import legofx
    from legofx.report import measure_macs

    models = build_models(name, ["lego gather"], o, m)
    _, before, after = measure_macs(models["lego gather"], torch.randn(1, 3, 224, 224))
    return before / after


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def compare(args, rows: list[dict], model: str, batch: int) -> None:
    """One model: the workers started, warmed up, then ``args.rounds`` interleaved rounds."""
    trees = {revision_name(ROOT): ROOT, **args.trees}
    job = argparse.Namespace(**{**vars(args), "model": model, "batch": batch})
    logs = Path(tempfile.mkdtemp(prefix="legofx-against-logs-"))
    workers = [Worker(label, tree, job, logs / f"{i}.log") for i, (label, tree) in enumerate(trees.items())]
    try:
        for w in workers:
            w.ready()
        started = load()
        samples = {w.label: {} for w in workers}
        for r in range(args.rounds):
            turn = r % len(workers)  # each worker first in turn; with two, A B then B A
            for w in (workers[turn:] + workers[:turn]):
                for key, seconds in w.run().items():
                    samples[w.label].setdefault(key, []).append(seconds)
        ended = load()
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(logs, ignore_errors=True)
    mac_theory = theory(model, args.o, args.m, batch)
    for label, times in samples.items():
        for key, seconds in times.items():
            backend, variant = key.split("|")
            base = statistics.median(times[f"{backend}|original"]) if f"{backend}|original" in times else None
            median = statistics.median(seconds)
            rows.append({"model": model, "batch": batch, "backend": backend, "variant": variant,
                         "revision": label, "median_ms": 1000 * median,
                         "min_ms": 1000 * min(seconds), "max_ms": 1000 * max(seconds),
                         "speedup": None if base is None else base / median,
                         "theory": mac_theory,
                         "measured_over_theory": None if base is None or variant.startswith("original")
                         else base / median / mac_theory,
                         "rounds": args.rounds, "threads": args.threads,
                         "load_before": started, "load_after": ended})


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def fmt(value, pattern):
        return "" if value is None else pattern.format(value)

    ours = {(r["model"], r["backend"], r["variant"]): r["median_ms"] for r in rows
            if r["revision"] == rows[0]["revision"]}
    body = [[r["model"], r["batch"], r["backend"], r["variant"], r["revision"], f"{r['median_ms']:.1f}",
             f"{r['min_ms']:.1f}-{r['max_ms']:.1f}", fmt(r["speedup"], "{:.2f}x"),
             fmt(r["measured_over_theory"], "{:.2f}"),
             f"{r['median_ms'] / ours[(r['model'], r['backend'], r['variant'])]:.2f}",
             f"{r['load_before']} / {r['load_after']}"] for r in rows]
    return tabulate(body, ["model", "batch", "backend", "variant", "revision", "median ms",
                           "min-max ms", "speed-up", "meas./theory", "time / this checkout's",
                           "load before / after"], tablefmt="github", disable_numparse=True)


def against(args, models: list[str], batches: dict, out: Path) -> list[dict]:
    """``speed.py --against``: every model of ``models`` A/B'd, the table printed, the rows saved."""
    args.trees, temporary = {}, []
    rows = []
    try:
        for rev in args.against:
            args.trees[rev], scratch = checkout(rev)
            temporary += [scratch] if scratch else []
        for model in models:
            compare(args, rows, model, batches.get(model, 8))
            print(table([r for r in rows if r["model"] == model]), flush=True)
    finally:
        for scratch in temporary:
            shutil.rmtree(scratch, ignore_errors=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
            "against": args.against, "this_checkout": revision_name(ROOT)}
    (out / "speed_against.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--o", type=int)
    parser.add_argument("--m", type=float)
    parser.add_argument("--backends", nargs="+")
    parser.add_argument("--variants", nargs="+")
    worker(parser.parse_args(argv))


if __name__ == "__main__":
    worker_main(sys.argv[1:])
