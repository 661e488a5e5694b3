"""legofx.core.timing: interleaved rounds, and waiting for an accelerator before reading the clock
(checked here with a tensor that reports a CUDA device and a recording synchronize, so the
test runs on machines without a GPU)."""

import torch

from legofx.core.timing import interleaved_times, synchronizer


class ReportsCuda(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:1``."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def on_fake_cuda() -> torch.Tensor:
    return torch.Tensor._make_subclass(ReportsCuda, torch.zeros(2))


def test_cpu_inputs_never_synchronize(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronizer((torch.zeros(2), [torch.ones(1)], {"a": 3}))()
    interleaved_times({"a": lambda x: x + 1}, torch.zeros(2), rounds=2)
    assert calls == []


def test_cuda_inputs_wait_for_their_own_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronizer(({"nested": [on_fake_cuda()]},))()
    assert calls == [torch.device("cuda", 1)]


def test_every_timed_call_ends_after_the_device_finished(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    models = {name: (lambda x, name=name: events.append(name)) for name in ("a", "b")}
    times = interleaved_times(models, on_fake_cuda(), rounds=3, warmup=1)
    assert events == ["a", "b", "sync"] + ["a", "sync", "b", "sync"] * 3
    assert {name: len(samples) for name, samples in times.items()} == {"a": 3, "b": 3}


def test_decide_confirms_a_clear_choice_and_bounds_a_tie():
    from legofx.core.timing import decide

    calls = []

    def clear(rounds):  # b always half of a: clear, confirmed on a second batch of rounds
        calls.append(rounds)
        return {"a": [2.0] * rounds, "b": [1.0] * rounds}

    decision = decide(clear, ["a", "b"], 5)
    assert (decision.best, decision.tie, decision.rounds, calls) == ("b", (), 10, [5, 5])

    calls.clear()

    def tied(rounds):  # within 1%: never told apart
        calls.append(rounds)
        return {"a": [1.0] * rounds, "b": [0.99] * rounds, "c": [3.0] * rounds}

    decision = decide(tied, ["c", "a"], 5, max_rounds=12)
    assert (decision.best, decision.tie, decision.rounds, calls) == ("a", ("a", "b"), 12, [5, 5, 2])
    assert "tie after 12 rounds" in decision.note()
