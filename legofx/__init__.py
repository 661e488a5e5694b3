"""legofx: rewrite PyTorch models' convolutions into LegoNet layers with torch.fx.

``transform`` (train) -> ``fold`` (deploy); ``summary`` and ``report`` say what was done.
"""

from legofx.lego import transform
from legofx.lego_layers import FoldedLegoConv2d, LegoConv2d
from legofx.records import LayerRecord, summary
from legofx.report import report
from legofx.rewrite import fold
from legofx.tracing import TraceError

__all__ = [
    "FoldedLegoConv2d",
    "LayerRecord",
    "LegoConv2d",
    "TraceError",
    "fold",
    "report",
    "summary",
    "transform",
]
__version__ = "0.1.0"
