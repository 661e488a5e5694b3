"""Training aids from the LegoNet authors' recipe: usage balancing and freezing the selection.

The authors learn the selection ``M`` only during a warm-up (10 of 400 epochs), then freeze
it and keep training the Lego filters and coefficients; while ``M`` is learned, Lego filters
used less than their fair share ``o*n/m`` are pushed up and over-used ones down (weight 1e-4).
Both are done here without hooks in the training loop:

    loss = criterion(gm(x), y) + 1e-4 * legofx.balance_loss(gm)
    ...
    if epoch == warmup:
        legofx.freeze_selection(gm)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from legofx.core.layer import full_tensor
from legofx.core.modes import kept_modes
from legofx.methods.lego.layers import LegoConv2d, selection_onehot


def lego_layers(model: nn.Module) -> list[LegoConv2d]:
    """The training-form Lego layers of ``model`` (also inside a DDP wrapper or a generated
    weight)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, LegoConv2d)]


def _require_layers(model: nn.Module) -> list[LegoConv2d]:
    layers = lego_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no training-form Lego layers: pass the model "
            "legofx.transform returned (not the original, nor a folded one)"
        )
    return layers


def usage(layer: LegoConv2d) -> Tensor:
    """How many (output channel, fragment) pairs use each Lego filter, ``(m,)``,
    differentiable: through the straight-through ``M``, each count's gradient reaches the
    proxies of every pair. Sharded proxies (FSDP2's ``DTensor`` parameters between forwards)
    are gathered whole, differentiably (a collective: call it on every rank); each rank's
    shard then gets its part of the gradient."""
    onehot = selection_onehot(full_tensor(layer.proxy), layer.m,
                              full_tensor(layer.frozen_selection))
    return onehot.sum((0, 1))


def balance_loss(model: nn.Module) -> Tensor:
    """Usage balancing as a loss term: for every Lego layer and Lego filter ``k`` used
    ``u_k`` times with fair share ``t = o*n/m``, ``relu(floor(t) - u_k) + relu(u_k - ceil(t))``.

    Its value is the number of selections outside the fair band (0 when balanced). Its
    gradient is ``-1`` on every proxy entry of an under-used filter and ``+1`` on those of an
    over-used one, so ``1e-4 * balance_loss(model)`` pushes exactly as the authors' training
    loop does (their weight: 1e-4). Frozen layers contribute no gradient.
    """
    total = None
    for layer in _require_layers(model):
        share = layer.out_channels * layer.o / layer.m
        counts = usage(layer)
        term = (torch.relu(math.floor(share) - counts) + torch.relu(counts - math.ceil(share))).sum()
        total = term if total is None else total + term
    return total


def freeze_selection(model: nn.Module) -> int:
    """Fix every Lego layer's selection at its current value; returns how many were frozen.

    From then on the proxies get zero gradients (they still take part in the graph, as
    ``DistributedDataParallel`` requires) and the selection comes from a buffer, so momentum
    or weight decay that still move the proxies cannot change it; ``fold`` uses it. Lego
    filters, coefficients and everything else keep training. Under DDP, call it on every
    rank at the same step (DDP also broadcasts rank 0's buffers at each forward, so calling it
    on rank 0 alone takes effect everywhere at the next step). Under FSDP2 it gathers the
    sharded proxies (a collective): call it on every rank at the same step.
    """
    layers = _require_layers(model)
    for layer in layers:
        layer.freeze()
    return len(layers)


def unfreeze_selection(model: nn.Module) -> int:
    """Let every Lego layer learn its selection again (from its current proxies)."""
    layers = _require_layers(model)
    for layer in layers:
        layer.unfreeze()
    return len(layers)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (an iterable of input
    tensors or argument tuples); returns how many BatchNorm layers were reset.

    Use it after ``transform(model, init="weights")``: the reconstructed filters are close to
    the trained ones but not equal, and the trained statistics no longer match what they
    produce. Nothing is learned (no gradients); the model's training flag is restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {norm: norm.momentum for norm in norms}
    try:
        with kept_modes(model, training=False):
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over all batches
                norm.train()
            for batch in batches:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    return len(norms)
