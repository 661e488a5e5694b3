"""fold's lowerings: every strategy computes the training form's function."""

import random
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx.methods.lego.lowerings.accumulate import AccumulateLegoConv2d
from legofx.methods.lego.lowerings.fused import FusedLegoConv2d
from legofx.methods.lego.layers import FoldedLegoConv2d
from legofx.methods.lego.lowerings.merge_conv import MergeConvLegoConv2d
from legofx.core.arguments import smallest_index_dtype
from legofx.lowering.dense import DenseFoldedConv2d
from legofx.testing import conv_cases, networks


def transformed(case, seed=0):
    gm = legofx.transform(nn.Sequential(case.conv), o=case.o, m=case.m)
    randomize_lego(gm, torch.Generator().manual_seed(seed))
    return gm.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data(), strategy=st.sampled_from(["gather", "accumulate", "merge-conv", "dense", "auto",
                                                 "fused"]),
       index_dtype=st.sampled_from([torch.int64, torch.int32, "smallest"]))
def test_every_lowering_equals_the_training_form(dtype, data, strategy, index_dtype):
    case = data.draw(conv_cases(dtype=dtype))
    gm = transformed(case)
    folded = legofx.fold(gm, strategy, example_inputs=case.x, index_dtype=index_dtype)
    layer = folded.get_submodule("0")
    kinds = {"gather": FoldedLegoConv2d, "accumulate": AccumulateLegoConv2d,
             "merge-conv": MergeConvLegoConv2d, "dense": DenseFoldedConv2d}
    if strategy == "fused":
        assert type(layer) is FusedLegoConv2d
    else:  # auto never picks a fused lowering
        assert type(layer) in ([kinds[strategy]] if strategy in kinds else kinds.values())
    assert torch.allclose(layer.weight, gm.get_submodule("0").reconstruct_weight(),
                          rtol=0, atol=tolerance(dtype))
    with torch.no_grad():
        assert relative_error(folded(case.x), gm(case.x)) <= tolerance(dtype)
        assert torch.equal(layer(case.x), folded(case.x))  # eager module == inlined graph
    assert legofx.summary(folded)[0].lowering == layer.lowering


@settings(max_examples=10)
@given(net_x=networks(data_dependent=False),
       strategy=st.sampled_from(["accumulate", "merge-conv", "dense", "auto", "fused"]))
def test_whole_networks_fold_under_every_strategy(net_x, strategy):
    net, x = net_x
    gm = legofx.transform(net, o=2, m=2).eval()
    folded = legofx.fold(gm, strategy, example_inputs=x)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float64)


@given(case=conv_cases(dtype=torch.float64))
def test_accumulate_survives_dead_code_elimination_and_trains_like_gather(case):
    """Its in-place adds return the tensor the graph uses next, so DCE keeps them; gradients
    through it equal those through the gather lowering (no tensor autograd needs is overwritten)."""
    gm = transformed(case)
    accumulate, gather = legofx.fold(gm, "accumulate"), legofx.fold(gm, "gather")
    accumulate.graph.eliminate_dead_code()
    accumulate.recompile()
    out, expected = accumulate(case.x), gather(case.x)
    assert relative_error(out, expected) <= tolerance(torch.float64)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(accumulate.named_parameters(), gather.parameters()):
        assert relative_error(p.grad, q.grad) <= tolerance(torch.float64), name


def test_dense_lowering_stores_the_dense_weight_and_summary_says_so():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4)
    folded = legofx.fold(gm, "dense")
    record, = legofx.summary(folded)
    assert record.lowering.startswith("dense") and record.params_after == 16 * 8 * 9 + 16
    assert legofx.summary(legofx.fold(gm))[0].params_after == 4 * 4 * 9 + 16 * 2 + 16
    assert legofx.summary(legofx.fold(gm, "merge-conv"))[0].params_after == 4 * 4 * 9 + 16 * 8 + 16
    assert not [n for n in folded.graph.nodes if n.target == "index_select"]


def test_auto_records_its_timings():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4)
    record, = legofx.summary(legofx.fold(gm, "auto", example_inputs=torch.randn(2, 8, 10, 10)))
    assert "[auto: gather" in record.lowering and "dense" in record.lowering


def test_auto_on_a_layer_called_several_times_keeps_each_call_s_input():
    """A shared head (torchvision's RPN head) runs one conv on every feature level; timing
    records the first input and must not feed it to the later calls."""

    class SharedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, levels):  # a list: stays eager, the conv is one module called twice
            return [self.conv(level) + level for level in levels]

    gm = legofx.transform(SharedHead(), o=2, m=4)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    levels = [x, x[..., ::2, ::2]]
    folded = legofx.fold(gm.double().eval(), "auto", example_inputs=(levels,))
    with torch.no_grad():
        ours, reference = folded(levels), gm(levels)
    assert [o.shape for o in ours] == [(1, 8, 8, 8), (1, 8, 4, 4)]
    for a, b in zip(ours, reference):
        assert relative_error(a, b) <= tolerance(torch.float64)


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_auto_times_the_lowerings_compiled_for_the_backend(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3))
    gm = legofx.transform(net, o=2, m=4)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    gm.train()
    x = torch.randn(2, 8, 10, 10)
    folded = legofx.fold(gm, "auto", example_inputs=x, backend=backend)
    records = [r for r in legofx.summary(folded) if r.rewritten]
    assert len(records) == 2
    for record in records:
        assert f"[auto on {backend}: gather" in record.lowering and "dense" in record.lowering
    assert all(m.training for m in folded.modules())  # timed in eval mode, flags restored
    with torch.no_grad():
        assert relative_error(folded.eval()(x), gm.eval()(x)) <= tolerance(torch.float32)


def test_smallest_index_dtype():
    assert smallest_index_dtype(255) == torch.uint8
    assert smallest_index_dtype(256) == torch.int16
    assert smallest_index_dtype(40000) == torch.int32
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4)
    folded = legofx.fold(gm, index_dtype="smallest")
    assert folded.get_submodule("0").index.dtype == torch.uint8


def test_bad_fold_arguments_name_themselves():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4)
    with pytest.raises(ValueError, match="strategy='fast'"):
        legofx.fold(gm, "fast")
    with pytest.raises(ValueError, match="example_inputs"):
        legofx.fold(gm, "auto")
    with pytest.raises(ValueError, match="backend='tvm'"):
        legofx.fold(gm, "auto", example_inputs=torch.randn(1, 8, 5, 5), backend="tvm")
    with pytest.raises(ValueError, match="backend='inductor'.*strategy='dense'"):
        legofx.fold(gm, "dense", backend="inductor")
    with pytest.raises(TypeError, match="index_dtype=torch.float16"):
        legofx.fold(gm, index_dtype=torch.float16)
    with pytest.raises(ValueError, match="index_dtype=torch.uint8 cannot hold index 511"):
        legofx.fold(legofx.transform(nn.Sequential(nn.Conv2d(8, 256, 1)), o=2, m=1.0),
                    index_dtype=torch.uint8)


@given(case=conv_cases(), strategy=st.sampled_from(["sum-pool", "dense", "auto"]))
def test_structured_lowerings_equal_the_training_form(case, strategy):
    gm = legofx.structure(nn.Sequential(case.conv), c=0.5, n=1, init="random").eval()
    folded = legofx.fold(gm, strategy, example_inputs=case.x)
    with torch.no_grad():
        assert relative_error(folded(case.x), gm(case.x)) <= tolerance(case.x.dtype)
    record, = legofx.summary(folded)
    if record.rewritten and strategy == "dense":
        assert isinstance(folded.get_submodule("0"), DenseFoldedConv2d)


def _timed_auto_fold(monkeypatch, layer_ms: dict | list, model_seconds: dict):
    """fold(auto) with made-up timings: every layer times ``layer_ms`` (or the first layer
    times ``layer_ms[0]``, the second ``layer_ms[1]``); the whole-model variants take
    ``model_seconds`` (key -> seconds per call)."""
    from legofx.lowering import auto

    per_layer = iter(layer_ms if isinstance(layer_ms, list) else [layer_ms] * 2)

    def choose_fastest(candidates, x, backend):
        times = next(per_layer)
        return auto.Decision(min(times, key=times.get), times, 7)

    monkeypatch.setattr(auto, "choose_fastest", choose_fastest)
    monkeypatch.setattr(auto, "interleaved_times", lambda models, *args, rounds, warmup: {
        key: [model_seconds[key]] * rounds for key in models})
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).double()
    gm = legofx.transform(net, o=2, m=4)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    folded = legofx.fold(gm.eval(), "auto", example_inputs=x)
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float64)
    return [r.lowering for r in legofx.summary(folded) if r.rewritten]


@pytest.mark.parametrize("seconds, kept", [
    ({"per layer": 0.004, "dense": 0.005}, "per layer"),  # faster on the whole model
    ({"per layer": 0.006, "dense": 0.005}, "dense"),  # each layer faster alone, not in context
    ({"per layer": 0.00495, "dense": 0.005}, "dense"),  # within 2%: noise, the original's graph
])
def test_auto_checks_its_choice_on_the_whole_model(monkeypatch, seconds, kept):
    lowerings = _timed_auto_fold(monkeypatch, {"gather": 1.0, "dense": 2.0, "accumulate": 3.0,
                                               "merge-conv": 3.0}, seconds)
    assert len(lowerings) == 2
    for lowering in lowerings:
        assert lowering.startswith("gather" if kept == "per layer" else "dense")
        assert f"kept {kept}]" in lowering and "whole model: dense" in lowering


def test_auto_tries_only_the_clear_per_layer_wins_as_well(monkeypatch):
    # gather alone at 0.9 of dense is no clear win (CLEAR_WIN = 0.8): "clear wins" = dense,
    # so only two variants are compared
    lowerings = _timed_auto_fold(monkeypatch, {"gather": 0.9, "dense": 1.0, "accumulate": 3.0,
                                               "merge-conv": 3.0}, {"per layer": 0.004, "dense": 0.005})
    assert all("clear wins" not in lowering and "kept per layer" in lowering for lowering in lowerings)
    lowerings = _timed_auto_fold(monkeypatch, {"gather": 0.5, "dense": 1.0, "accumulate": 3.0,
                                               "merge-conv": 3.0}, {"per layer": 0.004, "dense": 0.005})
    assert all("clear wins" not in lowering for lowering in lowerings)  # equal to per layer


def test_auto_tries_the_clear_wins_alone_when_they_differ(monkeypatch):
    # first layer: gather at 0.5 of dense (a clear win); second: at 0.9 (not one)
    times = [{"gather": 0.5, "dense": 1.0, "accumulate": 3.0, "merge-conv": 3.0},
             {"gather": 0.9, "dense": 1.0, "accumulate": 3.0, "merge-conv": 3.0}]
    first, second = _timed_auto_fold(monkeypatch, times, {"dense": 0.005, "per layer": 0.0045,
                                                          "clear wins": 0.004})
    assert "whole model: dense 5 ms, per layer 4.5 ms, clear wins 4 ms; kept clear wins]" in first
    assert first.startswith("gather") and second.startswith("dense")


def _noisy_timer(seconds: dict, spread: float, seed: int):
    """A stand-in for interleaved_times: each candidate's samples drawn around ``seconds[key]``
    (uniform, +-``spread`` of it), from a generator seeded with ``seed``; records the rounds."""
    generator = random.Random(seed)
    calls = []

    def timer(models, *args, rounds, warmup):
        calls.append(rounds)
        return {key: [seconds[key] * (1 + generator.uniform(-spread, spread)) for _ in range(rounds)]
                for key in models}

    return timer, calls


def _layer_and_input():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4).eval()
    return gm.get_submodule("0"), torch.randn(1, 8, 6, 6)


def test_auto_gives_the_same_choice_when_the_timings_overlap():
    """Noisy, overlapping timings: re-timed (bounded), then a tie resolved by the registry's
    order, the same whatever the noise; the tie is said in the layer's note."""
    from legofx.lowering import auto

    layer, x = _layer_and_input()
    offered = auto.lowerings(layer)
    candidates = {name: lowering.build(layer) for name, lowering in offered.items()
                  if not lowering.by_name_only}
    seconds = {name: 1e-3 for name in candidates}
    chosen = set()
    for seed in range(40):
        timer, calls = _noisy_timer(seconds, 0.2, seed)
        decision = auto.choose_fastest(candidates, x, timer=timer)
        chosen.add(decision.best)
        assert decision.tie and 7 < sum(calls) <= 4 * 7 and decision.rounds == sum(calls)
        assert "tie after" in decision.note()
    assert chosen == {next(iter(candidates))}  # the layer's default, first in the registry


def test_auto_picks_the_clearly_fastest_without_a_tie():
    from legofx.lowering import auto

    layer, x = _layer_and_input()
    candidates = {name: lowering.build(layer) for name, lowering in auto.lowerings(layer).items()
                  if not lowering.by_name_only}
    last = list(candidates)[-1]
    seconds = {name: 0.5e-3 if name == last else 1e-3 for name in candidates}
    for seed in range(20):
        timer, calls = _noisy_timer(seconds, 0.1, seed)
        decision = auto.choose_fastest(candidates, x, timer=timer)
        assert (decision.best, decision.tie, calls) == (last, (), [7, 7])  # confirmed once


def test_a_tie_is_written_in_the_folded_layers_lowering(monkeypatch):
    from legofx.lowering import auto

    timer, _ = _noisy_timer({"gather": 1e-3, "dense": 1e-3, "accumulate": 1e-3, "merge-conv": 1e-3},
                            0.2, 0)
    monkeypatch.setattr(auto, "interleaved_times", timer)
    gm = legofx.transform(nn.Sequential(nn.Conv2d(8, 16, 3)), o=2, m=4).eval()
    folded = legofx.fold(gm, "auto", example_inputs=torch.randn(1, 8, 6, 6))
    record, = [r for r in legofx.summary(folded) if r.rewritten]
    assert "tie after" in record.lowering and "first in the preference order" in record.lowering


@pytest.mark.parametrize("seed", range(10))
def test_the_whole_model_check_keeps_dense_when_the_variants_overlap(monkeypatch, seed):
    from legofx.lowering import auto

    timer, calls = _noisy_timer({"dense": 5e-3, "per layer": 4.95e-3}, 0.15, seed)
    monkeypatch.setattr(auto, "interleaved_times", timer)
    models = {"dense": nn.Identity(), "per layer": nn.Identity()}
    best, medians = auto.choose_fastest_model(models, (torch.zeros(1),), "eager")
    assert best == "dense" and "dense (tie after" in " ".join(medians) and sum(calls) > 9
