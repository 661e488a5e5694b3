"""The main job: a dense CNN and its Lego version trained on real data, side by side.

The data ship inside scikit-learn (8x8 handwritten digits, 1,797 images), upscaled to
16x16; nothing is downloaded. Three models get the same training budget, with progress bars:

1. the dense CNN;
2. its Lego version trained from scratch (``transform``, balance loss during a warm-up,
   then ``freeze_selection``, as the LegoNet authors train);
3. the Lego version started from the trained dense weights (``init="weights"``), its
   BatchNorm statistics re-estimated (``recalibrate_batchnorm``), and fine-tuned briefly.

Then a table: test accuracy, conv parameters, MACs and fold error of each; the Lego models
are folded, checked against their training form, and one is exported to ONNX (checked in ONNX
Runtime). No latency here: at 16x16 per-op overhead, not the convolutions, sets the time of
such a small network (:mod:`legofx.demo.realistic` measures latency at a realistic size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from legofx.core.arguments import check_positive_int
from legofx.methods.lego.api import transform
from legofx.core.numerics import relative_error
from legofx.core.progress import progress
from legofx.report import measure_macs
from legofx.lowering.fold import fold
from legofx.methods.lego.training import balance_loss, freeze_selection, recalibrate_batchnorm


def digits(size: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: scikit-learn's digits, 80/20 stratified split,
    scaled to [0, 1] and upscaled (bilinear) to ``size`` x ``size``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("the demo needs scikit-learn: pip install 'legofx[dev]'") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    train, test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=y)
    return x[train], y[train], x[test], y[test]


def cnn(width: int = 32, classes: int = 10) -> nn.Sequential:
    """A small VGG-style CNN: five 3x3 convs with BN and ReLU, two poolings, a linear head."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, width), *block(width, width), nn.MaxPool2d(2),
        *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


@dataclass
class Budget:
    epochs: int = 20
    batch: int = 64
    lr: float = 0.05
    warmup: float = 0.3    # fraction of epochs during which a Lego selection is learned
    balance: float = 1e-3  # weight of balance_loss during the warm-up

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch", self.batch)
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1], got {self.warmup!r}")


def train(model: nn.Module, data, budget: Budget, description: str = "training",
          quiet: bool = False, seed: int = 0) -> nn.Module:
    """SGD with momentum and a cosine schedule; Lego models learn their selection (with the
    balance loss) for the first ``budget.warmup`` of the epochs, then freeze it."""
    x_train, y_train = data[0], data[1]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=budget.lr, momentum=0.9,
                                weight_decay=5e-4, nesterov=True)
    steps = budget.epochs * -(-len(y_train) // budget.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, budget.lr, total_steps=steps)
    lego = any(name.endswith(".proxy") for name, _ in model.named_parameters())
    warmup_epochs = round(budget.warmup * budget.epochs)
    model.train()
    for epoch in progress(range(budget.epochs), description, "epoch", quiet):
        if lego and epoch == warmup_epochs:
            freeze_selection(model)
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), budget.batch):
            index = order[start:start + budget.batch]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            if lego and epoch < warmup_epochs:
                loss = loss + budget.balance * balance_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def inference_conv_params(model: nn.Module) -> int:
    """Floating-point parameters of the convs (dense or Lego, inference form)."""
    from legofx.core.layer import RewrittenLayer

    total = 0
    for module in model.modules():
        if isinstance(module, RewrittenLayer):
            total += module.params_after
        elif isinstance(module, nn.Conv2d):
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def network_macs(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        return measure_macs(model, x)[2]
    except ValueError:  # not a legofx model: count the dense convs and linears
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(x)
        return counter.get_total_flops() // 2


def run(budget: Budget | None = None, seed: int = 0, quiet: bool = False, export_dir=None) -> dict:
    """Everything the demo measures; returns the numbers (``legofx demo`` prints them)."""
    budget = budget or Budget()
    data = digits(seed=seed)
    x_test, y_test = data[2], data[3]
    torch.manual_seed(seed)
    dense = train(cnn(), data, budget, "dense CNN", quiet, seed)
    torch.manual_seed(seed)
    scratch = train(transform(cnn(), o=2, m=0.5), data, budget, "Lego (from scratch)", quiet, seed)
    tuned_budget = Budget(**{**budget.__dict__, "epochs": max(1, budget.epochs // 4), "lr": budget.lr / 5,
                             "warmup": 0.0})
    started = transform(dense, o=2, m=0.5, init="weights")
    start_accuracy = accuracy(started, x_test, y_test)
    recalibrate_batchnorm(started, data[0].split(budget.batch))
    recalibrated_accuracy = accuracy(started, x_test, y_test)
    tuned = train(started, data, tuned_budget, "Lego (from dense weights)", quiet, seed)
    results = {"budget": asdict(budget), "tuned_budget": asdict(tuned_budget),
               "start_accuracy": start_accuracy,
               "recalibrated_accuracy": recalibrated_accuracy}
    folded = {"scratch": fold(scratch.eval()), "tuned": fold(tuned.eval())}
    sample = x_test[:1]
    for name, model in {"dense": dense, "scratch": scratch, "tuned": tuned}.items():
        inference = folded.get(name, model)
        results[name] = {
            "accuracy": accuracy(inference, x_test, y_test),
            "conv_params": inference_conv_params(inference),
            "macs": network_macs(model, sample),
        }
        if name in folded:
            with torch.no_grad():
                results[name]["fold_error"] = relative_error(inference(x_test), model(x_test))
    if export_dir is not None:
        from legofx.deploy.exporter import export

        exported = export(folded["scratch"], (x_test[:8],), f"{export_dir}/lego_digits.onnx")
        results["export"] = {"path": str(exported.path), "max_error": exported.max_error}
    return results
