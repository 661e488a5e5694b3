"""Shared test helpers: comparisons, snapshots, and Lego-layer surgery."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import legofx

from legofx.testing import TOL32, TOL64, randomize_lego, relative_error, tolerance  # noqa: F401


def snapshot(model: nn.Module) -> dict:
    """Everything a transform must leave untouched: tensors, module tree, hooks, flags."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(name, type(mod), mod.training) for name, mod in model.named_modules()],
        "hooks": [(name, len(mod._forward_hooks), len(mod._forward_pre_hooks))
                  for name, mod in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["ids"] == before["ids"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


def lego_layers(gm: nn.Module) -> dict[str, legofx.LegoConv2d]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, legofx.LegoConv2d)}


def dense_equivalent(conv: nn.Conv2d, layer: legofx.LegoConv2d) -> nn.Conv2d:
    """A copy of ``conv`` whose weight is the one the Lego layer reconstructs."""
    dense = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                       conv.padding_mode, dtype=conv.weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.reconstruct_weight())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


def reference_merge_weight(lego, onehot, coef):
    """``W[j] = concat_i sum_k M[j,i,k] coef[j,i] B_k`` as a differentiable function of M."""
    return torch.einsum("jik,kchw,ji->jichw", onehot, lego, coef).flatten(1, 2)


def conv_with(conv: nn.Conv2d, x, weight, bias):
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
