"""Analysis pass: where the graph calls, or reads the tensors of, the submodules with given names."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn


@dataclass
class ModuleUse:
    """How one submodule is used by a graph.

    ``module`` is the graph module's submodule at ``name`` (``None`` when the trace kept no such
    module). ``calls`` are the ``call_module`` nodes that run it; ``attribute_reads`` are
    ``get_attr`` nodes that read one of its tensors directly (``F.conv2d(x, self.conv.weight)``);
    ``metadata_reads`` are ``get_attr`` nodes used only for a tensor's metadata
    (``self.conv.weight.dtype``, ``.device``, ``.shape``), which any tensor of the same
    dtype, device and shape answers. A module with none of them is never run by the traced
    forward.
    """

    name: str
    module: nn.Module | None
    calls: list[fx.Node] = field(default_factory=list)
    attribute_reads: list[fx.Node] = field(default_factory=list)
    metadata_reads: list[fx.Node] = field(default_factory=list)


METADATA = frozenset({"dtype", "device", "shape", "is_cuda", "ndim"})


def _metadata_only(node: fx.Node) -> bool:
    return bool(node.users) and all(
        user.op == "call_function" and user.target is getattr and user.args[1] in METADATA
        for user in node.users)


def module_uses(gm: fx.GraphModule, names: Iterable[str]) -> list[ModuleUse]:
    """A :class:`ModuleUse` for each of ``names``, in the order given."""
    modules = dict(gm.named_modules())
    uses = {name: ModuleUse(name, modules.get(name)) for name in names}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in uses:
            uses[node.target].calls.append(node)
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            if owner in uses:
                kind = "metadata_reads" if _metadata_only(node) else "attribute_reads"
                getattr(uses[owner], kind).append(node)
    return list(uses.values())
