"""What the libraries' workflows do to a model around legofx (issue 23): conv+BN fusion by the
caller, pickling whole models, hooks registered after transform, weight averages (EMA),
legofx.save / legofx.restore. Each test failed on legofx 0.1.0 (d106b7c)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import legofx
from legofx.core.records import stored_recipe
from legofx.methods.lego.layers import FoldedLegoConv2d, LegoConv2d

# float32 through a random ResNet-18 at 32x32: both sides compute the same ops in the same
# order except where stated, so differences are rounding of a few ulps of the largest output.
TOL32 = 1e-5


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    for bn in model.modules():  # non-trivial statistics, so that fusing BN changes the weights
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# -- 1. weight (and bias) assignable as code written for nn.Conv2d expects ---------------------

FORMS = {
    "lego": lambda m: legofx.transform(m, o=2, m=0.5),
    "lego folded": lambda m: legofx.fold(legofx.transform(m, o=2, m=0.5).eval()),
    "lego fused": lambda m: legofx.fold(legofx.transform(m, o=2, m=0.5).eval(), "fused"),
    "structured": lambda m: legofx.structure(m, c=0.5, n=2),
    "structured folded": lambda m: legofx.fold(legofx.structure(m, c=0.5, n=2).eval()),
}


@pytest.mark.parametrize("form", FORMS)
def test_fuse_conv_bn_eval_keeps_the_layer_and_its_function(form):
    gm = FORMS[form](resnet()).eval()
    block = gm.layer1[0]
    x = torch.randn(2, 64, 8, 8)
    expected = block.bn1(block.conv1(x))
    fused = fuse_conv_bn_eval(block.conv1, block.bn1)  # deep-copies, then assigns weight, bias
    assert type(fused) is type(block.conv1)  # still the Lego / Structured layer, not dense
    assert relative(fused(x), expected) <= TOL32


def test_in_place_fusion_as_ultralytics_does_changes_what_the_model_computes():
    gm = legofx.fold(legofx.transform(resnet(), o=2, m=0.5).eval())
    block = gm.layer1[0]
    x = torch.randn(2, 64, 8, 8)
    expected = block.bn1(block.conv1(x))
    conv = block.conv1
    assert conv.bias is None
    conv.weight, conv.bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, block.bn1.running_mean, block.bn1.running_var, block.bn1.eps,
        block.bn1.weight, block.bn1.bias)
    assert isinstance(conv.bias, nn.Parameter) and "bias" in dict(conv.named_parameters())
    assert relative(conv(x), expected) <= TOL32


def test_a_weight_the_layer_cannot_hold_is_refused_and_nothing_changes():
    layer = legofx.transform(resnet(), o=2, m=0.5).layer1[0].conv1
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="not one this layer can hold.*strategy='dense'"):
        layer.weight = nn.Parameter(torch.randn_like(layer.weight))
    with pytest.raises(ValueError, match=r"shape \(64, 64, 3, 3\)"):
        layer.weight = nn.Parameter(torch.randn(64, 64, 1, 1))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


# -- 2. pickling and deepcopy keep the model ----------------------------------------------------

class KeywordNet(nn.Module):
    """A root whose forward takes a keyword with a default: it stays eager (its class)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x, scale: float = 1.0):
        return self.body(x) * scale


MODELS = {
    "traced ResNet": lambda: legofx.transform(resnet(), o=2, m=0.5),
    "eager root": lambda: legofx.transform(KeywordNet(), o=2, m=0.5),
    "structured": lambda: legofx.structure(resnet(), c=0.5, n=2),
    "folded": lambda: legofx.fold(legofx.transform(resnet(), o=2, m=0.5).eval(), fuse_batchnorm=True),
    "fused": lambda: legofx.fold(legofx.transform(resnet(), o=2, m=0.5).eval(), "fused"),
}


def _reloaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
@pytest.mark.parametrize("name", MODELS)
def test_pickled_and_copied_models_keep_class_keys_and_function(name, how):
    model = MODELS[name]().eval()
    copied = _reloaded(model) if how == "torch.save" else copy.deepcopy(model)
    original_class = type(model).__mro__[1] if "Traced" in type(model).__mro__[1].__name__ else type(model)
    assert isinstance(copied, original_class)
    assert list(copied.state_dict()) == list(model.state_dict())
    assert not any("_legofx_source" in k or "_tensor_constant" in k for k in copied.state_dict())
    torch.testing.assert_close(copied(X), model(X), rtol=0, atol=0)
    assert legofx.summary(copied) == legofx.summary(model)


def test_freeze_and_fold_work_on_a_reloaded_model():
    model = legofx.transform(resnet(), o=2, m=0.5)
    reloaded = _reloaded(model)
    layer = reloaded.layer1[0].conv1
    assert legofx.freeze_selection(reloaded) > 0 and layer.frozen
    chosen = layer.selection()
    with torch.no_grad():
        layer.proxy.add_(torch.randn_like(layer.proxy) * 10)  # would change an unfrozen choice
    assert torch.equal(layer.selection(), chosen)
    x = torch.randn(2, 3, 32, 32)
    expected = reloaded.eval()(x)
    assert relative(legofx.fold(reloaded)(x), expected) <= TOL32
    legofx.unfreeze_selection(reloaded)
    assert not layer.frozen and not torch.equal(layer.selection(), chosen)


# -- 3. hooks registered after transform fire -------------------------------------------------

def backward_hooked(name: str, form: str) -> bool:
    return not name.endswith("relu") and (form == "transformed" or name.count(".") < 2)


@pytest.mark.parametrize("form", ["transformed", "folded with BN fused", "fused"])
def test_hooks_registered_after_transform_fire_on_every_module(form):
    original = resnet().eval()
    gm = legofx.transform(original, o=2, m=0.5).eval()
    if form != "transformed":
        gm = legofx.fold(gm, "fused" if form == "fused" else None, fuse_batchnorm=True)
    expected = gm(X)
    names = ["layer4", "layer1.0", "layer1.0.conv1", "layer2.0.downsample.0", "layer3.1.relu"]
    fired: list[tuple[str, str]] = []
    handles = []
    for name in names:
        module = gm.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: fired.append(("pre", n))))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: fired.append(("fwd", n))))
        # torch refuses a full backward hook on a module whose output (or input) an in-place op
        # then changes: an in-place ReLU, or a conv followed by one once its BN is fused
        if backward_hooked(name, form):
            handles.append(module.register_full_backward_hook(
                lambda m, gi, go, n=name: fired.append(("bwd", n))))
    x = X.clone().requires_grad_()
    out = gm(x)
    out.sum().backward()
    for name in names:
        expected_kinds = {"pre", "fwd"} | ({"bwd"} if backward_hooked(name, form) else set())
        assert {(kind, name) for kind in expected_kinds} <= set(fired), name
    assert relative(out.detach(), expected) <= TOL32  # the eager path computes the same
    for handle in handles:
        handle.remove()
    fired.clear()
    gm(X)
    assert fired == []


def test_a_hook_can_read_and_replace_a_rewritten_layers_output():
    gm = legofx.transform(resnet(), o=2, m=0.5).eval()
    seen = {}
    gm.layer1[0].conv1.register_forward_hook(lambda m, a, o: seen.update(shape=o.shape))
    gm.layer4.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    out = gm(X)
    assert seen["shape"] == (2, 64, 8, 8)
    torch.testing.assert_close(out, gm.fc(torch.zeros(2, 512)))


# -- 4. weight averages (EMA) follow freeze_selection ------------------------------------------

def _train_steps(model: nn.Module, steps: int, ema_update) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for step in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(model)
        if step == 1:
            legofx.freeze_selection(model)


def _selections(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.selection() for n, m in model.named_modules() if isinstance(m, LegoConv2d)}


def test_timm_model_ema_keeps_the_frozen_selection():
    from timm.utils import ModelEmaV3

    model = legofx.transform(resnet(), o=2, m=0.5)
    ema = ModelEmaV3(model, decay=0.9999)
    _train_steps(model, 6, ema.update)
    assert all(layer.frozen for layer in model.modules() if isinstance(layer, LegoConv2d))
    ours, theirs = _selections(model), _selections(ema.module)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_ultralytics_model_ema_keeps_the_frozen_selection():
    from ultralytics.utils.torch_utils import ModelEMA

    model = legofx.transform(resnet(), o=2, m=0.5)
    ema = ModelEMA(model)
    proxies = {n: m.proxy.detach().clone() for n, m in model.named_modules() if isinstance(m, LegoConv2d)}
    _train_steps(model, 6, ema.update)
    moved = sum(not torch.equal(m.proxy, proxies[n]) for n, m in model.named_modules()
                if isinstance(m, LegoConv2d))
    assert moved > 0  # momentum and weight decay still move the frozen proxies
    ours, theirs = _selections(model), _selections(ema.ema)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


# -- 5. legofx.save / legofx.restore -----------------------------------------------------------

SAVED = {
    "transform": lambda m: legofx.transform(m, o=2, m=0.5, exclude="layer4"),
    "structure": lambda m: legofx.structure(m, c=0.5, n=2),
    "fold auto": lambda m: legofx.fold(legofx.transform(m, o=2, m=0.5).eval(), "auto",
                                       example_inputs=X, fuse_batchnorm=True),
}


@pytest.mark.parametrize("name", SAVED)
def test_save_and_restore_give_back_the_model(name, tmp_path):
    model = SAVED[name](resnet(seed=3)).eval()
    if name == "transform":
        legofx.freeze_selection(model)
    path = legofx.save(model, tmp_path / "lego.pt")
    payload = torch.load(path, weights_only=True)  # data only, no pickled code
    assert payload["model_class"] == "torchvision.models.resnet.ResNet"
    restored = legofx.restore(resnet(seed=4).eval(), path)  # other random weights
    assert isinstance(restored, torchvision.models.ResNet)
    assert list(restored.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(restored.eval()(X), model(X), rtol=0, atol=0)
    lowerings = {n: getattr(m, "lowering_name", None) for n, m in model.named_modules()}
    assert {n: getattr(m, "lowering_name", None) for n, m in restored.named_modules()} == lowerings
    assert stored_recipe(restored) == stored_recipe(model)


def test_restore_refuses_other_models_settings_and_files_in_one_line(tmp_path):
    path = legofx.save(legofx.transform(resnet(), o=2, m=0.5), tmp_path / "lego.pt")
    with pytest.raises(ValueError, match="holds a ResNet.*model is a VGG"):
        legofx.restore(torchvision.models.vgg11(), path)
    with pytest.raises(ValueError, match=r"key\(s\) missing from the checkpoint \(layer1.2"):
        legofx.restore(torchvision.models.resnet34(num_classes=10), path)
    payload = torch.load(path, weights_only=True)
    payload["recipe"][0]["options"]["m"] = 0.25
    torch.save(payload, tmp_path / "other_m.pt")
    with pytest.raises(ValueError, match="made with o=2, m=32.*this one has o=2, m=16"):
        legofx.restore(resnet(), tmp_path / "other_m.pt")
    payload["format"], payload["legofx"] = 99, "9.0"
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match="legofx 9.0 in checkpoint format 99"):
        legofx.restore(resnet(), tmp_path / "newer.pt")
    torch.save(resnet(), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not a legofx checkpoint.*legofx.save"):
        legofx.restore(resnet(), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="without legofx records"):
        legofx.save(resnet(), tmp_path / "plain.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lego.pt", "newer.pt", "other_m.pt", "pickled.pt"]


def test_checkpoints_of_legofx_0_1_with_a_boolean_frozen_flag_still_load():
    model = legofx.transform(resnet(), o=2, m=0.5)
    legofx.freeze_selection(model)
    state = model.state_dict()
    old = {}
    for key, value in state.items():
        if key.endswith("frozen_selection"):
            prefix = key[: -len("frozen_selection")]
            old[prefix + "frozen"] = torch.tensor(True)
            old[prefix + "frozen_index"] = value.argmax(-1)
        else:
            old[key] = value
    fresh = legofx.transform(resnet(seed=5), o=2, m=0.5)
    fresh.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(_selections(fresh).values(), _selections(model).values()))
    assert all(layer.frozen for layer in fresh.modules() if isinstance(layer, LegoConv2d))


def test_fold_and_restore_keep_folded_layers_typed():
    folded = legofx.fold(legofx.transform(resnet(), o=2, m=0.5).eval())
    assert isinstance(folded.layer1[0].conv1, FoldedLegoConv2d)
