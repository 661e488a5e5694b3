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
    ``get_attr`` nodes that read one of its tensors directly (``F.conv2d(x, self.conv.weight)``).
    A module with neither is never run by the traced forward.
    """

    name: str
    module: nn.Module | None
    calls: list[fx.Node] = field(default_factory=list)
    attribute_reads: list[fx.Node] = field(default_factory=list)


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
                uses[owner].attribute_reads.append(node)
    return list(uses.values())
