"""legofx: rewrite PyTorch models' convolutions into LegoNet layers with torch.fx.

``transform`` (train) -> ``fold`` (deploy); ``summary`` and ``report`` say what was done.
"""

from legofx.deploy import check_ops, compile, export
from legofx.lego import transform
from legofx.lego_layers import FoldedLegoConv2d, LegoConv2d
from legofx.records import LayerRecord, summary
from legofx.report import report
from legofx.rewrite import fold
from legofx.structure import structural_loss, structure
from legofx.structured_layers import StructuredConv2d
from legofx.tracing import TraceError
from legofx.training import (
    balance_loss, freeze_selection, recalibrate_batchnorm, unfreeze_selection,
)

__all__ = [
    "FoldedLegoConv2d",
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
    "structural_loss",
    "structure",
    "summary",
    "transform",
    "unfreeze_selection",
]
__version__ = "0.1.0"
