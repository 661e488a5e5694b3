"""Pass: replace submodules of a GraphModule by qualified name, keeping the graph as it is."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def swap_modules(gm: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Put ``replacements[name]`` at ``name`` in ``gm`` (in place) and return ``gm``.

    The new module takes the old one's place in the module tree, so its parameters are named
    under the old qualified name (``layer1.0.conv1.lego``) and every graph node that called
    the old module now calls the new one. ``gm`` may also be a plain module whose forward
    runs eagerly: its code then calls the new module in the old one's place.
    """
    for name, module in replacements.items():
        gm.get_submodule(name)  # raises AttributeError naming the missing path
        gm.set_submodule(name, module)
    return gm  # generated code looks modules up by name when it runs: no recompile needed
