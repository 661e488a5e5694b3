"""How far the folded model is from the training form, per lowering, in float64 and float32.

    python benchmarks/fold_errors.py                 # resnet18 + 30 generated networks
    python benchmarks/fold_errors.py --networks 0    # resnet18 only

Errors are max|folded - training form| / max|training form| over the whole output, in eval
mode; Lego selections and coefficients are random (not the balanced start); resnet18 runs a
2x3x224x224 input with random BatchNorm statistics.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tabulate import tabulate

import legofx
from legofx.testing import networks, randomize_lego, relative_error

LOWERINGS = [("gather", False), ("accumulate", False), ("merge-conv", False), ("dense", False),
             ("gather", True)]


def errors(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    gm = legofx.transform(net.eval(), o=2, m=0.5)
    randomize_lego(gm, torch.Generator().manual_seed(1))
    gm.eval()
    with torch.no_grad():
        reference = gm(x)
        return {f"{name}{' + BN fused' if fuse else ''}":
                relative_error(legofx.fold(gm, name, fuse_batchnorm=fuse)(x), reference)
                for name, fuse in LOWERINGS}


def resnet18(dtype: torch.dtype) -> dict[str, float]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return errors(model, torch.randn(2, 3, 224, 224, dtype=dtype))


def generated(dtype: torch.dtype, count: int) -> dict[str, float]:
    worst: dict[str, float] = {}

    @given(data=st.data())
    @settings(max_examples=count, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(data):
        net, x = data.draw(networks(dtype=dtype, data_dependent=False))
        for key, error in errors(net, x).items():
            worst[key] = max(worst.get(key, 0.0), error)

    run()
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", type=int, default=30)
    args = parser.parse_args(argv)
    rows = []
    for dtype in (torch.float64, torch.float32):
        rows.append(["resnet18", str(dtype), *resnet18(dtype).values()])
        if args.networks:
            rows.append([f"worst of {args.networks} generated", str(dtype),
                         *generated(dtype, args.networks).values()])
    headers = ["model", "dtype", *(f"{n}{' + BN fused' if f else ''}" for n, f in LOWERINGS)]
    print(tabulate([[*r[:2], *(f"{e:.1e}" for e in r[2:])] for r in rows], headers,
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
