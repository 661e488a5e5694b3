"""Pass: replace submodules of a GraphModule by qualified name, keeping the graph as it is."""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx
from torch import nn


def swap_modules(gm: fx.GraphModule, replacements: Mapping[str, nn.Module]) -> fx.GraphModule:
    """Put ``replacements[name]`` at ``name`` in ``gm`` (in place) and return ``gm``.

    The new module takes the old one's place in the module tree, so its parameters are named
    under the old qualified name (``layer1.0.conv1.lego``) and every graph node that called
    the old module now calls the new one.
    """
    for name, module in replacements.items():
        gm.get_submodule(name)  # raises AttributeError naming the missing path
        gm.set_submodule(name, module)
    gm.recompile()
    return gm
