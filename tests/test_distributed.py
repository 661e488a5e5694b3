"""A transformed model trains under DistributedDataParallel (2 processes, gloo on CPU): after
several steps both ranks hold identical parameters, buffers and selections, without a freeze,
with a freeze on every rank in the middle, and with a freeze on rank 0 only."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import legofx

SCENARIOS = {"no freeze": None, "freeze on every rank": (0, 1), "freeze on rank 0": (0,)}
STEPS, FREEZE_AT = 6, 3


def model():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def train(rank: int, freezers) -> dict:
    torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
    gm = legofx.transform(model(), o=2, m=0.5)
    ddp = DistributedDataParallel(gm)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    data = torch.Generator().manual_seed(100 + rank)  # different batches on each rank
    selections = []
    for step in range(STEPS):
        if freezers is not None and step == FREEZE_AT and rank in freezers:
            legofx.freeze_selection(ddp)
        x = torch.randn(4, 2, 6, 6, generator=data)
        y = torch.randint(0, 3, (4,), generator=data)
        loss = F.cross_entropy(ddp(x), y) + 1e-2 * legofx.balance_loss(ddp)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        selections.append({n: m.selection() for n, m in gm.named_modules()
                           if isinstance(m, legofx.LegoConv2d)})
    ddp.eval()
    with torch.no_grad():  # DDP broadcasts rank 0's buffers (BN statistics) at each forward
        ddp(torch.zeros(1, 2, 6, 6))
    return {"state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
            "selections": selections}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: train(rank, freezers) for name, freezers in SCENARIOS.items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical_with_and_without_a_freeze(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, freezers in SCENARIOS.items():
        first, second = ranks[0][name], ranks[1][name]
        assert first["state"].keys() == second["state"].keys()
        for key, value in first["state"].items():
            assert torch.equal(value, second["state"][key]), f"{name}: {key} differs between ranks"
        for step in range(STEPS):
            for layer, chosen in first["selections"][step].items():
                assert torch.equal(chosen, second["selections"][step][layer])
        frozen = [v for k, v in first["state"].items() if k.endswith(".frozen_selection")]
        assert len(frozen) == 2 and all(bool((v.amax(-1) > 0).all()) == (freezers is not None)
                                        for v in frozen)
        if freezers is not None:  # the selection never moves after the freeze
            after = first["selections"][FREEZE_AT:]
            assert all(torch.equal(s[layer], after[0][layer]) for s in after for layer in s)
