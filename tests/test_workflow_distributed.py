"""Distributed workflows of a transformed torchvision ResNet-18, end to end:

- **DDP with torchrun** (2 processes, gloo, CPU): train, ``freeze_selection`` on every rank
  midway, checkpoint on rank 0, reload into a fresh ``transform`` in this process.
- **FSDP2** (``fully_shard`` on every residual block, then the root; 2 processes, gloo, CPU):
  train with ``balance_loss`` and ``freeze_selection`` on the sharded model, compare the loss
  trajectory, every step's selections and the full parameters with a single-process run,
  reload the full checkpoint.
- **Hooks under torch.compile**: forward hooks on ``layer4`` and on a rewritten conv, and a full
  backward hook, registered after ``transform``, fire in a compiled model as in eager.

The training script is ``tests/distributed_worker.py`` (launched as ``python -m
torch.distributed.run --nproc_per_node 2 --standalone``, which rendezvouses on localhost at a free
port); its :func:`reference` is the single-process run.

Tolerances. The runs are in float64 so that the only differences between the two processes and
the single process are rounding (the order of the gradient reductions and of the ranks' sums).
Measured: losses bitwise equal, parameters within 6e-14 (largest entries ~10), selections equal;
we allow 1e-9. The reference must use the ranks' thread count (one): this tiny ResNet (batch 2
per BatchNorm, 1x1 maps in ``layer4``) amplifies rounding strongly, and with two threads the
losses already differ by 8e-11 after one step and by O(1) after four; that is the network, not
legofx. Reloaded checkpoints compute the same function as the model that saved them (1e-12,
TOL64: same weights, this process's thread count may differ).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import distributed_worker as worker
import legofx
from legofx.testing import TOL32, TOL64, relative_error

HERE = Path(__file__).resolve().parent
TORCHRUN_TIMEOUT = 300
PARAMETER_TOL = 1e-9


def torchrun(mode: str, out: Path) -> None:
    """``tests/distributed_worker.py --mode MODE`` on 2 processes; fails with their output."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent),
                                                        os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", str(HERE / "distributed_worker.py"), "--mode", mode,
               "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT)
    assert done.returncode == 0, (f"torchrun {mode} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-12000:]}")


@pytest.fixture(scope="module")
def reference():
    """The single-process run, with the ranks' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return worker.reference()
    finally:
        torch.set_num_threads(threads)


def assert_close_parameters(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        error = (actual[name].double() - value.double()).abs().max().item()
        assert error <= PARAMETER_TOL, f"{name} differs by {error:.3g}"


def assert_losses(actual: list, expected: list) -> None:
    assert len(actual) == len(expected) == worker.STEPS
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= PARAMETER_TOL * max(1.0, abs(e)), f"step {step}: {a} != {e}"


def reloaded(path: Path) -> torch.nn.Module:
    """A fresh transform (other initial weights) with the checkpoint at ``path`` loaded."""
    model = worker.build(seed=1)
    model.load_state_dict(torch.load(path), strict=True)
    return model.eval()


def assert_selections(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and len(expected) == 19  # all but the 3-channel stem
    for name, chosen in expected.items():
        assert torch.equal(actual[name], chosen), f"{name}: selection differs"


def test_ddp_torchrun_freeze_checkpoint_reload(tmp_path, reference):
    torchrun("ddp", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in ranks[0]["params"].items():  # DDP keeps the ranks identical
        assert torch.equal(value, ranks[1]["params"][name]), f"{name} differs between ranks"
    assert_selections(ranks[1]["selections"], ranks[0]["selections"])
    assert all(ranks[0]["frozen"]) and all(ranks[1]["frozen"])
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # ... and equal to one process training on the whole global batches
    assert_losses(ranks[0]["losses"], reference["losses"])
    assert_close_parameters(ranks[0]["params"], reference["params"])
    assert_selections(ranks[0]["selections"], reference["selections"][-1])
    # rank 0's checkpoint, loaded into a fresh transform, is rank 0's model
    model = reloaded(tmp_path / "ckpt.pt")
    with torch.no_grad():
        assert relative_error(model(worker.probe()), torch.load(tmp_path / "output.pt")) <= TOL64
    assert all(worker.frozen(model))
    assert_selections(worker.selections(model), ranks[0]["selections"])


def test_fsdp2_per_block_matches_single_process(tmp_path, reference):
    torchrun("fsdp", tmp_path)
    run = torch.load(tmp_path / "fsdp.pt")
    assert_losses(run["losses"], reference["losses"])
    for step in range(worker.STEPS):  # freeze_selection on the sharded model froze these
        assert_selections(run["selections"][step], reference["selections"][step])
    first, frozen_at = run["selections"][0], run["selections"][worker.FREEZE_AT - 1]
    assert any(not torch.equal(first[k], frozen_at[k]) for k in first)  # learned, then frozen
    assert all(run["frozen"]) and len(run["frozen"]) == 19
    for later in run["selections"][worker.FREEZE_AT:]:
        assert_selections(later, frozen_at)
    assert_close_parameters(run["params"], reference["params"])
    # the full checkpoint (get_model_state_dict(full_state_dict=True)) reloads unsharded
    model = reloaded(tmp_path / "ckpt.pt")
    with torch.no_grad():
        assert relative_error(model(worker.probe()), torch.load(tmp_path / "output.pt")) <= TOL64
    assert all(worker.frozen(model))
    assert_selections(worker.selections(model), frozen_at)


def hooked_resnet(train: bool):
    """A transformed ResNet-18 with forward hooks on ``layer4`` and ``layer1[0].conv1`` (a
    rewritten conv) and a full backward hook on ``layer4``, all registered after transform."""
    torch.manual_seed(0)
    model = legofx.transform(torchvision.models.resnet18(num_classes=10), o=2, m=0.5)
    assert isinstance(model.layer1[0].conv1, legofx.LegoConv2d)
    seen = {"layer4": [], "conv1": [], "grad": []}
    model.layer4.register_forward_hook(lambda m, a, out: seen["layer4"].append(out.detach()))
    model.layer1[0].conv1.register_forward_hook(lambda m, a, out: seen["conv1"].append(out.detach()))
    if train:
        model.layer4.register_full_backward_hook(
            lambda m, grad_in, grad_out: seen["grad"].append(grad_out[0].detach()))
    return model.train(train), seen


def test_forward_hooks_fire_under_torch_compile_inductor():
    """Inductor, eval mode: both forward hooks fire in the compiled model, and its output and
    what the hooks see equal eager's to float32 rounding (TOL32; measured largest differences
    1.2e-8 on the output, 4.8e-7 on the conv's). ``fullgraph=True``: the hooks are captured in
    the one graph, no graph break."""
    model, seen = hooked_resnet(train=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
        assert [len(seen["layer4"]), len(seen["conv1"])] == [1, 1]
        compiled = torch.compile(model, fullgraph=True)(x)
    assert [len(seen["layer4"]), len(seen["conv1"])] == [2, 2]
    assert relative_error(compiled, eager) <= TOL32
    for name in ("layer4", "conv1"):
        assert relative_error(seen[name][1], seen[name][0]) <= TOL32


def test_full_backward_hook_fires_under_torch_compile():
    """Training mode, forward and backward: the forward hooks and the full backward hook on
    ``layer4`` fire in the compiled model with eager's values. The backend is ``aot_eager``
    (dynamo captures the hooks and the joint graph as for inductor; inductor's code generation
    for this backward took 189 s on the 2-core machine, too long for the suite); measured:
    bitwise equal, asserted to TOL32. A full backward hook splits dynamo's capture into 3 graphs
    ("Module-level backwards hooks require compiled autograd"), as for the original ResNet-18."""
    model, seen = hooked_resnet(train=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert [len(seen[k]) for k in ("layer4", "conv1", "grad")] == [1, 1, 1]
    torch.compile(model, backend="aot_eager")(x).sum().backward()
    assert [len(seen[k]) for k in ("layer4", "conv1", "grad")] == [2, 2, 2]
    for name in ("layer4", "conv1", "grad"):
        assert relative_error(seen[name][1], seen[name][0]) <= TOL32
    for name, grad in eager_grads.items():
        assert relative_error(model.get_parameter(name).grad, grad) <= TOL32, name


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
