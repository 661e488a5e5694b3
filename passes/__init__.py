"""torch.fx passes used by legofx: each takes a ``GraphModule`` and returns it (or facts about it).

The passes know nothing about LegoNet or Structured Convolutions. A rewritten layer is any
module with a ``compute(x, attr, stage)`` method (see :mod:`passes.inline_modules`); the math
lives in :mod:`legofx`, which imports this package and never the other way round.

One pass per file:

- :func:`module_uses` (``find_modules``): where each submodule of a type is called or read.
- :func:`swap_modules` (``swap_modules``): replace submodules by qualified name.
- :func:`inline_modules` (``inline_modules``): expand calls of rewritten layers into explicit,
  tagged nodes (split / Lego conv / merge ...).
- :func:`collapse_regions` (``collapse_regions``): the inverse: turn tagged regions back into
  one ``call_module`` node each.
- :func:`absorb_followers` (``absorb_followers``): fold a module or function call into the
  module call before it (a BatchNorm or a ReLU into the layer that feeds it), as a given
  function decides.
"""

from legofx.passes.absorb_followers import absorb_followers
from legofx.passes.collapse_regions import collapse_regions
from legofx.passes.find_modules import ModuleUse, module_uses
from legofx.passes.inline_modules import REGION_KEY, inline_modules, region_of
from legofx.passes.swap_modules import swap_modules

__all__ = [
    "REGION_KEY",
    "absorb_followers",
    "ModuleUse",
    "collapse_regions",
    "inline_modules",
    "module_uses",
    "region_of",
    "swap_modules",
]
