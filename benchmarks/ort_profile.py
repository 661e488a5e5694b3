"""Where ONNX Runtime spends a Lego model's time: ops in the optimized graph, time per op type.

    python benchmarks/ort_profile.py [--model resnet50] [--batch 8] [--runs 4]

The original and the Lego model (o=2, m=0.5) folded ``gather`` and ``by_macs(gm, "grouped")``
(BatchNorms folded in) are exported; each ONNX Runtime CPU session writes its optimized graph
(node counts per op type: ``ReorderInput`` / ``ReorderOutput`` are the NCHWc layout changes) and
a profile (``SessionOptions.enable_profiling``) of ``--runs`` runs, summed per op type.
Results: ``results/ort_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import legofx
from legofx.lowering.by_macs import by_macs

sys.path.insert(0, str(Path(__file__).parent))
from ort_forms import SIZES, build  # noqa: E402


def profile(path: Path, x: torch.Tensor, runs: int, folder: Path) -> dict:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)  # warm-up, profiled too: left out below
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    start = runs_seen[1]["ts"] if len(runs_seen) > 1 else 0
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    nodes = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    total = sum(per_op.values())
    return {"ms_per_run": total, "share": {op: ms / total for op, ms in per_op.most_common()},
            "optimized_nodes": dict(nodes), "file_mb": path.stat().st_size / 1e6}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ort_profile.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = build(args.model)
    x = torch.randn(args.batch, 3, SIZES[args.model], SIZES[args.model])
    gm = legofx.transform(original, o=2, m=0.5).eval()
    models = {"original": original, "gather": legofx.fold(gm, "gather", fuse_batchnorm=True),
              "grouped by MACs": legofx.fold(gm, by_macs(gm, "grouped"), fuse_batchnorm=True)}
    result = {"model": args.model, "batch": args.batch, "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    with tempfile.TemporaryDirectory() as folder:
        for key, model in models.items():
            path = Path(folder) / f"{key.replace(' ', '_')}.onnx"
            legofx.export(model, x, path, check=None, dynamic_batch=False)
            result[key] = profile(path, x, args.runs, Path(folder))
            shares = ", ".join(f"{op} {s:.1%}" for op, s in list(result[key]["share"].items())[:8])
            print(f"{key}: {result[key]['ms_per_run']:.1f} ms/run; {shares}; nodes "
                  f"{result[key]['optimized_nodes']}", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
