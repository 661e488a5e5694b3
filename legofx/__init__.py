"""legofx: rewrite PyTorch models' convolutions into LegoNet layers with torch.fx.

``transform`` (train) -> ``fold`` (deploy); ``summary`` and ``report`` say what was done.
The packages, lowest first: ``core`` (layer contract, geometry, records, arguments), ``passes``
(torch.fx passes), ``fx`` (tracing, the rewrite driver), ``lowering`` (registry, ``fold``,
``auto``), ``methods.lego`` / ``methods.structured``, ``deploy`` and ``report``, ``demo``,
``cli``; ``testing`` for users' own property tests. docs/architecture.md has the picture.
"""

from legofx.checkpoint import restore, save
from legofx.core.records import LayerRecord, summary
from legofx.deploy import check_ops, compile, export
from legofx.fx.interface import InterfaceError
from legofx.fx.tracing import TraceError
from legofx.lowering.fold import fold
from legofx.methods.lego.api import transform
from legofx.methods.lego.layers import FoldedLegoConv2d, LegoConv2d
from legofx.methods.lego.training import (
    balance_loss, freeze_selection, recalibrate_batchnorm, unfreeze_selection,
)
from legofx.methods.structured.api import structural_loss, structure
from legofx.methods.structured.layers import StructuredConv2d
from legofx.report import report

__all__ = [
    "FoldedLegoConv2d",
    "InterfaceError",
    "LayerRecord",
    "LegoConv2d",
    "StructuredConv2d",
    "TraceError",
    "balance_loss",
    "check_ops",
    "compile",
    "export",
    "fold",
    "freeze_selection",
    "recalibrate_batchnorm",
    "report",
    "restore",
    "save",
    "structural_loss",
    "structure",
    "summary",
    "transform",
    "unfreeze_selection",
]
from legofx.core.version import VERSION as __version__  # noqa: E402
