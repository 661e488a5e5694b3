"""Never a silently broken model (issue 24): traced graphs checked against eager execution,
Python state changed by tracing undone, exports with None / boolean outputs and keyword-only
calls, value-dependent sizes inside dataclass outputs. Each test failed on legofx 0.1.0."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
from torch import nn

import legofx
from legofx.core.records import stored_meta
from legofx.deploy.verify import MismatchError, check_outputs


class Up(nn.Module):
    """MONAI's UpCat in small: a test that is False for an fx Proxy drops the cat in a trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x, skip):
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            x = torch.cat([skip, x], 1)
        return self.conv(x)


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.up = Up()

    def forward(self, x):
        y = self.stem(x)
        return self.up(y, y)


class Doubling(nn.Module):
    """The trace takes the other branch with the same shapes: only the values tell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        if torch.jit.isinstance(x, torch.Tensor):
            x = x * 2
        return self.conv(x)


@pytest.mark.parametrize("with_example", [False, True])
def test_a_trace_that_takes_another_branch_is_not_used(with_example):
    model = UNetLike()
    x = torch.randn(2, 4, 16, 16)
    gm = legofx.transform(model, o=2, m=0.5, example_inputs=x if with_example else None)
    assert gm(x).shape == (2, 8, 16, 16)  # the model runs (it failed with a channel mismatch)
    untraced = stored_meta(gm)["untraced"]
    assert "its traced graph fails on the probe input" in untraced["up"]
    assert not isinstance(gm.up, fx.GraphModule)
    assert [r.name for r in legofx.summary(gm) if r.rewritten] == ["stem", "up.conv"]
    assert "its traced graph fails on the probe input" in legofx.report(gm)


def test_a_trace_that_computes_other_values_is_not_used():
    model = Doubling().eval()
    gm = legofx.transform(model, o=1, m=1.0, init="weights")  # exact: the same function
    x = torch.randn(2, 4, 16, 16)
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert "differs by" in stored_meta(gm)["untraced"]["<root>"]


class Head(nn.Module):
    def __init__(self, heads: list) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.heads = heads

    def forward(self, x):
        y = self.conv(x)
        self.heads[0] = y * 2  # MONAI DynUNet's deep supervision writes into its root's list
        return y


class DeepSupervision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = [torch.zeros(1)]
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.block = Head(self.heads)

    def forward(self, x, deep: bool = True):
        y = self.block(self.stem(x))
        return (y, self.heads[0]) if deep else y


def _proxies(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            found += [f"{name}.{key}" for v in values if isinstance(v, fx.Proxy)]
    return found


@pytest.mark.parametrize("training", [True, False])
def test_state_changed_by_tracing_is_undone_and_its_module_stays_eager(training):
    model = DeepSupervision().train(training)
    gm = legofx.transform(model, o=2, m=0.5)
    assert _proxies(gm) == [] and _proxies(model) == []
    y, head = gm(torch.randn(1, 4, 8, 8))
    assert isinstance(head, torch.Tensor) and torch.allclose(head, 2 * y)
    assert "changes Python state while it runs" in stored_meta(gm)["untraced"]["block"]
    assert legofx.fold(gm.eval())(torch.randn(1, 4, 8, 8))[1].shape == (1, 8, 8, 8)


class Dict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return {"y": y, "meta": None, "mask": y > 0}


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, *, x):
        return self.other(self.conv(x))


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_export_keeps_none_outputs_and_takes_keyword_only_calls(suffix, tmp_path):
    x = torch.randn(2, 4, 8, 8)
    legofx.export(Dict().eval(), x, tmp_path / f"dict.{suffix}", check=None)
    assert (tmp_path / f"dict.{suffix}").exists()
    legofx.export(KeywordOnly().eval(), (), tmp_path / f"kw.{suffix}", example_kwargs={"x": x},
                  check=None)
    assert (tmp_path / f"kw.{suffix}").exists()


def test_onnx_runtime_module_gives_back_the_output_structure():
    model = Dict().eval()
    x = torch.randn(2, 4, 8, 8)
    compiled = legofx.compile(model, x, backend="onnxruntime")
    out = compiled(x)
    assert set(out) == {"y", "meta", "mask"} and out["meta"] is None
    assert torch.equal(out["mask"], model(x)["mask"])


def test_boolean_outputs_allow_the_float_tolerance_as_a_fraction_of_flipped_elements():
    expected = torch.zeros(450, 450, dtype=torch.bool)
    few, many = expected.clone(), expected.clone()
    few[0, 0] = True  # 1 of 202,500: a logit within rounding of the threshold
    many[:10] = True
    model = lambda x: expected  # noqa: E731
    error, _, tolerance = check_outputs(lambda x: few, model, [((0,), {})], torch.float32, "f")
    assert error == pytest.approx(1 / 202_500) and error <= tolerance
    with pytest.raises(MismatchError, match="fraction of elements that differ"):
        check_outputs(lambda x: many, model, [((0,), {})], torch.float32, "f")


def test_fold_auto_takes_keyword_only_calls():
    gm = legofx.transform(KeywordOnly(), o=2, m=0.5).eval()
    x = torch.randn(2, 4, 8, 8)
    folded = legofx.fold(gm, "auto", example_inputs=(), example_kwargs={"x": x})
    assert torch.allclose(folded(x=x), gm(x=x), atol=1e-5)
    assert all("[auto" in r.lowering for r in legofx.summary(folded) if r.rewritten)


@dataclasses.dataclass
class Features:
    keypoints: torch.Tensor
    descriptors: torch.Tensor


class Detector(nn.Module):
    """kornia's DISK in small: a per-image number of keypoints inside a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        found = (y[0, 0] > 0).nonzero()
        return [Features(found.float(), y[0, :, found[:, 0], found[:, 1]].T)]


def test_value_dependent_sizes_inside_dataclass_outputs_are_allowed():
    gm = legofx.transform(Detector(), o=2, m=0.5, example_inputs=torch.randn(1, 4, 16, 16))
    out = gm(torch.randn(1, 4, 16, 16))
    assert isinstance(out[0], Features) and out[0].descriptors.shape[1] == 8
