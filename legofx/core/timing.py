"""Interleaved timing, the one way legofx measures latency (``fold(strategy="auto")``, the
demo and the benchmarks): after a warm-up, every round runs every candidate once, in turn, so
that load changes on the machine hit all candidates alike; compare medians.

Work on an accelerator runs asynchronously: when any argument is a CUDA (or XPU, MPS) tensor,
the clock is read only after that device has finished (``torch.cuda.synchronize`` ...), so a
timing is the run itself, not the time to queue it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from legofx.core.arguments import nested_tensors


def synchronizer(args) -> Callable[[], None]:
    """What waits for the accelerators holding tensors of ``args`` (nested lists, tuples and
    dicts included) to finish their queued work; on CPU it does nothing."""
    devices = {tensor.device for tensor in nested_tensors(args)}
    accelerators = sorted((d for d in devices if d.type in ("cuda", "xpu", "mps")), key=str)

    def wait() -> None:
        for device in accelerators:
            if device.type == "mps":
                torch.mps.synchronize()
            else:  # the tensor's own device, which need not be the current one
                getattr(torch, device.type).synchronize(device)

    return wait


@torch.no_grad()
def interleaved_times(models: dict, *args, rounds: int = 7, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each of ``models`` (name -> callable) on ``args``, ``rounds`` each."""
    sync = synchronizer(args)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        for _ in range(warmup):
            model(*args)
    sync()
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(*args)
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)
