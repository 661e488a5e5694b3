"""The training script that ``tests/test_workflow_distributed.py`` launches with torchrun:

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/distributed_worker.py \
        --mode ddp|fsdp --out DIR

Each rank trains a transformed torchvision ResNet-18 (float64, 32x32 inputs, 10 classes) on its
half of every global batch of ``GLOBAL_BATCH`` generated images (``DistributedSampler``), with
``balance_loss`` during the warm-up and ``legofx.freeze_selection`` on every rank before step
``FREEZE_AT``, then writes what the test checks to ``DIR``:

- ``ddp``: ``DistributedDataParallel``; each rank's ``state_dict``; rank 0's checkpoint
  (``ckpt.pt``, the plain ``state_dict``) and its eval-mode output on a probe batch.
- ``fsdp``: FSDP2, ``fully_shard`` on every residual block, then on the root; the mean loss of
  every step, every layer's selection after every step, the full parameters (``full_tensor()``),
  a full checkpoint (``get_model_state_dict(full_state_dict=True)``) and its eval-mode output.

:func:`reference` is the single-process run the test compares with: the same initial weights,
the same global batches, one backward of the mean of the two halves' losses per step (the
gradient DDP's all-reduce and FSDP2's reduce-scatter average). The halves are kept apart because
BatchNorm normalises each rank's own batch.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import legofx

WORLD, GLOBAL_BATCH, STEPS, FREEZE_AT, SIZE, CLASSES = 2, 4, 4, 2, 32, 10
LR, BALANCE = 0.01, 1e-2


def build(seed: int = 0) -> torch.nn.Module:
    """The transformed model every run starts from (``seed`` picks the initial weights)."""
    torch.manual_seed(seed)
    return legofx.transform(torchvision.models.resnet18(num_classes=CLASSES).double(), o=2, m=0.5)


def local_batches(rank: int) -> list:
    """Rank ``rank``'s half of every global batch, as ``DistributedSampler`` splits it."""
    g = torch.Generator().manual_seed(1234)
    n = STEPS * GLOBAL_BATCH
    data = TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64),
                         torch.randint(0, CLASSES, (n,), generator=g))
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(0)
    return list(DataLoader(data, batch_size=GLOBAL_BATCH // WORLD, sampler=sampler))


def probe() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


def step_loss(model, batches, step: int) -> torch.Tensor:
    """The loss of one step on ``batches`` (one or several halves; their mean)."""
    losses = [F.cross_entropy(model(x), y) for x, y in batches]
    loss = sum(losses) / len(losses)
    if step < FREEZE_AT:
        loss = loss + BALANCE * legofx.balance_loss(model)
    return loss


def selections(model) -> dict:
    return {name: layer.selection() for name, layer in model.named_modules()
            if isinstance(layer, legofx.LegoConv2d)}


def mean_over_ranks(loss: torch.Tensor) -> float:
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return total.item() / WORLD


def frozen(model) -> list[bool]:
    return [layer.frozen for layer in model.modules() if isinstance(layer, legofx.LegoConv2d)]


def reference() -> dict:
    """The single-process run (see the module docstring). Run it with the ranks' thread count
    (one): this tiny ResNet amplifies rounding differences strongly (see the test module)."""
    model = build(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    halves = [local_batches(rank) for rank in range(WORLD)]
    losses, chosen = [], []
    for step in range(STEPS):
        if step == FREEZE_AT:
            legofx.freeze_selection(model)
        loss = step_loss(model, [half[step] for half in halves], step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        chosen.append(selections(model))
    return {"model": model, "losses": losses, "selections": chosen,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def train_ddp(rank: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    gm = build(seed=rank)  # different initialisations: DDP broadcasts rank 0's
    ddp = DistributedDataParallel(gm)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    batches = local_batches(rank)
    losses = []
    for step in range(STEPS):
        if step == FREEZE_AT:
            legofx.freeze_selection(ddp)  # every rank, same step
        x, y = batches[step]
        loss = F.cross_entropy(ddp(x), y)
        if step < FREEZE_AT:
            loss = loss + BALANCE * legofx.balance_loss(ddp)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mean_over_ranks(loss))
    torch.save({"params": {k: v.detach().clone() for k, v in gm.named_parameters()},
                "selections": selections(gm), "frozen": frozen(gm),
                "losses": losses}, f"{out}/rank{rank}.pt")
    if rank == 0:
        torch.save(gm.state_dict(), f"{out}/ckpt.pt")
        gm.eval()
        with torch.no_grad():
            torch.save(gm(probe()), f"{out}/output.pt")


def train_fsdp(rank: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = build(0)  # the same initial weights on every rank, as the reference's
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    batches = local_batches(rank)
    losses, chosen = [], []
    for step in range(STEPS):
        if step == FREEZE_AT:
            legofx.freeze_selection(model)  # every rank, same step (it gathers the proxies)
        loss = step_loss(model, [batches[step]], step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mean_over_ranks(loss))
        chosen.append(selections(model))  # collective: on every rank
    full = {k: v.full_tensor() for k, v in model.named_parameters()}  # collective
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    done = frozen(model)
    model.eval()
    with torch.no_grad():  # a forward of a sharded model is collective: on every rank
        output = model(probe())
    if rank == 0:
        torch.save({"losses": losses, "selections": chosen, "params": full, "frozen": done},
                   f"{out}/fsdp.pt")
        torch.save(state, f"{out}/ckpt.pt")
        torch.save(output, f"{out}/output.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        rank = torch.distributed.get_rank()
        assert torch.distributed.get_world_size() == WORLD
        (train_ddp if args.mode == "ddp" else train_fsdp)(rank, args.out)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if os.environ.get("LOCAL_RANK") is None:
        raise SystemExit("launch with: python -m torch.distributed.run --nproc_per_node 2 "
                         "--standalone tests/distributed_worker.py --mode ddp|fsdp --out DIR")
    main()
