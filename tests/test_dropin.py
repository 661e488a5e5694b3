"""The drop-in contract: ``transform`` / ``structure`` / ``fold`` return a model that takes the
same calls as the original, with the same effect and the same output types, and keeps the
containers and attributes the model's own code uses (issue 14's bugs, on self-made modules)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import legofx
from helpers import TOL64, randomize_lego, relative_error
from legofx.core.records import stored_meta
from legofx.fx.interface import compare_calls


def conv(c_in=4, c_out=4):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Block(nn.Module):
    """An ultralytics-style block: routing attributes ``f`` (from) and ``i`` (index)."""

    def __init__(self, f, i):
        super().__init__()
        self.conv, self.f, self.i, self.type = conv(), f, i, "Block"

    def forward(self, x):
        return torch.relu(self.conv(x))


class Add(nn.Module):
    def __init__(self, f, i):
        super().__init__()
        self.f, self.i = f, i

    def forward(self, xs):
        return xs[0] + xs[1]


class Routed(nn.Module):
    """Iterates its nn.Sequential and routes by each child's ``f``, as ultralytics'
    ``BaseModel._predict_once`` does; untraceable (a Python loop over a proxy list)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(Block(-1, 0), Block(-1, 1), Add([0, -1], 2), Block(-1, 3))
        self.save = {0}

    def forward(self, x):
        saved = []
        for m in self.model:
            if m.f != -1:
                x = saved[m.f] if isinstance(m.f, int) else [x if j == -1 else saved[j] for j in m.f]
            x = m(x)
            saved.append(x if m.i in self.save else None)
        if x.sum() > 0:  # data-dependent: the root cannot be traced
            return x
        return x


def reference(model, x):
    torch.manual_seed(0)
    return model(x)


def test_a_sequential_its_eager_parent_iterates_stays_iterable():
    model = Routed().double().eval()
    gm = legofx.transform(model, o=2, m=2)
    assert all(r.rewritten for r in legofx.summary(gm))
    assert isinstance(gm.model, nn.Sequential) and len(gm.model) == 4
    assert [m.f for m in gm.model] == [-1, -1, [0, -1], -1] and gm.model[1].type == "Block"
    randomize_lego(gm, torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folded = legofx.fold(gm.eval())
    assert len(folded.model) == 4
    assert relative_error(folded(x), gm(x)) <= TOL64


class Encoder(nn.Module):
    """MobileViT's encoder: non-None defaults the caller overrides."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([conv(), conv()])

    def forward(self, x, output_hidden_states=False, return_dict=True):
        states = []
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        out = {"last": x, "states": tuple(states) if output_hidden_states else None}
        return out if return_dict else tuple(out.values())


class WithEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.encoder = conv(), Encoder()

    def forward(self, x, output_hidden_states=None):
        return self.encoder(self.stem(x), output_hidden_states=bool(output_hidden_states))


def test_keywords_with_defaults_keep_their_effect():
    model = WithEncoder().double().eval()
    gm = legofx.transform(model, o=2, m=2)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    for form in (gm, legofx.fold(gm.eval())):
        assert form(x)["states"] is None
        assert len(form(x, output_hidden_states=True)["states"]) == 2
        assert len(form.encoder(x, True, False)) == 2
    assert "output_hidden_states=None" in stored_meta(gm)["untraced"]["<root>"]


class Kwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv()

    def forward(self, x, **kwargs):
        y = self.conv(x)
        return y * kwargs["scale"] if "scale" in kwargs else y


def test_a_kwargs_forward_does_not_swallow_keywords():
    model = Kwargs().double().eval()
    gm = legofx.transform(model, o=2, m=2)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    for form in (gm, legofx.fold(gm.eval())):
        assert relative_error(form(x, scale=3.0), 3.0 * form(x)) <= TOL64
    assert legofx.summary(gm)[0].rewritten


class Output(OrderedDict):
    """A transformers-ModelOutput-like result: an OrderedDict subclass with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class DataOutput:
    features: torch.Tensor
    extra: None = None


class ReturnsOutput(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv, self.kind = conv(), kind

    def forward(self, x):
        y = self.conv(x)
        return Output(features=y) if self.kind == "dict" else DataOutput(y)


@pytest.mark.parametrize("kind", ["dict", "dataclass"])
def test_output_types_are_kept(kind):
    model = ReturnsOutput(kind).eval()
    x = torch.randn(1, 4, 5, 5)
    gm = legofx.transform(model, o=2, m=2, example_inputs=x)
    expected = type(model(x))
    for form in (gm, legofx.fold(gm.eval())):
        out = form(x)
        assert type(out) is expected and out.features.shape == (1, 4, 5, 5)
    assert legofx.summary(gm)[0].rewritten


def test_a_traced_model_keeps_its_module_tree_and_methods():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = legofx.transform(model, o=2, m=0.5)
    assert isinstance(gm, torch.fx.GraphModule)  # traced, with explicit Lego nodes
    assert type(gm.layer4).__name__ == "Sequential" and len(gm.layer4) == 2
    assert type(gm.layer4[-1]).__name__ == "BasicBlock"
    assert set(model.state_dict()) - set(gm.state_dict()) == {
        k for k in model.state_dict() if k.startswith("layer") and k.endswith((
            "conv1.weight", "conv2.weight", "downsample.0.weight"))}
    folded = copy.deepcopy(legofx.fold(gm.eval()))
    assert len(folded.layer1) == 2 and folded._forward_impl is not None  # source's method


def test_a_sequential_root_keeps_len_iteration_and_indexing():
    net = nn.Sequential(conv(), nn.ReLU(), conv()).double().eval()
    gm = legofx.transform(net, o=2, m=2)
    randomize_lego(gm, torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert len(gm) == 3 and isinstance(gm[0], legofx.LegoConv2d)
    eager = x
    for layer in gm:  # running the children by hand is the same function
        eager = layer(eager)
    assert relative_error(eager, gm(x)) <= TOL64
    folded = legofx.fold(gm.eval())
    assert len(folded) == 3 and relative_error(folded[2](folded[1](folded[0](x))), gm(x)) <= TOL64


def test_example_inputs_are_checked():
    model = ReturnsOutput("dict").eval()
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        legofx.transform(model, example_inputs="x")
    with pytest.raises(TypeError, match="example_kwargs must be a dict"):
        legofx.transform(model, example_kwargs=[1])
    with pytest.raises(legofx.InterfaceError, match="the original model failed"):
        legofx.transform(model, example_inputs=torch.randn(1, 3, 5, 5))


def test_compare_calls_names_the_first_difference():
    class Plain(nn.Module):
        def forward(self, x):
            return {"features": x}

    class Wider(nn.Module):
        def forward(self, x):
            return {"features": torch.cat([x, x], 1)}

    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(legofx.InterfaceError, match=r"another structure.*dict"):
        compare_calls(ReturnsOutput("dict"), Plain(), (x,), {})
    with pytest.raises(legofx.InterfaceError, match=r"output\['features'\] is float32 \(1, 8, 5, 5\)"):
        compare_calls(Plain(), Wider(), (x,), {})


def test_a_traced_block_keeps_its_class_and_hooks():
    """Libraries find blocks by class (transformers' output recorders) and users hook them."""
    model = Routed().eval()
    seen = []
    model.model[1].register_forward_hook(lambda module, args, out: seen.append(type(module)))
    gm = legofx.transform(model, o=2, m=2)
    assert isinstance(gm.model[1], torch.fx.GraphModule)  # traced: explicit Lego nodes
    assert isinstance(gm.model[1], Block) and isinstance(gm.model, nn.Sequential)
    gm(torch.randn(1, 4, 5, 5))
    assert len(seen) == 1 and issubclass(seen[0], Block)
    folded = legofx.fold(gm.eval())
    folded(torch.randn(1, 4, 5, 5))
    assert len(seen) == 2 and isinstance(folded.model[1], Block)


def test_hooks_on_inner_modules_of_a_traced_model_still_run():
    """A Grad-CAM-style hook on a block of a traceable model: the graph calls that block as a
    module (its convs rewritten inside it), so the hook sees every forward."""
    net = nn.Sequential(nn.Sequential(conv(), nn.ReLU()), nn.Sequential(conv(), nn.ReLU()))
    seen = []
    net[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    gm = legofx.transform(net.eval(), o=2, m=2)
    assert all(r.rewritten for r in legofx.summary(gm))
    for form in (gm, legofx.fold(gm.eval())):
        form(torch.randn(1, 4, 5, 5))
    assert seen == [(1, 4, 5, 5)] * 2


def test_compare_calls_lets_a_value_dependent_count_differ():
    """A detector keeps as many boxes as pass its score threshold: only the first dimension."""

    class Boxes(nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, x):
            return [{"boxes": x.new_zeros(self.keep, 4)}]

    x = torch.randn(1, 4, 5, 5)
    compare_calls(Boxes(0), Boxes(7), (x,), {})
    with pytest.raises(legofx.InterfaceError, match=r"output\[0\]\['boxes'\]"):
        compare_calls(Boxes(0), Boxes(7), (x,), {}, same_function=True)


class ConvBN(nn.Module):
    """ultralytics' ``Conv``: conv, BatchNorm, activation, and ``forward_fuse`` for after fusion."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return torch.relu(self.conv(x))


def test_a_forward_replaced_inside_a_traced_block_runs():
    """ultralytics' ``model.fuse()`` folds each BatchNorm into its conv (assigning the conv's
    ``weight`` and ``bias``), deletes ``bn`` and sets ``forward = forward_fuse`` on the instance
    of a module that a traced block inlined: the block runs its source's forward from then on
    (before: ``AttributeError: 'ConvBN' object has no attribute 'bn'``)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    net = nn.Sequential(nn.Sequential(ConvBN(), ConvBN()), nn.ReLU())
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(torch.randn(4, generator=gen))
        bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    gm = legofx.transform(net.eval(), o=2, m=2).eval()
    randomize_lego(gm, gen)
    assert all(r.rewritten for r in legofx.summary(gm))
    x = torch.randn(2, 4, 5, 5, generator=gen)
    with torch.no_grad():
        want = gm(x)
        for block in gm[0]:
            block.conv.weight, block.conv.bias = fuse_conv_bn_weights(
                block.conv.weight, block.conv.bias, block.bn.running_mean, block.bn.running_var,
                block.bn.eps, block.bn.weight, block.bn.bias)
            delattr(block, "bn")
            block.forward = block.forward_fuse
        assert relative_error(gm(x), want) <= 1e-5
