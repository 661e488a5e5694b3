"""Pass: turn each tagged region (see :mod:`passes.inline_modules`) back into one module call."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

from legofx.passes.inline_modules import region_of


def _regions(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    regions: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        tag = region_of(node)
        if tag is not None:
            regions.setdefault(tag["call"], []).append(node)
    return regions


def _boundary(call: str, nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node]:
    inside = set(nodes)
    inputs = {i for n in nodes for i in n.all_input_nodes if i not in inside}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"region {call!r} cannot be collapsed: it must have one input and one output, "
            f"found inputs {sorted(i.name for i in inputs)} and outputs "
            f"{[o.name for o in outputs]} (was the graph edited by hand?)"
        )
    return inputs.pop(), outputs[0]


def collapse_regions(
    gm: fx.GraphModule, select: Callable[[str, nn.Module], bool] = lambda name, mod: True
) -> fx.GraphModule:
    """Replace every region whose layer module ``select`` accepts by ``call_module(layer, x)``.

    Works in place and returns ``gm`` (linted and recompiled).
    """
    graph = gm.graph
    for call, nodes in _regions(graph).items():
        layer = region_of(nodes[0])["layer"]
        if not select(layer, gm.get_submodule(layer)):
            continue
        source, result = _boundary(call, nodes)
        with graph.inserting_after(result):
            replacement = graph.call_module(layer, (source,))
        result.replace_all_uses_with(replacement, delete_user_cb=lambda user: user is not replacement)
        for node in reversed(nodes):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
