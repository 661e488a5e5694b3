"""The transformers ``Trainer`` workflow on a Lego model: train, checkpoint, save, restore,
evaluate, resume (docs/workflow_transformers_lightning.md).

A tiny ``ResNetForImageClassification`` built from its config (random weights, nothing
downloaded) on generated 32x32 images. Tolerances: the restored model runs the same graph on
the same weights on the same CPU, so its eval loss matches the trained model's to 1e-6
(relative; observed equal). A resumed run replays the same batches from the restored optimizer,
scheduler and RNG states; its weights match the uninterrupted run's to 1e-5 (observed equal)."""

from __future__ import annotations

import os

import pytest
import torch

import legofx

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    ResNetConfig, ResNetForImageClassification, Trainer, TrainerCallback, TrainingArguments)

LOSS_TOL = 1e-6
RESUME_TOL = 1e-5


def config() -> ResNetConfig:
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)


class Images(torch.utils.data.Dataset):
    """``n`` generated 3x32x32 images whose label is the brightest of three stripes."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        for i, label in enumerate(self.y.tolist()):
            self.x[i, :, label * 10:label * 10 + 10] += 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def lego_model(seed: int = 0):
    torch.manual_seed(seed)
    return legofx.transform(ResNetForImageClassification(config()), o=2, m=0.5)


def arguments(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=8,
                per_device_eval_batch_size=16, learning_rate=1e-2, use_cpu=True, report_to=[],
                save_strategy="steps", save_steps=2, logging_strategy="no", disable_tqdm=True,
                seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


class LegoTrainer(Trainer):
    """The recipe's balance loss during the warm-up (until the selection is frozen)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training and not all(layer.frozen for layer in model.modules()
                                      if isinstance(layer, legofx.LegoConv2d)):
            loss = loss + 1e-4 * legofx.balance_loss(model)
        return (loss, outputs) if return_outputs else loss


def trainer(model, out, **kw) -> Trainer:
    callbacks = kw.pop("callbacks", None)
    return LegoTrainer(model=model, args=arguments(out, **kw), train_dataset=Images(32, 0),
                   eval_dataset=Images(16, 1), callbacks=callbacks)


def lego_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("lego", "coef", "proxy", "frozen_selection")}


class FreezeAt(TrainerCallback):
    """Fixes the selection at the start of global step ``step`` (the recipe's warm-up end)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            legofx.freeze_selection(model)


class StopAt(TrainerCallback):
    """Ends training after global step ``step``: an interrupted run with the same schedule."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_trainer_trains_checkpoints_and_reloads_the_lego_model(tmp_path):
    gm = lego_model()
    before = lego_state(gm)
    assert before, "no Lego layer"
    t = trainer(gm, tmp_path / "run", callbacks=[FreezeAt(2)])
    t.train()
    after = lego_state(gm)
    # every kind of Lego parameter moved; the selection got frozen at step 2 by the callback
    for kind in ("lego", "coef", "proxy"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith(kind)), kind
    assert all(layer.frozen for layer in gm.modules() if isinstance(layer, legofx.LegoConv2d))
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "checkpoint-4"]
    trained_loss = t.evaluate()["eval_loss"]

    final = tmp_path / "final"
    t.save_model(str(final))
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()

    # the saved weights are the whole Lego state: a fresh transform of the same config takes
    # them strictly (no missing or unexpected key), frozen selection included
    from safetensors.torch import load_file
    fresh = legofx.transform(ResNetForImageClassification(ResNetConfig.from_pretrained(final)),
                             o=2, m=0.5)
    fresh.load_state_dict(load_file(final / "model.safetensors"), strict=True)
    assert all(layer.frozen for layer in fresh.modules() if isinstance(layer, legofx.LegoConv2d))
    reloaded_loss = trainer(fresh, tmp_path / "eval").evaluate()["eval_loss"]
    assert relative(reloaded_loss, trained_loss) <= LOSS_TOL

    # the last Trainer checkpoint holds the same model
    checkpoint = legofx.transform(ResNetForImageClassification(config()), o=2, m=0.5)
    checkpoint.load_state_dict(load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors"))
    assert relative(trainer(checkpoint, tmp_path / "eval2").evaluate()["eval_loss"],
                    trained_loss) <= LOSS_TOL

    # the inference form of the reloaded model computes the same eval loss
    folded = legofx.fold(fresh.eval())
    assert type(folded) is ResNetForImageClassification
    assert relative(trainer(folded, tmp_path / "eval3").evaluate()["eval_loss"],
                    trained_loss) <= 1e-4


def test_legofx_restore_from_a_trainer_save_and_checkpoint(tmp_path):
    gm = lego_model()
    t = trainer(gm, tmp_path / "run", callbacks=[FreezeAt(2)])
    t.train()
    trained_loss = t.evaluate()["eval_loss"]
    t.save_model(str(tmp_path / "final"))
    for path in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        restored = legofx.restore(ResNetForImageClassification(config()), path)
        assert type(restored) is ResNetForImageClassification
        assert all(layer.frozen for layer in restored.modules()
                   if isinstance(layer, legofx.LegoConv2d))
        loss = trainer(restored, tmp_path / "eval").evaluate()["eval_loss"]
        assert relative(loss, trained_loss) <= LOSS_TOL, path
    # the recipe travels in config.json, so the restored model saves and restores again
    assert restored.config.legofx["recipe"][0]["call"] == "transform"
    # legofx.save / restore round trip of the trained model, and of its inference form
    legofx.save(gm, tmp_path / "lego.pt")
    restored = legofx.restore(ResNetForImageClassification(config()), tmp_path / "lego.pt")
    assert relative(trainer(restored, tmp_path / "eval").evaluate()["eval_loss"],
                    trained_loss) <= LOSS_TOL
    legofx.save(legofx.fold(gm.eval()), tmp_path / "folded.pt")
    folded = legofx.restore(ResNetForImageClassification(config()), tmp_path / "folded.pt")
    assert relative(trainer(folded, tmp_path / "eval").evaluate()["eval_loss"],
                    trained_loss) <= 1e-4
    # refusals, one line each: another class, another configuration
    from transformers import ResNetModel
    for other in (ResNetModel(config()),
                  ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 32],
                                                            depths=[1, 1], num_labels=3))):
        with pytest.raises(ValueError) as refused:
            legofx.restore(other, tmp_path / "final")
        assert "\n" not in str(refused.value), str(refused.value)


def test_trainer_resumes_from_a_checkpoint(tmp_path):
    steps = dict(max_steps=2, save_steps=1)  # freeze after step 1; interrupt after step 1
    whole = lego_model()
    trainer(whole, tmp_path / "whole", callbacks=[FreezeAt(1)], **steps).train()

    # an interrupted run: the same model and schedule, stopped after the checkpoint at step 1 ...
    part = lego_model()
    trainer(part, tmp_path / "part", callbacks=[FreezeAt(1), StopAt(1)], **steps).train()
    assert os.listdir(tmp_path / "part") == ["checkpoint-1"]
    # ... resumed as a new process would: a fresh transform, the same arguments and callbacks
    resumed = lego_model(seed=1)  # other initial weights: everything must come from the checkpoint
    t = trainer(resumed, tmp_path / "part", callbacks=[FreezeAt(1)], **steps)
    t.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-1"))
    assert t.state.global_step == 2
    assert all(layer.frozen for layer in resumed.modules() if isinstance(layer, legofx.LegoConv2d))
    want, got = whole.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), rtol=RESUME_TOL,
                              atol=RESUME_TOL), key


def test_trainer_load_best_model_at_end_reloads_a_lego_checkpoint(tmp_path):
    gm = lego_model()
    t = trainer(gm, tmp_path / "run", callbacks=[FreezeAt(2)], eval_strategy="steps",
                eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    t.train()
    best = t.state.best_metric
    assert t.state.best_model_checkpoint is not None
    assert relative(t.evaluate()["eval_loss"], best) <= LOSS_TOL


def test_plain_from_pretrained_of_a_lego_save_refuses_loudly(tmp_path):
    """transformers 5 only warns about missing and unexpected keys, so a Lego save loaded
    into the plain class would come back freshly initialised. Every rewritten layer of a model
    with a transformers config saves a ``weight`` of shape (1,) beside its own tensors, so
    ``from_pretrained`` of the original class stops at the size mismatch instead; legofx's own
    loading drops it (``legofx.restore``, ``load_state_dict``, the Trainer's resume)."""
    gm = lego_model()
    t = trainer(gm, tmp_path / "run", max_steps=1, save_strategy="no")
    t.train()
    t.save_model(str(tmp_path / "final"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        ResNetForImageClassification.from_pretrained(tmp_path / "final")
    restored = legofx.restore(ResNetForImageClassification(gm.config.__class__(**{
        k: v for k, v in gm.config.to_dict().items() if k != "legofx"})), tmp_path / "final")
    x = Images(4, 2).x
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x).logits, gm.eval()(x).logits)
