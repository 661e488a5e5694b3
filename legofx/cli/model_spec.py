"""Build a model from a command-line spec: ``torchvision:NAME``, ``timm:NAME``, ``file.py:factory``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn


def _torchvision(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model {name!r}: {err}") from None
    return model, (1, 3, 224, 224)


def _timm(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    try:
        import timm
    except ImportError:
        raise ImportError("timm models need timm: pip install 'legofx[dev]' or pip install timm") from None
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        raise ValueError(f"unknown timm model {name!r}: {err}") from None
    return model, (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))


def _file(path: str, factory: str) -> tuple[nn.Module, tuple[int, ...]]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ValueError(f"{path!r} has no function {factory!r}")
    model = getattr(module, factory)()
    shape = getattr(model, "example_input_shape", (1, 3, 224, 224))
    return model, tuple(shape)


def build_model(spec: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model named by ``spec`` (random weights) and a default input shape for it."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(
            f"MODEL must look like 'torchvision:resnet18', 'timm:resnet50' or "
            f"'path/to/file.py:factory', got {spec!r}"
        )
    if source == "torchvision":
        return _torchvision(name)
    if source == "timm":
        return _timm(name)
    if source.endswith(".py"):
        return _file(source, name)
    raise ValueError(f"MODEL source must be torchvision, timm or a .py file, got {source!r} in {spec!r}")


def example_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
