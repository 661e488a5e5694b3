"""The fused Lego layer's operator, ``torch.ops.legofx.lego_conv_merge``: how the C kernel is
built and loaded (:mod:`.loader`), the repeated-filter cache (:mod:`.filters`) and the operator
with its autograd (:mod:`.op`)."""

from legofx.methods.lego.kernel.loader import (KERNEL_DTYPES, KernelUnavailable, available, build,
                                              cache_dir, find_compiler, kernel_path, library,
                                              supported_paths)
from legofx.methods.lego.kernel.filters import (WatchedFilters, forget_grouped_weights,
                                               grouped_weight)
from legofx.methods.lego.kernel.op import (lego_conv_merge, reference_conv_merge,
                                           reference_merge)

__all__ = ["KERNEL_DTYPES", "KernelUnavailable", "available", "build", "cache_dir",
           "find_compiler", "forget_grouped_weights", "grouped_weight", "kernel_path",
           "lego_conv_merge", "library", "supported_paths", "reference_conv_merge", "reference_merge",
           "WatchedFilters"]
