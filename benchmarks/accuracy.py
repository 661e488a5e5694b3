"""The LegoNet paper's Figure-2 study on scikit-learn's digits: accuracy vs parameters vs MACs.

    python benchmarks/accuracy.py                  # 18 Lego settings + the dense CNN
    python benchmarks/accuracy.py --epochs 10 --seeds 0 1

For m in {0.125, 0.25, 0.5}, o in {1, 2, 4}, with and without coefficients, the demo's CNN
(``legofx.demo.digits.cnn``) is transformed and trained from scratch with the demo's budget (the
selection is learned with the balance loss during the warm-up, then frozen); the dense CNN is
the reference. Test accuracy (360 images: one image is 0.28 points), conv parameters of the
inference form and network MACs per image are written to ``results/accuracy.json`` and shown
as a table and a plot (``results/accuracy.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import legofx
from legofx.demo import digits as demo

RESULTS = Path(__file__).parent / "results"
MS, OS = (0.125, 0.25, 0.5), (1, 2, 4)


def settings() -> list[dict]:
    dense = [{"name": "dense", "o": None, "m": None, "coefficients": None}]
    return dense + [{"name": f"o={o} m={m}" + ("" if coef else " no-coef"), "o": o, "m": m,
                     "coefficients": coef}
                    for coef in (True, False) for m in MS for o in OS]


def run_setting(setting: dict, budget: demo.Budget, seed: int, data) -> dict:
    torch.manual_seed(seed)
    model = demo.cnn()
    if setting["o"] is not None:
        model = legofx.transform(model, o=setting["o"], m=setting["m"],
                                 coefficients=setting["coefficients"])
    start = time.perf_counter()
    model = demo.train(model, data, budget, setting["name"], quiet=True, seed=seed)
    seconds = time.perf_counter() - start
    inference = legofx.fold(model) if setting["o"] is not None else model
    return {"accuracy": demo.accuracy(inference, data[2], data[3]),
            "conv_params": demo.conv_params(inference),
            "macs": demo.network_macs(model, data[2][:1]), "train_s": seconds}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers, colors = {1: "o", 2: "s", 4: "^"}, {0.125: "tab:red", 0.25: "tab:orange", 0.5: "tab:green"}
    for axis, key, label in ((axes[0], "conv_params", "conv parameters (inference form)"),
                             (axes[1], "macs", "MACs per image")):
        for row in rows:
            if row["o"] is None:
                axis.axhline(100 * row["accuracy"], color="black", linestyle="--", linewidth=1)
                axis.scatter(row[key], 100 * row["accuracy"], color="black", marker="*", s=120,
                             label="dense CNN", zorder=3)
                continue
            filled = row["coefficients"]
            axis.scatter(row[key], 100 * row["accuracy"], marker=markers[row["o"]], s=60,
                         facecolors=colors[row["m"]] if filled else "none",
                         edgecolors=colors[row["m"]], zorder=3,
                         label=f"o={row['o']} m={row['m']}" + ("" if filled else " no coef"))
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    figure.suptitle("LegoNet on digits (16x16): accuracy vs size and cost "
                    "(filled: with coefficients)")
    figure.tight_layout(rect=(0, 0, 0.83, 0.95))
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=demo.Budget().epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    budget = demo.Budget(epochs=args.epochs)
    data = demo.digits()
    rows = []
    jobs = [(s, seed) for s in settings() for seed in args.seeds]
    results: dict[str, list[dict]] = {}
    for setting, seed in tqdm(jobs, unit="run", dynamic_ncols=True):
        results.setdefault(setting["name"], []).append(run_setting(setting, budget, seed, data))
    for setting in settings():
        runs = results[setting["name"]]
        rows.append({**setting, "accuracy": statistics.mean(r["accuracy"] for r in runs),
                     "accuracy_runs": [r["accuracy"] for r in runs],
                     "conv_params": runs[0]["conv_params"], "macs": runs[0]["macs"],
                     "train_s": statistics.mean(r["train_s"] for r in runs)})
    dense = rows[0]
    table = [[r["name"], f"{100 * r['accuracy']:.2f}", f"{100 * (r['accuracy'] - dense['accuracy']):+.2f}",
              f"{r['conv_params']:,}", f"{dense['conv_params'] / r['conv_params']:.2f}x",
              f"{r['macs']:,}", f"{dense['macs'] / r['macs']:.2f}x", f"{r['train_s']:.0f}"]
             for r in rows]
    print(tabulate(table, ["setting", "accuracy %", "vs dense", "conv params", "smaller",
                           "MACs/image", "fewer", "train s"], tablefmt="github"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(
        {"epochs": args.epochs, "seeds": args.seeds, "rows": rows}, indent=1))
    plot(rows, args.out / "accuracy.png")
    print(f"\nwrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
