"""A representative subset of the model-zoo sweep (``benchmarks/zoo.py``), run in CI.

It covers every torchvision task (classification, detection, segmentation, video, optical
flow) and timm families that plain ``torch.fx.symbolic_trace`` cannot trace (data-dependent
control flow, ``int()`` / ``len()`` of proxies, ``Conv2dSame`` and weight-standardised convs,
stochastic depth that branches on ``self.training``). The full sweep is a benchmark command.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
zoo = pytest.importorskip("zoo")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

SUBSET = [
    "torchvision:googlenet",                              # train-mode aux outputs
    "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",  # detection: untraceable root
    "torchvision:lraspp_mobilenet_v3_large",              # segmentation
    "torchvision:r3d_18",                                 # video (Conv3d only)
    "torchvision:raft_small",                             # optical flow: untraceable root
    "timm:tf_efficientnet_b0",                            # Conv2dSame (generated weights)
    "timm:mobilevit_xxs",                                 # data-dependent control flow
    "timm:efficientvit_b0",                               # data-dependent control flow
    "timm:nest_tiny",                                     # int(proxy), stochastic depth
    "timm:hiera_tiny_224",                                # len(proxy), optional mask
    "timm:crossvit_tiny_240",                             # untraceable root
]


@pytest.mark.parametrize("spec", SUBSET)
def test_zoo_model_passes(spec):
    result = zoo.run_model(spec, o=2, m=0.5, export=spec.startswith("timm:"))
    assert result.passed, f"{spec}: {result.failure}\n{result.skipped_reasons.get('traceback', '')}"
    assert result.train_ok
    assert result.fold_error < zoo.FOLD_TOLERANCE
    assert result.rewritten >= zoo.MIN_COVERAGE * result.eligible
    if spec.startswith("timm:"):
        assert result.export == "ok", result.export
