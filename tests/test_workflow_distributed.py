"""Distributed workflows of a transformed model (see the tests below)."""

from __future__ import annotations

import copy

import torch

import legofx


def test_balance_loss_on_sharded_proxies(tmp_path):
    """``balance_loss`` of a model whose proxies are sharded (FSDP2 between forwards) gathers
    them: the same value and proxy gradients as unsharded, where it raised ``aten.where.self got
    mixed torch.Tensor and DTensor`` (one process, a mesh of one: DTensor parameters all the same)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = legofx.transform(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(),
                                                 torch.nn.Conv2d(8, 8, 3)), o=2, m=0.5)
    with torch.no_grad():  # all on one Lego filter: unbalanced, so the loss has a gradient
        plain[0].proxy.zero_()[..., 0] = 1.0
    sharded = copy.deepcopy(plain)
    expected = legofx.balance_loss(plain)
    expected.backward()
    assert expected.item() > 0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        assert hasattr(sharded[0].proxy, "full_tensor")  # a DTensor
        loss = legofx.balance_loss(sharded)
        loss.backward()
        assert loss.item() == expected.item()
        for mine, theirs in zip((sharded[0], sharded[2]), (plain[0], plain[2])):
            assert torch.equal(mine.proxy.grad.full_tensor(), theirs.proxy.grad)
        assert legofx.freeze_selection(sharded) == 2
        assert torch.equal(sharded[0].selection(), plain[0].selection())
    finally:
        dist.destroy_process_group()
