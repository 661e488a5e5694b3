"""Pass: fold a module call into the module call before it (``conv -> bn`` becomes ``conv``)."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn


def absorb_followers(gm: fx.GraphModule,
                     absorb: Callable[[str, nn.Module, str, nn.Module], bool]) -> list[tuple[str, str]]:
    """Remove every ``call_module`` node ``B`` that ``absorb`` folds into the node ``A`` before it.

    Candidates: ``B``'s only argument is ``A``'s output, ``B`` is ``A``'s only user and ``A``'s
    module is called nowhere else in the graph (folding into a shared module would change its
    other calls). ``absorb(a_name, a_module, b_name, b_module)`` decides, and when it returns
    True it has changed ``a_module`` in place to compute ``B(A(x))``; ``B``'s node then goes
    and its users take ``A``'s output. ``B``'s module is deleted from ``gm`` once no node calls
    it or reads its attributes. Returns the ``(a_name, b_name)`` pairs folded, in graph order.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        first = node.args[0] if node.op == "call_module" and len(node.args) == 1 else None
        if (isinstance(first, fx.Node) and not node.kwargs and first.op == "call_module"
                and len(first.users) == 1 and calls[first.target] == 1
                and absorb(first.target, gm.get_submodule(first.target),
                           node.target, gm.get_submodule(node.target))):
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            calls[node.target] -= 1
            if not _referenced(gm, node.target):
                gm.delete_submodule(node.target)
            folded.append((first.target, node.target))
    if folded:
        gm.recompile()
    return folded


def _referenced(gm: fx.GraphModule, target: str) -> bool:
    return any(node.op in ("call_module", "get_attr")
               and (node.target == target or node.target.startswith(target + "."))
               for node in gm.graph.nodes)
