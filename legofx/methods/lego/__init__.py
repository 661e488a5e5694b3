"""LegoNet (Yang et al., ICML 2019): ``legofx.transform``, the Lego layers, their lowerings
(registered on import) and the training aids."""

from legofx.methods.lego import layers  # noqa: F401  (registers gather and dense)
from legofx.methods.lego.lowerings import accumulate, fused, grouped, merge_conv  # noqa: F401  (register)
