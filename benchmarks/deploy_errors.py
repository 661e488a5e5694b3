"""ONNX Runtime (CPU) vs PyTorch on folded models: the errors the README quotes.

    python benchmarks/deploy_errors.py               # resnet18 fp32 + fp16, 30 generated networks
    python benchmarks/deploy_errors.py --networks 0  # resnet18 only

Errors are max|ONNX Runtime - PyTorch| / max|PyTorch| over the output, at the example batch and
twice it (``legofx.export``'s own check); Lego selections and coefficients are random (not the
balanced start), the input is 224x224 for resnet18.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import legofx
from legofx.testing import networks, randomize_lego


def folded(model, seed=1):
    gm = legofx.transform(model.eval(), o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(seed))
    return legofx.fold(gm.eval())


def resnet18(folder: Path) -> None:
    torch.manual_seed(0)
    model = folded(torchvision.models.resnet18())
    x = torch.randn(1, 3, 224, 224)
    for dtype in (torch.float32, torch.float16):
        result = legofx.export(model.to(dtype), x.to(dtype), folder / f"r18_{dtype}.onnx")
        print(f"resnet18 {dtype}: {result}")


def generated(folder: Path, count: int) -> None:
    worst = []

    @given(data=st.data())
    @settings(max_examples=count, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(data):
        net, x = data.draw(networks(dtype=torch.float32, data_dependent=False))
        result = legofx.export(folded(net), x, folder / "net.onnx", check=None)
        worst.append((result.max_error, result.max_abs_error))

    run()
    print(f"{len(worst)} generated networks, float32: worst max error {max(worst)[0]:.2e} of the "
          f"output scale (abs {max(w[1] for w in worst):.2e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--networks", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        resnet18(Path(folder))
        if args.networks:
            generated(Path(folder), args.networks)
