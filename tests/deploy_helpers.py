"""Small folded models and comparisons shared by the deployment tests."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import legofx
from helpers import randomize_lego
from legofx.deploy import TOLERANCES, output_error


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1, bias=False)).eval()


def folded_net(net: nn.Module | None = None, seed: int = 1) -> nn.Module:
    gm = legofx.transform(net if net is not None else small_net(), o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(seed))
    return legofx.fold(gm.eval())


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})[0]


def assert_close(actual, expected: torch.Tensor, dtype=torch.float32) -> float:
    actual = torch.from_numpy(actual) if isinstance(actual, np.ndarray) else actual
    error, _ = output_error(actual, expected)
    assert error <= TOLERANCES[dtype], error
    return error
