"""A Lego YOLOv8n through ultralytics' own workflow (issue 23): its trainer trains the Lego
model (not a plain one rebuilt from the yaml), its checkpoints reload, predict and validate,
``resume=True`` continues from the trained Lego weights, its ONNX export matches ONNX Runtime,
``model.fuse()`` keeps the function, and its ``ModelEMA`` keeps a frozen selection. The recipe
under test is docs/workflow_ultralytics.md's ``LegoTrainer`` and ``freeze_after`` callback.

Everything is built offline: yolov8n from its yaml (random weights), a generated 8-image
dataset at 64x64, CPU, no AMP, no plots, no ONNX simplifier. One 2-epoch training run (module
fixture, ``save_period=1`` keeps the resumable ``epoch0.pt``) serves every test.

Tolerances: the checkpoint stores the EMA in float16, so the reloaded model equals the
in-memory EMA rounded to float16 and back to rounding (relative 1e-5) and the float32 EMA
to float16 weight rounding (relative 1e-2). Fusing and ONNX Runtime compare float32 with
float32 computed in another order: relative 1e-4 (the depth makes rounding grow; observed
~1e-6)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

import legofx
from helpers import relative_error

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics")
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA  # noqa: E402

O, M, WARMUP = 2, 0.5, 1  # freeze the selection at the start of epoch WARMUP
ARGS = dict(imgsz=64, batch=4, workers=0, device="cpu", plots=False, amp=False, exist_ok=True,
            seed=0, deterministic=True, verbose=False,
            # an optimizer step (and EMA update) at every batch (nbs=batch: no accumulation), at
            # a rate that moves float16 checkpoint weights within 4 steps (no warm-up)
            nbs=4, optimizer="SGD", lr0=0.02, warmup_epochs=0)


# --- the recipe (docs/workflow_ultralytics.md) ------------------------------------------------
def is_lego(model) -> bool:
    return any(isinstance(m, legofx.LegoConv2d) for m in model.modules())


class LegoTrainer(DetectionTrainer):
    """ultralytics' detection trainer, training a Lego model. Its ``get_model`` builds the plain
    model from the yaml, then: weights that are already Lego (``resume=True``, or training on
    from a Lego ``last.pt``) load into a freshly transformed model, strictly; plain weights
    (a pretrained ``yolov8n.pt``) load first and are transformed after."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
        if weights is not None and is_lego(weights):
            lego = legofx.transform(model, o=O, m=M)
            lego.load_state_dict(weights.float().state_dict())
            return lego
        if weights is not None:
            model.load(weights)
        return legofx.transform(model, o=O, m=M)


def freeze_after(warmup: int):
    """An ``on_train_epoch_start`` callback: fix the selection from epoch ``warmup`` on (the EMA
    follows: its ``frozen_selection`` buffer is averaged towards the model's)."""
    def callback(trainer):
        if trainer.epoch >= warmup:
            legofx.freeze_selection(trainer.model)
    return callback
# ------------------------------------------------------------------------------------------------


def make_dataset(root: Path) -> Path:
    """8 images (6 train, 2 val) of 64x64 with red (class 0) / blue (class 1) rectangles."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        split = "train" if i < 6 else "val"
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        image = np.full((64, 64, 3), rng.integers(60, 200, 3), np.uint8)
        lines = []
        for _ in range(2):
            (x0, y0), (w, h), cls = rng.integers(0, 40, 2), rng.integers(10, 24, 2), int(rng.integers(2))
            image[y0:y0 + h, x0:x0 + w] = (230, 20, 20) if cls == 0 else (20, 20, 230)
            lines.append(f"{cls} {(x0 + w / 2) / 64:.5f} {(y0 + h / 2) / 64:.5f} {w / 64:.5f} {h / 64:.5f}")
        Image.fromarray(image).save(root / "images" / split / f"{i}.png")
        (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return data


def lego_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("lego", "coef", "proxy", "frozen_selection")}


def selections(model) -> dict[str, torch.Tensor]:
    return {name: m.selection() for name, m in model.named_modules()
            if isinstance(m, legofx.LegoConv2d)}


def batch(data: Path) -> torch.Tensor:
    """The two val images as the model's input, (2, 3, 64, 64) in [0, 1]."""
    from PIL import Image

    images = sorted((data.parent / "images" / "val").glob("*.png"))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1).float() / 255
                        for p in images])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ultralytics")
    data = make_dataset(root / "data")
    seen = {}

    def on_train_start(trainer):
        seen["start"] = lego_state(trainer.model)
        seen["n_lego"] = sum(isinstance(m, legofx.LegoConv2d) for m in trainer.model.modules())

    yolo = ultralytics.YOLO("yolov8n.yaml")
    yolo.add_callback("on_train_start", on_train_start)
    yolo.add_callback("on_train_epoch_start", freeze_after(WARMUP))
    yolo.train(data=str(data), trainer=LegoTrainer, epochs=2, save_period=1,
               project=str(root / "runs"), name="train", **ARGS)
    trainer = yolo.trainer
    return dict(root=root, data=data, yolo=yolo, trainer=trainer, seen=seen,
                weights=Path(trainer.wdir))


def test_the_trainer_trains_the_lego_model(run):
    """The model ultralytics trained and saved is the Lego model, and training moved its Lego
    parameters (a plain model rebuilt from the yaml, or Lego layers re-initialised, fail)."""
    trainer, seen = run["trainer"], run["seen"]
    assert seen["n_lego"] > 50 and is_lego(trainer.model)
    ckpt = torch.load(run["weights"] / "last.pt", weights_only=False)
    saved = ckpt["model"]  # ultralytics pickles the whole EMA model
    assert is_lego(saved) and type(saved).__name__ == "DetectionModel"
    assert sum(isinstance(m, legofx.LegoConv2d) for m in saved.modules()) == seen["n_lego"]
    keys = saved.state_dict().keys()
    assert sum(k.endswith(".lego") for k in keys) == seen["n_lego"]
    assert not any(k.endswith(".conv.weight") and k.replace(".weight", ".lego") in keys for k in keys)
    after = lego_state(saved)
    lego_keys = [k for k in after if k.endswith(".lego")]
    changed = [k for k in lego_keys if not torch.equal(after[k], seen["start"][k].half().float())]
    assert len(changed) == len(lego_keys), "every Lego layer's filters trained"
    assert trainer.epoch == 1 and trainer.start_epoch == 0


def test_selection_frozen_by_the_callback_in_model_ema_and_checkpoint(run):
    """freeze_after(1): epoch0.pt (saved before) is not frozen; the model, its EMA and last.pt
    are, with one selection."""
    trainer = run["trainer"]
    before = torch.load(run["weights"] / "epoch0.pt", weights_only=False)["ema"]
    assert not any(m.frozen for m in before.modules() if isinstance(m, legofx.LegoConv2d))
    last = torch.load(run["weights"] / "last.pt", weights_only=False)["model"]
    for model in (trainer.model, trainer.ema.ema, last):
        layers = [m for m in model.modules() if isinstance(m, legofx.LegoConv2d)]
        assert layers and all(m.frozen for m in layers)
    want = selections(trainer.model)
    for model in (trainer.ema.ema, last):
        got = selections(model)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_reloads_predicts_and_validates_as_trained(run):
    """YOLO(last.pt) is the trained Lego model: raw eval outputs equal the in-memory EMA's
    (what ultralytics saved) rounded to float16; predict and val run on it."""
    ema = run["trainer"].ema.ema
    reloaded = ultralytics.YOLO(str(run["weights"] / "last.pt"))
    assert is_lego(reloaded.model)
    x = batch(run["data"])
    rounded = copy.deepcopy(ema).half().float().eval()
    with torch.no_grad():
        got = reloaded.model.eval()(x)[0]
        assert relative_error(got, rounded(x)[0]) <= 1e-5
        assert relative_error(got, copy.deepcopy(ema).float().eval()(x)[0]) <= 1e-2
    images = sorted((run["data"].parent / "images" / "val").glob("*.png"))
    results = reloaded.predict([str(p) for p in images], imgsz=64, device="cpu", verbose=False)
    assert len(results) == 2 and all(r.boxes is not None for r in results)
    metrics = reloaded.val(data=str(run["data"]), imgsz=64, batch=4, workers=0, device="cpu",
                           plots=False, verbose=False, project=str(run["root"] / "runs"), name="val")
    assert 0.0 <= metrics.box.map50 <= 1.0
    assert is_lego(reloaded.model)


def test_resume_continues_from_the_trained_lego_weights(run, tmp_path):
    """resume=True from epoch0.pt: the trainer starts at epoch 1 from the saved Lego weights
    (not re-initialised, no unexpected keys) and ends with a Lego model."""
    seen = {}

    def on_train_start(trainer):
        seen["start_epoch"] = trainer.start_epoch
        seen["state"] = lego_state(trainer.model)

    saved = torch.load(run["weights"] / "epoch0.pt", weights_only=False)["ema"]
    yolo = ultralytics.YOLO(str(run["weights"] / "epoch0.pt"))
    yolo.add_callback("on_train_start", on_train_start)
    yolo.add_callback("on_train_epoch_start", freeze_after(WARMUP))
    yolo.train(resume=True, trainer=LegoTrainer, save_dir=str(tmp_path / "resumed"),
               device="cpu", workers=0, plots=False)
    assert seen["start_epoch"] == 1
    want = lego_state(saved)
    assert seen["state"].keys() == want.keys()
    assert all(torch.equal(seen["state"][k], want[k]) for k in want)
    assert is_lego(yolo.model) and is_lego(yolo.trainer.model)
    assert all(m.frozen for m in yolo.trainer.model.modules() if isinstance(m, legofx.LegoConv2d))
    assert (tmp_path / "resumed" / "weights" / "last.pt").exists()


def test_ultralytics_onnx_export_matches_onnx_runtime(run, tmp_path):
    """ultralytics' own export(format="onnx") of the Lego checkpoint: ONNX Runtime gives the
    PyTorch model's output (relative 1e-4)."""
    ort = pytest.importorskip("onnxruntime")
    path = Path(run["weights"] / "last.pt")
    local = tmp_path / "last.pt"
    local.write_bytes(path.read_bytes())
    onnx_file = ultralytics.YOLO(str(local)).export(format="onnx", imgsz=64, simplify=False,
                                                    device="cpu", dynamic=False)
    x = batch(run["data"])[:1]
    model = ultralytics.YOLO(str(local)).model.eval()
    with torch.no_grad():
        want = model(x)[0]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == tuple(want.shape)
    assert relative_error(torch.from_numpy(got), want) <= 1e-4


def test_fuse_keeps_the_function_and_the_lego_layers(run):
    """model.fuse() (conv+BN fusion, as predict/val/export do) on the trained Lego model: the
    same output (relative 1e-4), every LegoConv2d kept, no BatchNorm left in fused blocks."""
    model = ultralytics.YOLO(str(run["weights"] / "last.pt")).model.eval()
    n_lego = sum(isinstance(m, legofx.LegoConv2d) for m in model.modules())
    x = batch(run["data"])
    with torch.no_grad():
        want = model(x)[0]
        model.fuse()
        got = model(x)[0]
    assert model.is_fused()
    assert sum(isinstance(m, legofx.LegoConv2d) for m in model.modules()) == n_lego
    assert relative_error(got, want) <= 1e-4


def test_model_ema_keeps_a_frozen_selection_while_proxies_move():
    """ultralytics' ModelEMA, made before the freeze (as the trainer makes it): after
    freeze_selection and SGD steps with momentum and weight decay, with the proxies pushed
    far from the frozen choice, the EMA selects what the model does."""
    torch.manual_seed(0)
    model = legofx.transform(ultralytics.YOLO("yolov8n.yaml").model, o=O, m=M)
    ema = ModelEMA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    x = torch.rand(2, 3, 64, 64)
    model.train()
    for step in range(4):
        if step == 2:
            legofx.freeze_selection(model)
            frozen = selections(model)
            with torch.no_grad():  # proxies drift away from the frozen choice
                for m in model.modules():
                    if isinstance(m, legofx.LegoConv2d):
                        m.proxy.add_(10 * torch.randn_like(m.proxy))
        loss = sum(t.float().square().mean() for t in pytree.tree_leaves(model(x))
                   if isinstance(t, torch.Tensor))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    drifted = {name: m.proxy.detach().argmax(-1) for name, m in model.named_modules()
               if isinstance(m, legofx.LegoConv2d)}
    assert any(not torch.equal(drifted[k], frozen[k]) for k in frozen), "proxies moved"
    for got in (selections(model), selections(ema.ema)):
        assert got.keys() == frozen.keys() and all(torch.equal(got[k], frozen[k]) for k in frozen)
