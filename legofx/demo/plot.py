"""The demo's picture: part 1's accuracy and size, part 2's speed-up of Lego over the fastest
original on every backend and batch, with the MAC theory marked."""

from __future__ import annotations

from pathlib import Path

from legofx.core.files import write_atomically

DIGITS = (("dense", "dense CNN"), ("scratch", "Lego, from scratch"), ("tuned", "Lego, init='weights'\n+ fine-tune"))


def accuracy_panel(axes, digits: dict) -> None:
    """Horizontal bars: each digits model's test accuracy, its conv parameters in the label."""
    labels = [f"{label}\n{digits[key]['conv_params'] / 1e3:.1f}k conv params" for key, label in DIGITS]
    values = [100 * digits[key]["accuracy"] for key, _ in DIGITS]
    bars = axes.barh(labels, values, color=["0.55", "tab:blue", "tab:green"])
    low = min(90.0, min(values) - 2.0)  # a narrow range would blow tenths up
    for bar, value in zip(bars, values):
        inside = value - low > 0.25 * (100 - low)  # room for the number inside the bar
        axes.text(value - 0.2 if inside else value + 0.2, bar.get_y() + bar.get_height() / 2,
                  f"{value:.2f}%", ha="right" if inside else "left", va="center",
                  color="white" if inside else "black", fontsize=9, fontweight="bold")
    axes.set_xlim(low, 100)
    axes.invert_yaxis()
    axes.set(xlabel="test accuracy (%), 360 images", title="part 1, digits (real data): accuracy")
    axes.grid(axis="x", alpha=0.3)


def speedup_panel(axes, realistic: dict) -> None:
    """Grouped bars per backend, one per batch: Lego's speed-up over the fastest original; a
    dash at the MAC theory; rows whose Lego graph is the original's are marked, not drawn."""
    rows = realistic["latency"]
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    batches = sorted({row["batch"] for row in rows})
    width = 0.8 / max(1, len(batches))
    same = False
    for j, batch in enumerate(batches):
        for i, backend in enumerate(backends):
            row = next((r for r in rows if r["backend"] == backend and r["batch"] == batch), None)
            if row is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            axes.hlines(row["theory"], x - width / 2, x + width / 2, colors="black", linewidth=2, zorder=3,
                        label="MAC theory" if i == j == 0 else None)
            if row["same_graph"]:
                same = True
                axes.text(x, 0.05, "same graph\nas original", ha="center", fontsize=7, rotation=90)
                continue
            axes.bar(x, row["speedup"], width * 0.9, color=f"C{j}", label=f"batch {batch}" if i == 0 else None)
            axes.text(x, row["speedup"] + 0.03, f"{row['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    axes.axhline(1.0, color="0.4", linewidth=1, linestyle=":")
    top = max([r["theory"] for r in rows] + [r["speedup"] for r in rows] + [1.0])
    axes.set_ylim(0, top * 1.25)
    axes.set_xticks(range(len(backends)), [b.replace("onnxruntime", "ONNX Runtime") for b in backends],
                    fontsize=9)
    axes.set(ylabel="speed-up: fastest original ms / Lego ms",
             title=f"part 2, {realistic['model']} {realistic['setup']['size']}px: Lego vs fastest original")
    axes.legend(loc="upper center", ncol=len(batches) + 1, fontsize=8, frameon=False)
    axes.grid(axis="y", alpha=0.3)
    if same:
        axes.set_xlabel("'same graph': the Lego model kept every layer dense (the original's graph), "
                        "no speed-up to show", fontsize=8)


def save_figure(digits: dict, realistic: dict, path: Path | str) -> Path:
    """Two panels, written to ``path`` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the demo's picture needs matplotlib: pip install 'legofx[dev]'") from None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.5]})
    accuracy_panel(left, digits)
    if realistic["latency"]:
        speedup_panel(right, realistic)
    else:
        right.set_axis_off()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return write_atomically(path, buffer.getvalue())
