"""Interleaved timing, the one way legofx measures latency (``fold(strategy="auto")``, the
demo and the benchmarks): after a warm-up, every round runs every candidate once, in turn, so
that load changes on the machine hit all candidates alike; compare medians. :func:`decide` turns the rounds into a choice it can stand by: candidates
that cannot be told apart are timed again (bounded), and a lasting tie is resolved by a fixed
preference order, so the same machine gives the same choice run after run.

Work on an accelerator runs asynchronously: when any argument is a CUDA (or XPU, MPS) tensor,
the clock is read only after that device has finished (``torch.cuda.synchronize`` ...), so a
timing is the run itself, not the time to queue it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
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


def quartiles(samples: list[float]) -> tuple[float, float]:
    """The lower and upper quartile of ``samples`` (both the sample itself when only one)."""
    if len(samples) < 2:
        return samples[0], samples[0]
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return low, high


def relative_spread(samples: list[float]) -> float:
    """How much ``samples`` vary: their interquartile range over their median."""
    low, high = quartiles(samples)
    return (high - low) / statistics.median(samples)


@dataclass
class Decision:
    """Which of several timed candidates is fastest, and how sure: ``tie`` names the
    candidates that could not be told apart from the fastest (empty when the choice is clear),
    ``best`` is then the first of those in the preference order."""

    best: str
    medians: dict[str, float]  # ms
    rounds: int
    tie: tuple[str, ...] = ()

    def note(self) -> str:
        """A few words for a report: empty when the choice was clear."""
        if not self.tie:
            return ""
        return (f"tie after {self.rounds} rounds ({', '.join(self.tie)} within each other's "
                f"spread): kept {self.best}, first in the preference order")


def indistinct(samples: dict[str, list[float]], margin: float) -> tuple[str, tuple[str, ...]]:
    """The fastest of ``samples`` by median, and every candidate (the fastest included, in
    ``samples``' order) it cannot be told apart from: the fastest's median is within ``margin``
    (a fraction) of theirs, or their interquartile ranges overlap; only the fastest when clear."""
    medians = {key: statistics.median(values) for key, values in samples.items()}
    fastest = min(medians, key=medians.get)
    upper = quartiles(samples[fastest])[1]
    close = [key for key, values in samples.items()
             if key == fastest or medians[fastest] >= (1 - margin) * medians[key]
             or upper >= quartiles(values)[0]]
    return fastest, tuple(close)


def decide(timer: Callable[[int], dict[str, list[float]]], preference: list[str], rounds: int,
           margin: float = 0.03, max_rounds: int | None = None) -> Decision:
    """The fastest candidate, with confidence: ``timer(rounds)`` times every candidate
    ``rounds`` times (seconds, as :func:`interleaved_times`), twice at least; a choice is clear
    when, on all rounds so far, the fastest stands apart from every other (:func:`indistinct`).
    Until then it is timed again, ``rounds`` at a time, up to ``max_rounds`` in all (default
    ``4 * rounds``); still undecided, it is a tie, resolved deterministically: the first of the
    tied candidates in ``preference`` (names not in it come last, in their order)."""
    max_rounds = max(max_rounds or 4 * rounds, 2 * rounds)
    samples = timer(rounds)
    while True:
        done = len(next(iter(samples.values())))
        fastest, close = indistinct(samples, margin)
        if (len(close) == 1 and done >= 2 * rounds) or done >= max_rounds:
            break
        for key, values in timer(min(rounds, max_rounds - done)).items():
            samples[key].extend(values)
    medians = {key: median_ms(values) for key, values in samples.items()}
    if len(close) == 1:
        return Decision(fastest, medians, done)
    order = [key for key in preference if key in close] + [key for key in close if key not in preference]
    return Decision(order[0], medians, done, tuple(order))
