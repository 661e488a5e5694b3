"""Interleaved timing, the one way legofx measures latency (``fold(strategy="auto")``, the
demo and the benchmarks): after a warm-up, every round runs every candidate once, in turn, so
that load changes on the machine hit all candidates alike; compare medians."""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def interleaved_times(models: dict, *args, rounds: int = 7, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each of ``models`` (name -> callable) on ``args``, ``rounds`` each."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        for _ in range(warmup):
            model(*args)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(*args)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)
