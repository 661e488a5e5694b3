"""Misuse and odd inputs get a correct result or a clear error: tied weights, unbatched inputs,
a checkpoint of other settings, a user's own top-level ``passes`` module, and random small
models through transform -> fold -> forward."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx.lowering.registry import LoweringUnavailable

LEGO_STRATEGIES = [None, "accumulate", "merge-conv", "dense", "fused"]


class Tied(nn.Module):
    """Two convs sharing one weight Parameter (different biases), and an untied one."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(4, 8, 3)

    def forward(self, x):
        return self.c(self.b(self.a(x)).relu())


@pytest.mark.parametrize("method", ["lego", "structured"])
def test_tied_weights_are_kept_tied_with_the_reason(method):
    gm = (legofx.transform(Tied(), o=2, m=2) if method == "lego"
          else legofx.structure(Tied(), c=0.5, n=2))
    records = {r.name: r for r in legofx.summary(gm)}
    assert records["a"].reason.startswith("weight shared with b (tied weights)")
    assert records["b"].reason.startswith("weight shared with a (tied weights)")
    assert records["c"].rewritten
    assert gm.get_submodule("a").weight is gm.get_submodule("b").weight
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(torch.randn(2, 4, 6, 6)).square().mean().backward()
    optimizer.step()
    assert gm.get_submodule("a").weight is gm.get_submodule("b").weight  # still one weight


def _batch_of_one_and_unbatched(model, x):
    with torch.no_grad():
        return model(x.unsqueeze(0)).squeeze(0), model(x)


@pytest.mark.parametrize("o", [1, 2])
@pytest.mark.parametrize("strategy", ["training form", *LEGO_STRATEGIES])
def test_unbatched_input_gives_the_batch_of_one_result_in_every_lego_form(o, strategy):
    """(C, H, W) in, (n, H', W') out, as nn.Conv2d; float64, so the forms agree to rounding."""
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").double()
    gm = legofx.transform(nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 8, 1)).double(), o=o, m=2).eval()
    randomize_lego(gm, torch.Generator().manual_seed(o))
    model = gm if strategy == "training form" else legofx.fold(gm, strategy)
    x = torch.randn(4, 7, 9, dtype=torch.float64)
    expected, got = _batch_of_one_and_unbatched(model, x)
    assert got.shape == (8, 7, 9)
    assert relative_error(got, expected) <= tolerance(torch.float64)


@pytest.mark.parametrize("strategy", ["training form", None, "dense"])
def test_unbatched_input_gives_the_batch_of_one_result_in_every_structured_form(strategy):
    sm = legofx.structure(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)).double(), c=0.5, n=2).eval()
    model = sm if strategy == "training form" else legofx.fold(sm, strategy)
    x = torch.randn(4, 7, 9, dtype=torch.float64)
    expected, got = _batch_of_one_and_unbatched(model, x)
    assert got.shape == (6, 7, 9)
    assert relative_error(got, expected) <= tolerance(torch.float64)


@pytest.mark.parametrize("form", ["training", "folded"])
def test_a_checkpoint_of_other_settings_names_its_o_and_m(form):
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    source, target = legofx.transform(model, o=2, m=4).eval(), legofx.transform(model, o=4, m=8).eval()
    if form == "folded":
        source, target = legofx.fold(source), legofx.fold(target)
    with pytest.raises(RuntimeError, match=r"0: the checkpoint's Lego layer was made with o=2, m=4 "
                                           r".*this one has o=4, m=8"):
        target.load_state_dict(source.state_dict())


def test_a_users_own_top_level_passes_module_does_not_break_legofx(tmp_path):
    (tmp_path / "passes.py").write_text("module_uses = None  # the user's own 'passes'\n")
    script = textwrap.dedent("""
        import sys, torch
        from torch import nn
        import passes, legofx
        assert passes.module_uses is None  # the user's module stays theirs
        gm = legofx.transform(nn.Sequential(nn.Conv2d(4, 8, 3)), o=2, m=4)
        print(type(legofx.fold(gm.eval())(torch.randn(1, 4, 6, 6))).__name__)
    """)
    worktree = os.path.dirname(os.path.dirname(os.path.abspath(legofx.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), worktree])}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "Tensor", run.stderr[-2000:]


# --- random small models through transform -> fold -> forward -------------------------------

LEGOFX_ERRORS = (ValueError, TypeError, LoweringUnavailable)


@st.composite
def conv_models(draw):
    """1-3 convs in a row with random channels, kernel, stride, dilation, groups, padding and
    padding mode, bias, maybe the last sharing the first's weight; an input batched or not."""
    layers, channels = [], draw(st.sampled_from([2, 4, 6]))
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([2, 4, 6]))
        kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        stride = draw(st.integers(1, 2))
        padding = draw(st.sampled_from(["int", "same", "valid"] if stride == 1 else ["int", "valid"]))
        padding = draw(st.integers(0, 2)) if padding == "int" else padding
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups,
                                draw(st.booleans()), mode, dtype=torch.float64))
        channels = out
    if len(layers) > 1 and draw(st.booleans()):  # tie the last conv's weight to a twin's
        twin = next((c for c in layers[:-1] if c.weight.shape == layers[-1].weight.shape), None)
        if twin is not None:
            layers[-1].weight = twin.weight
    size = draw(st.integers(9, 12))
    shape = (layers[0].in_channels, size, size)
    batched = draw(st.booleans())
    x = torch.randn((2, *shape) if batched else shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return nn.Sequential(*layers), x


@settings(max_examples=25)
@given(case=conv_models(), method=st.sampled_from(["lego", "structured"]),
       strategy=st.sampled_from([None, "accumulate", "merge-conv", "dense", "fused"]),
       settings_=st.sampled_from([(1, 1.0), (2, 0.5), (2, 1)]))
def test_random_small_models_fold_to_their_training_form_or_say_why(case, method, strategy,
                                                                    settings_):
    model, x = case
    try:
        with torch.no_grad():
            expected_shape = model(x).shape
    except RuntimeError:  # the drawn convs shrink the input below a kernel: torch refuses it too
        assume(False)
    o, m = settings_
    gm = (legofx.transform(model, o=o, m=m) if method == "lego"
          else legofx.structure(model, c=0.5, n=1 if o == 1 else 2)).eval()
    if method == "lego":
        randomize_lego(gm, torch.Generator().manual_seed(0))
    if method == "structured" and strategy not in (None, "dense"):
        strategy = None
    try:
        folded = legofx.fold(gm, strategy)
    except LEGOFX_ERRORS as error:  # a legofx error names the cause
        assert any(word in str(error) for word in ("strategy", "fused", "kernel")), error
        return
    with torch.no_grad():
        trained, inference = gm(x), folded(x)
    assert trained.shape == inference.shape == expected_shape
    assert relative_error(inference, trained) <= tolerance(torch.float64)
    convs = dict(model.named_children())
    for record in legofx.summary(gm):
        assert record.rewritten or record.reason  # every conv kept says why
        if any(c.weight is convs[record.name].weight for n, c in convs.items() if n != record.name):
            assert not record.rewritten and "weight shared with" in record.reason  # kept tied
