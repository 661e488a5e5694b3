"""Pass: expand ``call_module`` nodes of rewritten layers into the explicit ops of their math.

A module takes part by defining ``compute(x, attr, stage)``:

- ``x`` is its single input,
- ``attr(name)`` returns the tensor attribute ``name`` of the module (or ``None``),
- ``with stage("split"): ...`` names the role of the ops computed inside the block.

Run eagerly, ``forward(x)`` is ``compute(x, partial(getattr, self), nullcontext-stage)``.
Here ``compute`` runs on ``torch.fx`` proxies instead, so each op becomes a node of the parent
graph right where the call was. Attributes become ``get_attr`` nodes under the module's
qualified name (``layer1.0.conv1.lego``), so parameters keep readable state_dict keys and a
module called several times shares them. Every new node is named ``<call>_<role>`` and tagged
``node.meta[REGION_KEY] = {"layer", "call", "role"}``; :func:`passes.collapse_regions` uses the
tags to undo the expansion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.fx as fx
from torch import nn
from torch.fx.proxy import GraphAppendingTracer, Proxy

REGION_KEY = "legofx_region"


def region_of(node: fx.Node) -> dict | None:
    """The region tag of ``node`` (``{"layer", "call", "role"}``) or ``None``."""
    return node.meta.get(REGION_KEY)


class _RegionTracer(GraphAppendingTracer):
    """Appends nodes to a graph, naming and tagging each with the current role."""

    def __init__(self, graph: fx.Graph, layer: str, call: str) -> None:
        super().__init__(graph)
        self.layer, self.call, self.role = layer, call, "param"

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind != "get_attr":  # ops are named by role; fx makes repeated names unique
            name = f"{self.call}_{self.role}"
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[REGION_KEY] = {"layer": self.layer, "call": self.call, "role": self.role}
        return node

    @contextmanager
    def stage(self, role: str) -> Iterator[None]:
        outer, self.role = self.role, role
        try:
            yield
        finally:
            self.role = outer


def _single_input(node: fx.Node) -> fx.Node:
    inputs = [*node.args, *node.kwargs.values()]
    if len(inputs) != 1 or not isinstance(inputs[0], fx.Node):
        raise ValueError(
            f"cannot inline call {node.name!r} of {node.target!r}: expected exactly one "
            f"tensor input, got args={node.args!r} kwargs={node.kwargs!r}"
        )
    return inputs[0]


def _inline_call(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    graph = gm.graph
    tracer = _RegionTracer(graph, node.target, node.name)
    attrs: dict[str, Proxy | None] = {}

    def attr(name: str) -> Proxy | None:
        if name not in attrs:
            value = getattr(module, name)
            attrs[name] = (
                None
                if value is None
                else tracer.create_proxy("get_attr", f"{node.target}.{name}", (), {},
                                         name=f"{node.name}_{name}")
            )
        return attrs[name]

    with graph.inserting_before(node):
        x = Proxy(_single_input(node), tracer)
        out = module.compute(x, attr, tracer.stage)
    node.replace_all_uses_with(out.node, propagate_meta=False)
    graph.erase_node(node)


def inline_modules(
    gm: fx.GraphModule, select: Callable[[str, nn.Module], bool]
) -> fx.GraphModule:
    """Expand every ``call_module`` node whose module ``select(name, module)`` accepts.

    Works in place and returns ``gm`` (linted and recompiled).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if select(node.target, module):
            _inline_call(gm, node, module)
    gm.graph.lint()
    gm.recompile()
    return gm
