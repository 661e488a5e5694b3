"""The Lightning workflow on a Lego model: a LightningModule that transforms its network in
``__init__``, ``Trainer.fit`` with the selection frozen by a callback, ``ModelCheckpoint``,
``load_from_checkpoint`` and resuming with ``ckpt_path=`` (docs/workflow_transformers_lightning.md).

Tolerances: a reloaded module runs the same graph on the same weights on the same CPU, so its
outputs match to 1e-6 (relative; observed equal). A resumed fit replays the same batches from the
restored optimizer and loop state; its weights match the uninterrupted fit's to 1e-5 (observed
equal)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import legofx

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from helpers import relative_error  # noqa: E402

OUT_TOL = 1e-6
RESUME_TOL = 1e-5


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


class LegoClassifier(L.LightningModule):
    """The recipe: transform in ``__init__`` (so ``load_from_checkpoint`` rebuilds the same Lego
    model from the saved hyper-parameters before loading the state), balance loss until the
    selection is frozen."""

    def __init__(self, o: int = 2, m: float = 0.5, lr: float = 0.05, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = legofx.transform(network(), o=o, m=m)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not self.frozen:
            loss = loss + 1e-3 * legofx.balance_loss(self.net)
        return loss

    @property
    def frozen(self) -> bool:
        return all(layer.frozen for layer in self.net.modules()
                   if isinstance(layer, legofx.LegoConv2d))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class FreezeSelection(Callback):
    """Fixes the selection at the start of global step ``step`` (an epoch boundary works the
    same way with ``on_train_epoch_start`` and ``trainer.current_epoch``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step and not module.frozen:
            legofx.freeze_selection(module.net)


def loader(n: int = 16, seed: int = 0):
    """Two batches of 8 per epoch, in a fixed order (a resumed fit then sees the same batches
    as the uninterrupted one: a shuffling loader's generator is not in Lightning's checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    for i, label in enumerate(y.tolist()):
        x[i, :, label * 5:label * 5 + 5] += 1.0
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(module, root, max_steps, callbacks=(), ckpt_path=None, every=2):
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                 filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[checkpoint, *callbacks])
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, checkpoint


def lego_tensors(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("lego", "coef", "proxy", "frozen_selection")}


def test_lightning_fit_freeze_checkpoint_and_load_from_checkpoint(tmp_path):
    module = LegoClassifier()
    before = lego_tensors(module)
    assert before
    trainer, checkpoint = fit(module, tmp_path, max_steps=4, callbacks=[FreezeSelection(2)])
    assert trainer.global_step == 4 and module.frozen
    after = lego_tensors(module)
    for kind in ("lego", "coef", "proxy"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith(kind)), kind
    paths = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert paths == ["step=2.ckpt", "step=4.ckpt"]

    x = next(iter(loader(8, seed=1)))[0]
    module.eval()
    with torch.no_grad():
        want = module(x)
    reloaded = LegoClassifier.load_from_checkpoint(tmp_path / "ckpt" / "step=4.ckpt")
    assert isinstance(reloaded.net, nn.Sequential) and reloaded.frozen
    reloaded.eval()
    with torch.no_grad():
        assert relative_error(reloaded(x), want) <= OUT_TOL
        # the inference form of the reloaded network
        assert relative_error(legofx.fold(reloaded.net)(x), want) <= 1e-4
    # the network alone, outside Lightning: legofx.save / legofx.restore onto the plain network
    legofx.save(module.net, tmp_path / "net.pt")
    restored = legofx.restore(network(), tmp_path / "net.pt").eval()
    with torch.no_grad():
        assert relative_error(restored(x), want) <= OUT_TOL
    # ModelCheckpoint wrote step=2 at the end of step 2, before the callback froze the selection
    early = LegoClassifier.load_from_checkpoint(tmp_path / "ckpt" / "step=2.ckpt")
    assert not early.frozen


def test_lightning_resumes_with_ckpt_path(tmp_path):
    whole = LegoClassifier()
    fit(whole, tmp_path / "whole", max_steps=4, callbacks=[FreezeSelection(2)])

    part = LegoClassifier()
    fit(part, tmp_path / "part", max_steps=2, callbacks=[FreezeSelection(2)])
    resumed = LegoClassifier(seed=1)  # other initial weights: everything comes from the checkpoint
    trainer, _ = fit(resumed, tmp_path / "part", max_steps=4, callbacks=[FreezeSelection(2)],
                     ckpt_path=tmp_path / "part" / "ckpt" / "step=2.ckpt")
    assert trainer.global_step == 4 and resumed.frozen
    want, got = whole.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), rtol=RESUME_TOL,
                              atol=RESUME_TOL), key


def test_lightning_ema_weight_averaging_keeps_the_frozen_selection(tmp_path):
    """``EMAWeightAveraging`` deep-copies the module into an ``AveragedModel`` and averages
    parameters and buffers: the frozen selection (a float buffer) is averaged with them and
    still reads as the selection frozen by the callback; its checkpoints hold the average and
    reload."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    module = LegoClassifier()
    ema = EMAWeightAveraging(decay=0.5)
    trainer, _ = fit(module, tmp_path, max_steps=4, callbacks=[FreezeSelection(2), ema])
    assert module.frozen  # the average was copied into the module at the end of fit
    lego = [m for m in module.net.modules() if isinstance(m, legofx.LegoConv2d)]
    averaged = [m for m in ema._average_model.module.net.modules()
                if isinstance(m, legofx.LegoConv2d)]
    assert len(averaged) == len(lego)
    for ours, theirs in zip(lego, averaged):
        assert torch.equal(ours.selection(), theirs.selection())
    reloaded = LegoClassifier.load_from_checkpoint(tmp_path / "ckpt" / "step=4.ckpt")
    assert reloaded.frozen
    x = next(iter(loader(8, seed=1)))[0]
    module.eval(), reloaded.eval()
    with torch.no_grad():
        assert relative_error(reloaded(x), module(x)) <= OUT_TOL
        assert relative_error(legofx.fold(reloaded.net)(x), module(x)) <= 1e-4
