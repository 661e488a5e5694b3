"""The demo's picture: accuracy and latency against conv parameters, dense vs Lego."""

from __future__ import annotations

from pathlib import Path

from legofx.core.files import write_atomically

DIGITS = (("dense", "dense CNN"), ("scratch", "Lego, from scratch"), ("tuned", "Lego, init='weights'"))


def save_figure(digits: dict, realistic: dict, path: Path | str) -> Path:
    """Two panels, written to ``path`` (PNG): the digits models' test accuracy vs their conv
    parameters, and the realistic model's latency at the largest batch vs its parameters,
    original -> Lego, one line per backend, with the measured speed-up and the MAC theory."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the demo's picture needs matplotlib: pip install 'legofx[dev]'") from None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in DIGITS:
        row = digits[key]
        left.scatter(row["conv_params"] / 1e3, 100 * row["accuracy"], s=60, label=label,
                     marker="s" if key == "dense" else "o")
    left.set(xlabel="conv parameters (thousands)", ylabel="test accuracy (%)",
             title="digits (real data): accuracy vs size")
    lowest = min(100 * digits[key]["accuracy"] for key, _ in DIGITS)
    left.set_ylim(min(90.0, lowest - 1.0), 100.5)  # a narrow range would blow tenths up
    left.legend(loc="lower right")
    left.grid(alpha=0.3)

    size, batch = realistic["size"], max(realistic["setup"]["batches"])
    params = [size["original"]["params"] / 1e6, size["lego"]["params"] / 1e6]
    for row in (r for r in realistic["latency"] if r["batch"] == batch and r["baseline"] == "original"):
        line, = right.plot(params, [row["original_ms"], row["lego_ms"]], marker="o", label=row["backend"])
        right.annotate(f"{row['speedup']:.2f}x (theory {row['theory']:.2f}x)",
                       (params[1], row["lego_ms"]), textcoords="offset points", xytext=(0, 7),
                       fontsize=8, color=line.get_color())
    right.set(xlabel="parameters (millions): original (right), Lego (left)",
              ylabel="latency (ms)",
              title=f"{realistic['model']}, batch {batch}, {realistic['setup']['size']}px: latency vs size")
    right.set_xlim(0, params[0] * 1.1)
    right.set_ylim(bottom=0)
    right.legend(loc="lower right")
    right.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return write_atomically(path, buffer.getvalue())
