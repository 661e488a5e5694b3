"""The fused merge kernel (torch.ops.legofx.lego_merge) and the "fused" lowerings."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx import merge_kernel
from legofx.lego_fused import FusedLegoConv2d

merge = torch.ops.legofx.lego_merge.default


@st.composite
def merges(draw, dtype=torch.float64):
    """Random merge inputs: sizes that cross the kernel's 8-pixel tiles and 8-channel blocks."""
    images, o, m, n = (draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                       draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    height, width = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    grouped, layout = draw(st.booleans()), draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = (images, o * m, height, width) if grouped else (images * o, m, height, width)
    maps = torch.randn(shape, generator=generator, dtype=dtype)
    if layout == "channels_last":
        maps = maps.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor: neither layout
        maps = torch.randn(*shape[:3], 2 * width, generator=generator, dtype=dtype)[..., ::2]
    index = (torch.randint(0, m, (n, o), generator=generator) + torch.arange(o) * m).flatten()
    coef = torch.randn(n, o, generator=generator, dtype=dtype)
    bias = torch.randn(n, generator=generator, dtype=dtype) if draw(st.booleans()) else None
    return maps, index, coef, bias, draw(st.booleans()), grouped


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_kernel_computes_the_gather_merge_in_every_layout(dtype, data):
    maps, index, coef, bias, relu, grouped = data.draw(merges(dtype))
    out = merge(maps, index, coef, bias, relu, grouped)
    double = None if bias is None else bias.double()
    expected = merge_kernel.reference_merge(maps.double(), index, coef.double(), double, relu, grouped)
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_error(out, expected) <= tolerance(dtype)
    rows = maps.is_contiguous(memory_format=torch.channels_last) and not maps.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if rows else torch.contiguous_format)


def test_kernel_is_vectorized_on_this_machine_when_it_has_avx2():
    """The float32 channels-last path the benchmarks time is the tiled AVX2 one here."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags or " fma" not in flags:
        pytest.skip("this machine has no AVX2/FMA: the scalar path runs (covered above)")
    assert merge_kernel.library().lego_merge_vectorized() == 1


@settings(max_examples=10)
@given(inputs=merges())
def test_gradients_flow_through_the_kernel(inputs):
    maps, index, coef, bias, relu, grouped = inputs
    leaves = [t.clone().requires_grad_() for t in (maps, coef, bias) if t is not None]
    assert torch.autograd.gradcheck(
        lambda a, c, *b: merge(a, index, c, b[0] if b else None, relu, grouped), leaves)


def test_bad_index_is_refused_instead_of_read_out_of_bounds():
    maps = torch.randn(4, 3, 5, 5)
    with pytest.raises(IndexError, match=r"index must hold 8 entries in \[0, 6\)"):
        merge(maps, torch.tensor([0, 3, 1, 4, 2, 6, 0, 3]), torch.ones(4, 2), None, False, False)


@settings(max_examples=10)
@given(inputs=merges(torch.bfloat16))
def test_other_dtypes_use_pytorch_ops(inputs):
    expected = merge_kernel.reference_merge(*inputs)
    assert torch.equal(merge(*inputs), expected)


def test_the_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(tmp_path))
    first = merge_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and merge_kernel.build() == first
    assert first.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1


def test_without_a_compiler_fused_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(merge_kernel, "_library", None)
    monkeypatch.setattr(merge_kernel, "find_compiler", lambda: None)
    gm = legofx.transform(nn.Sequential(nn.Conv2d(4, 8, 3)), o=2, m=2)
    with pytest.raises(merge_kernel.KernelUnavailable, match="strategy='fused-grouped'.*no C compiler"):
        legofx.fold(gm, "fused-grouped")
    assert isinstance(legofx.fold(gm, "auto", example_inputs=torch.randn(1, 4, 6, 6)), nn.Module)


class Block(nn.Module):
    """conv-BN-ReLU in the ways models write the ReLU, a residual add, a conv without BN."""

    def __init__(self, relu):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.relu = relu

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + x)  # after an add: stays a node
        return self.relu(self.conv3(y))


RELUS = {"module": nn.ReLU(), "inplace module": nn.ReLU(inplace=True), "F.relu": F.relu,
         "torch.relu": torch.relu, "F.relu inplace": lambda x: F.relu(x, inplace=True)}


def trained_block(relu, seed=0):
    torch.manual_seed(seed)
    block = Block(relu)
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    gm = legofx.transform(block, o=2, m=4).eval()
    randomize_lego(gm, torch.Generator().manual_seed(seed))
    return gm


@pytest.mark.parametrize("relu", RELUS)
@pytest.mark.parametrize("strategy", ["fused", "fused-grouped"])
def test_a_relu_after_a_fused_layer_goes_into_the_kernel(relu, strategy):
    gm = trained_block(RELUS[relu]).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    folded = legofx.fold(gm, strategy, fuse_batchnorm=True)
    layers = {r.name: r.lowering for r in legofx.summary(folded)}
    assert "ReLU" in layers["conv1"] and "ReLU" in layers["conv3"] and "ReLU" not in layers["conv2"]
    assert [folded.get_submodule(f"conv{i}").relu for i in (1, 2, 3)] == [True, False, True]
    relus = [n for n in folded.graph.nodes if "relu" in str(n.target)]
    assert len(relus) == 1  # the one after the residual add
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float64)
        assert relative_error(folded(x.contiguous(memory_format=torch.channels_last)),
                              gm(x)) <= tolerance(torch.float64)
        refolded = legofx.fold(folded)  # collapse and inline again: the ReLU stays inside
        assert relative_error(refolded(x), gm(x)) <= tolerance(torch.float64)
    gather = legofx.fold(gm, fuse_batchnorm=True)
    assert len([n for n in gather.graph.nodes if "relu" in str(n.target)]) == 3


def test_fused_models_compile_without_graph_breaks_and_fine_tune():
    gm = trained_block(nn.ReLU())
    x = torch.randn(2, 8, 16, 16)
    for strategy in ("fused", "fused-grouped"):
        folded = legofx.fold(gm, strategy, fuse_batchnorm=True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch.no_grad():
            compiled = torch.compile(folded, fullgraph=True)
            assert relative_error(compiled(x), gm(x)) <= tolerance(torch.float32)
        assert not torch._dynamo.utils.counters["graph_break"]
        folded.train()
        folded(x).square().mean().backward()
        grads = {name: p.grad for name, p in folded.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()


def test_fused_models_are_refused_by_the_tensorrt_op_check():
    folded = legofx.fold(trained_block(nn.ReLU()), "fused")
    report = legofx.check_ops(folded, torch.randn(1, 8, 8, 8))
    assert any("lego_merge" in str(op) for op in report.unsupported), report


def test_fused_models_are_refused_for_onnx_with_the_reason(tmp_path):
    folded = legofx.fold(trained_block(nn.ReLU()), "fused-grouped")
    x = torch.randn(1, 8, 8, 8)
    for attempt in (lambda: legofx.export(folded, x, tmp_path / "m.onnx", check=None),
                    lambda: legofx.compile(folded, x, "onnxruntime")):
        with pytest.raises(ValueError, match=r"ONNX.*custom op.*\(conv1, conv2, conv3\)"):
            attempt()
    assert not list(tmp_path.iterdir())
