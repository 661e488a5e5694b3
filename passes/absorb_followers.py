"""Pass: fold a module or function call into the module call before it (``conv -> bn`` becomes
``conv``, ``conv -> relu`` a conv that applies the ReLU)."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn


def absorb_followers(gm: fx.GraphModule,
                     absorb: Callable[[str, nn.Module, str, object], bool]) -> list[tuple[str, str]]:
    """Remove every node ``B`` that ``absorb`` folds into the ``call_module`` node ``A`` before it.

    ``B`` is a ``call_module`` node whose only argument is ``A``'s output, or a
    ``call_function`` node whose first argument is ``A``'s output and whose other arguments are
    constants (``F.relu(x, inplace=True)``). Candidates: ``B`` is ``A``'s only user and ``A``'s
    module is called nowhere else in the graph (folding into a shared module would change its
    other calls). ``absorb(a_name, a_module, b_name, b)`` decides (``b``: ``B``'s module, or
    its function, named by the node), and when it returns True it has changed ``a_module`` in
    place to compute ``B(A(x))``; ``B``'s node then goes and its users take ``A``'s output.
    ``B``'s module is replaced by ``nn.Identity`` in ``gm`` once no node calls it or reads its
    attributes (its parameters leave the state_dict; eager code that still calls it, such as a
    traced module's source ``forward``, then computes ``A`` once, with ``B`` inside).
    Returns the ``(a_name, b_name)`` pairs folded, in graph order.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        first = _follows(node)
        if first is None or first.op != "call_module" or len(first.users) != 1 \
                or calls[first.target] != 1:
            continue
        is_module = node.op == "call_module"
        b_name, b = ((node.target, gm.get_submodule(node.target)) if is_module
                     else (node.name, node.target))
        if not absorb(first.target, gm.get_submodule(first.target), b_name, b):
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        if is_module:
            calls[node.target] -= 1
            if not _referenced(gm, node.target):
                gm.set_submodule(node.target, nn.Identity().train(b.training))
        folded.append((first.target, b_name))
    if folded:
        gm.recompile()
    return folded


def _follows(node: fx.Node) -> fx.Node | None:
    """The node ``node`` applies to, when it is a candidate ``B`` (see :func:`absorb_followers`)."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        first = node.args[0]
    elif node.op == "call_function" and node.args:
        first, others = node.args[0], []
        fx.node.map_arg((node.args[1:], node.kwargs), others.append)
        if others:  # a second tensor input: not a function of A's output alone
            return None
    else:
        return None
    return first if isinstance(first, fx.Node) else None


def _referenced(gm: fx.GraphModule, target: str) -> bool:
    return any(node.op in ("call_module", "get_attr")
               and (node.target == target or node.target.startswith(target + "."))
               for node in gm.graph.nodes)
