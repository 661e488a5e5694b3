"""The fused Lego operator (torch.ops.legofx.lego_conv_merge, its C merge kernel) and the
"fused" lowering."""

import copy
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legofx
from helpers import randomize_lego, relative_error, tolerance
from legofx.methods.lego import kernel as merge_kernel
from legofx.methods.lego.layers import merge_gathered, split_fragments

fused_op = torch.ops.legofx.lego_conv_merge.default


@st.composite
def operator_inputs(draw, dtype=torch.float64):
    """Random operator inputs: sizes that cross the kernel's 16-channel vectors and its ways of
    reading a fragment's maps (m <= 32 and m <= 64 from registers, more gathered), every input
    layout, and o*m == n often (the merge writes over the conv's output)."""
    images, o = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    m = draw(st.sampled_from([1, 3, 16, 17, 32, 33, 64, 65, 70]))
    n = draw(st.one_of(st.just(o * m), st.integers(1, 40)))
    kernel, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, kernel))
    most = kernel * dilation + 6
    height, width = draw(st.integers(kernel * dilation, most)), draw(st.integers(kernel * dilation, most))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    channels = o * draw(st.integers(1, 3))
    x = torch.randn(images, channels, height, width, generator=generator, dtype=dtype)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor: neither layout
        x = torch.randn(images, channels, height, 2 * width, generator=generator, dtype=dtype)[..., ::2]
    lego = torch.randn(m, channels // o, kernel, kernel, generator=generator, dtype=dtype)
    index = (torch.randint(0, m, (n, o), generator=generator) + torch.arange(o) * m).flatten()
    coef = torch.randn(n, o, generator=generator, dtype=dtype)
    bias = torch.randn(n, generator=generator, dtype=dtype) if draw(st.booleans()) else None
    return (x, lego, index, coef, bias, [stride] * 2, [padding] * 2, [dilation] * 2, draw(st.booleans()))


def gather_form(x, lego, index, coef, bias, stride, padding, dilation, relu):
    """The same layer as legofx's gather lowering computes it (its own split and merge), in float64."""
    n, o = coef.shape
    frags = split_fragments(x.double(), o)
    maps = F.conv2d(frags, lego.double(), None, stride, padding, dilation).unflatten(0, (-1, o)).flatten(1, 2)
    out = merge_gathered(maps, index, coef.double(), None if bias is None else bias.double(), n, o)
    return out.relu() if relu else out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_operator_computes_the_gather_lowering_in_every_layout(dtype, data):
    inputs = data.draw(operator_inputs(dtype))
    out = fused_op(*inputs)
    expected = gather_form(*inputs)
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_error(out, expected) <= tolerance(dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_operator_writes_over_the_conv_output_when_sizes_match(monkeypatch):
    """o*m == n: the layer allocates one tensor (the conv's), as the dense conv did."""
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    lego, coef = torch.randn(4, 4, 3, 3), torch.randn(8, 2)
    index = (torch.randint(0, 4, (8, 2)) + torch.tensor([0, 4])).flatten()
    seen = []
    original = F.conv2d

    def conv2d(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(F, "conv2d", conv2d)
    out = fused_op(x, lego, index, coef, None, [1, 1], [1, 1], [1, 1], False)
    monkeypatch.undo()
    assert out.data_ptr() == seen[0].data_ptr()
    assert relative_error(out, gather_form(x, lego, index, coef, None, [1, 1], [1, 1], [1, 1], False)) \
        <= tolerance(torch.float32)


def test_kernel_is_vectorized_on_this_machine_when_it_has_avx2():
    """The float32 path the benchmarks time gathers 8 (AVX2) or 16 (AVX-512) channels at once."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags or " fma" not in flags:
        pytest.skip("this machine has no AVX2/FMA: the plain C path runs (covered above)")
    assert merge_kernel.library().lego_merge_vectorized() == (16 if " avx512f" in flags else 8)


def test_repeated_filters_are_kept_while_the_filters_do_not_change():
    lego = torch.randn(4, 2, 3, 3)
    first = merge_kernel.grouped_weight(lego, 2)
    assert merge_kernel.grouped_weight(lego, 2) is first
    assert torch.equal(first, lego.repeat(2, 1, 1, 1))
    lego.mul_(2)  # an optimizer step, or load_state_dict
    again = merge_kernel.grouped_weight(lego, 2)
    assert again is not first and torch.equal(again, lego.repeat(2, 1, 1, 1))
    key = id(lego)
    del lego, first, again
    assert key not in merge_kernel.filters._grouped_weights  # freed with the filters


@settings(max_examples=15)
@given(inputs=operator_inputs())
def test_gradients_through_the_operator_are_the_gather_lowerings(inputs):
    """Its backward against autograd through plain PyTorch ops, in float64."""
    x, lego, index, coef, bias, *rest = inputs
    grads = []
    for function in (fused_op, gather_form):
        leaves = [t.clone().requires_grad_() for t in (x, lego, coef, bias) if t is not None]
        args = (leaves[0], leaves[1], index, leaves[2], leaves[3] if bias is not None else None, *rest)
        out = function(*args)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        grads.append(torch.autograd.grad((out * weights).sum(), leaves))
    for got, expected in zip(*grads):
        assert relative_error(got, expected) <= tolerance(torch.float64)


def test_bad_index_is_refused_instead_of_read_out_of_bounds():
    x, lego = torch.randn(1, 4, 5, 5), torch.randn(3, 2, 1, 1)
    bad = torch.tensor([0, 3, 1, 4, 2, 6, 0, 3])  # 6: outside fragment 1's maps 3..5
    with pytest.raises(IndexError, match=r"must pick one of fragment i's 3 maps.*\[2, 3\]"):
        fused_op(x, lego, bad, torch.ones(4, 2), None, [1, 1], [0, 0], [1, 1], False)
    crossed = torch.tensor([3, 0, 1, 4, 2, 5, 0, 3])  # entry 0 takes a map of fragment 1
    with pytest.raises(IndexError, match="must pick one of fragment i's"):
        fused_op(x, lego, crossed, torch.ones(4, 2), None, [1, 1], [0, 0], [1, 1], False)


@settings(max_examples=10)
@given(inputs=operator_inputs(torch.bfloat16))
def test_other_dtypes_use_pytorch_ops(inputs):
    expected = merge_kernel.reference_conv_merge(*inputs)
    assert torch.equal(fused_op(*inputs), expected)


def test_the_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(tmp_path))
    first = merge_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and merge_kernel.build() == first
    assert first.stat().st_mtime_ns == stamp
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".sha256", ".so"]


def test_without_a_compiler_fused_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(merge_kernel.loader, "_libraries", {})
    monkeypatch.setattr(merge_kernel.loader, "find_compiler", lambda: None)
    gm = legofx.transform(nn.Sequential(nn.Conv2d(4, 8, 3)), o=2, m=2)
    with pytest.raises(merge_kernel.KernelUnavailable, match="strategy='fused'.*no C compiler"):
        legofx.fold(gm, "fused")
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
def test_a_relu_after_a_fused_layer_goes_into_the_kernel(relu):
    gm = trained_block(RELUS[relu]).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    folded = legofx.fold(gm, "fused", fuse_batchnorm=True)
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
    folded = legofx.fold(gm, "fused", fuse_batchnorm=True)
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


class Residual(nn.Module):
    """ResNet's stem and two residual blocks: each sum feeds a conv and the next sum."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(5))

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.convs[0](x)), 3, 2, 1)
        for first, second in (self.convs[1:3], self.convs[3:5]):
            y = torch.relu(second(torch.relu(first(y))) + y)
        return y


def test_compiled_fused_models_write_activations_channels_last_without_copies():
    """Inductor computes what a fused layer reads channels-last where it is computed: a view in
    ``compute`` (the unbatched-input reshape written as unsqueeze + flatten) fixed a residual
    sum as contiguous and added a channels-last copy of it per layer (issue 26)."""
    from torch._inductor.utils import run_and_get_code

    gm = legofx.transform(Residual().eval(), o=2, m=4).eval()
    folded = legofx.fold(gm, "fused")
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(folded), torch.randn(2, 8, 16, 16))
    shapes = r"empty_strided_cpu\(\((\d+), (\d+), (\d+), (\d+)\), \((\d+), (\d+), "
    buffers = re.findall(shapes, "\n".join(code))
    assert buffers and all(int(channel_stride) == 1 for *_, channel_stride in buffers), buffers


def test_fused_models_are_refused_by_the_tensorrt_op_check():
    folded = legofx.fold(trained_block(nn.ReLU()), "fused")
    report = legofx.check_ops(folded, torch.randn(1, 8, 8, 8))
    assert any("lego_conv_merge" in str(op) for op in report.unsupported), report


def test_fused_models_are_refused_for_onnx_with_the_reason(tmp_path):
    folded = legofx.fold(trained_block(nn.ReLU()), "fused")
    x = torch.randn(1, 8, 8, 8)
    for attempt in (lambda: legofx.export(folded, x, tmp_path / "m.onnx", check=None),
                    lambda: legofx.compile(folded, x, "onnxruntime")):
        with pytest.raises(ValueError, match=r"ONNX.*custom op.*\(conv1, conv2, conv3\)"):
            attempt()
    assert not list(tmp_path.iterdir())


def test_auto_with_custom_ops_times_fused_too_and_keeps_the_function():
    gm = trained_block(nn.ReLU()).double()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    folded = legofx.fold(gm, "auto", example_inputs=x, custom_ops=True, fuse_batchnorm=True)
    lowerings = {r.name: r.lowering for r in legofx.summary(folded) if r.rewritten}
    assert all("fused " in text for text in lowerings.values()), lowerings  # every layer timed it
    with torch.no_grad():
        assert relative_error(folded(x), gm(x)) <= tolerance(torch.float64)
    plain = legofx.fold(gm, "auto", example_inputs=x)
    assert not any("fused" in r.lowering for r in legofx.summary(plain) if r.rewritten)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"strategy": "auto", "custom_ops": 1}, TypeError, "custom_ops=1"),
    ({"strategy": "gather", "custom_ops": True}, ValueError, "strategy='gather'"),
    ({"strategy": "auto", "custom_ops": True, "backend": "onnxruntime"}, ValueError,
     "backend='onnxruntime' does not take the legofx custom op"),
])
def test_custom_ops_is_checked(kwargs, error, message):
    gm = trained_block(nn.ReLU())
    with pytest.raises(error, match=message):
        legofx.fold(gm, example_inputs=torch.randn(1, 8, 8, 8), **kwargs)


VECTOR_ROWS = {"portable": 0, "avx2": 8, "avx512": 16}


@pytest.mark.parametrize("path", merge_kernel.supported_paths())
def test_every_kernel_path_this_cpu_runs_computes_the_gather_lowering(path, monkeypatch):
    """LEGOFX_KERNEL picks the compiled code path; each one the machine supports (plain C,
    AVX2, AVX-512) gets a few drawn operator inputs, float32 and float64."""
    monkeypatch.setenv("LEGOFX_KERNEL", path)
    assert merge_kernel.library().lego_merge_vectorized() == VECTOR_ROWS.get(
        path, merge_kernel.library().lego_merge_vectorized())

    @settings(max_examples=6)
    @given(data=st.data())
    def check(data):
        for dtype in (torch.float32, torch.float64):
            inputs = data.draw(operator_inputs(dtype))
            assert relative_error(fused_op(*inputs), gather_form(*inputs)) <= tolerance(dtype)

    check()


def test_a_path_the_cpu_lacks_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(merge_kernel.loader, "_libraries", {})
    monkeypatch.setattr(merge_kernel.loader, "cpu_flags", lambda: {"fma"})
    monkeypatch.setenv("LEGOFX_KERNEL", "avx512")
    assert "LEGOFX_KERNEL=avx512: this CPU lacks avx2, avx512f" in merge_kernel.available()


def _valid_operator_arguments():
    x, lego = torch.randn(1, 4, 5, 5), torch.randn(2, 2, 1, 1)
    index = (torch.randint(0, 2, (8, 2)) + torch.tensor([0, 2])).flatten()
    return {"x": x, "lego": lego, "index": index, "coef": torch.randn(8, 2), "bias": torch.randn(8),
            "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "relu": False}


@pytest.mark.parametrize("name, bad, message", [
    ("bias", torch.randn(1), r"bias must have shape \(8,\)"),
    ("index", torch.tensor([0, 2]), "index must be 1-D integers with n\\*o = 16 entries"),
    ("index", torch.zeros(16), "index must be 1-D integers"),
    ("coef", torch.randn(8, 2, 1), "coef 2-D"),
    ("lego", torch.randn(2, 3, 1, 1), "x has 4 channels, o \\* lego.shape\\[1\\] = 2 \\* 3"),
    ("lego", torch.randn(2, 2, 1, 1, dtype=torch.float64), "one dtype"),
    ("coef", torch.ones(8, 2, dtype=torch.int64), "coef must be floating point"),
    ("stride", [0, 1], r"stride must be 2 ints >= 1, got stride=\[0, 1\]"),
    ("padding", [1], "padding must be 2 ints >= 0"),
])
def test_arguments_that_disagree_are_refused_before_the_kernel_reads_them(name, bad, message):
    """On the kernel's path (CPU float32) and the PyTorch path (bfloat16) alike."""
    arguments = {**_valid_operator_arguments(), name: bad}
    with pytest.raises(ValueError, match=message):
        fused_op(*arguments.values())
    if name != "lego" or "dtype" not in message:
        arguments = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in arguments.items()}
        with pytest.raises(ValueError, match=message):
            fused_op(*arguments.values())


@pytest.mark.parametrize("write", ["in-place write to p.data", "EMA through p.data"])
def test_writes_through_data_are_seen_by_the_kept_repeated_filters(write):
    """.data writes bypass the version counter: the kept copy is compared, never used stale."""
    folded = legofx.fold(trained_block(nn.ReLU()).double(), "fused")
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        folded(x)  # the repeated filters are kept now
        for p in folded.parameters():
            if write == "in-place write to p.data":
                p.data.mul_(0.5)
            else:
                p.data.mul_(0.9).add_(torch.randn_like(p), alpha=0.1)
        fresh = copy.deepcopy(folded)  # new tensors: repeated afresh from the written values
        assert relative_error(folded(x), fresh(x)) <= tolerance(torch.float64)


@pytest.mark.parametrize("write", ["lego.data.mul_", "EMA through lego.data", "lego.mul_",
                                   "lego.data = ", "load_state_dict", ".double() then lego.data"])
def test_writes_to_the_fused_filters_are_seen_without_comparing_them_per_call(write, monkeypatch):
    """The fused layer's filters are WatchedFilters: every way of writing them bumps what the
    kept repeated filters are keyed on, so the per-call path never compares values."""
    folded = legofx.fold(trained_block(nn.ReLU()).float(), "fused")
    x = torch.randn(2, 8, 9, 9)
    layer = folded.get_submodule("conv1")
    compares = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *a: compares.append(a) or real_equal(*a))
    with torch.no_grad():
        folded(x)  # the repeated filters are kept now
        if write == ".double() then lego.data":
            folded, x = folded.double(), x.double()
            folded(x)
        before = folded(x)
        if write == "lego.data.mul_" or write == ".double() then lego.data":
            layer.lego.data.mul_(0.5)
        elif write == "EMA through lego.data":
            layer.lego.data.mul_(0.9).add_(torch.randn_like(layer.lego), alpha=0.1)
        elif write == "lego.mul_":
            layer.lego.mul_(0.5)
        elif write == "lego.data = ":
            layer.lego.data = layer.lego.detach() * 0.5
        else:
            folded.load_state_dict({**folded.state_dict(), "conv1.lego": layer.lego * 0.5})
        assert isinstance(layer.lego, merge_kernel.WatchedFilters)
        fresh = copy.deepcopy(folded)  # new tensors: repeated afresh from the written values
        assert relative_error(folded(x), fresh(x)) <= tolerance(x.dtype)
        assert relative_error(folded(x), before) > 0.01
    assert not compares


def test_watched_filters_stay_watched_through_pickling():
    folded = legofx.fold(trained_block(nn.ReLU()), "fused")
    again = pickle.loads(pickle.dumps(folded))
    assert isinstance(again.get_submodule("conv1").lego, merge_kernel.WatchedFilters)
    assert torch.equal(again.get_submodule("conv1").lego, folded.get_submodule("conv1").lego)
