"""Real-library sweep: is the model ``transform`` / ``fold`` return a drop-in replacement?

    python benchmarks/real_models.py                      # every library (~10-20 min on 2 cores)
    python benchmarks/real_models.py --library transformers smp
    python benchmarks/real_models.py --models hf:ResNetForImageClassification
    python benchmarks/real_models.py --report             # re-print the saved summary
    python benchmarks/real_models.py --report --per-model --library monai   # one row per model

Models of ultralytics (YOLOv8/11/10/12, RT-DETR), transformers, diffusers,
segmentation_models_pytorch, torchvision (detection, segmentation, RAFT), MONAI (``--library
monai``), kornia (``kornia``), segment-anything (``sam``), spandrel (``spandrel``) and open_clip
(``open_clip``) are built from their own configs with random weights (nothing is downloaded)
and called the way each library calls them (keywords, ``labels=``, dicts, lists of images or
prompts, targets in train mode). A library that is not installed is reported as skipped, with
its pip command. Per model:

- transform time; convs found / rewritten / skipped, with reasons; eligible convs (every conv
  but grouped ones, ``in_channels % o != 0``, ``m > n``, never called, frozen weights);
- **interface**: every eval call of the original gives the same output types and structure
  (``torch.utils._pytree`` spec, ``ModelOutput`` classes included), shapes and dtypes on the
  transformed and the folded model; the same in train mode on the train call;
- **backward**: a train-mode loss reaches every Lego parameter used in train mode;
- **fold error**: relative error of the folded vs the training form over all eval outputs
  (float64 where the model runs in float64, else float32);
- **export**: ``legofx.export`` of the folded model to ONNX with default arguments, where the
  original itself exports (``--export``; off by default, slow).

A model passes when its original runs and the transformed and folded models answer every call
with the same interface and structure, and every eligible conv is rewritten. Results go to
``benchmarks/results/real_models.jsonl`` / ``.csv`` with a tabulate summary per library and
failures grouped by cause.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import legofx  # noqa: E402
from legofx.core.numerics import relative_error  # noqa: E402
from legofx.fx.interface import InterfaceError, compare_calls  # noqa: E402
from legofx.report import reason_kind  # noqa: E402
from legofx.testing import randomize_lego  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NOT_ELIGIBLE = ("groups=", "divisible by o", "exceeds out_channels", "never called",
                "does not require grad")


@dataclass
class Case:
    """A model and how its library calls it: ``calls`` are eval-mode ``(args, kwargs)``; the
    first is the example call; ``train`` the train-mode call (``None``: no train mode)."""

    name: str
    library: str
    build: object
    calls: list
    train: tuple | None = None
    double: bool = True


@dataclass
class Result:
    model: str
    library: str
    status: str = "fail"
    cause: str = ""
    detail: str = ""
    transform_s: float = 0.0
    convs: int = 0
    eligible: int = 0
    rewritten: int = 0
    skipped_reasons: dict = field(default_factory=dict)
    eval_calls: int = 0
    interface_ok: bool = False
    train_ok: bool | None = None
    backward_ok: bool | None = None
    fold_error: float | None = None
    dtype: str = ""
    export: str = "not run"


# ---- the models --------------------------------------------------------------------------


def _ultralytics(cfg):
    def build():
        from ultralytics import RTDETR, YOLO

        return (RTDETR if cfg.startswith("rtdetr") else YOLO)(cfg).model
    return build


def ultralytics_cases() -> list[Case]:
    cases = []
    for family in ("yolov8n", "yolo11n"):
        for task in ("", "-seg", "-pose", "-cls"):
            cfg = f"{family}{task}.yaml"
            x = torch.randn(2, 3, 64, 64)
            cases.append(Case(f"ultralytics:{family}{task}", "ultralytics", _ultralytics(cfg),
                              [((x,), {})], ((x,), {})))
    x = torch.randn(2, 3, 64, 64)
    for name, cfg in (("yolov10n", "yolov10n.yaml"), ("yolo12n", "yolo12n.yaml"),
                      ("rtdetr-l", "rtdetr-l.yaml")):
        cases.append(Case(f"ultralytics:{name}", "ultralytics", _ultralytics(cfg),
                          [((x,), {})], ((x,), {})))
    return cases


def _hf(cls_name, config_name, **config):
    def build():
        import transformers

        return getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))
    return build


def transformers_cases() -> list[Case]:
    x64, x256 = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 256, 256)
    small_resnet = dict(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1])
    small_convnext = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    families = {
        "ResNet": ("ResNetConfig", small_resnet, x64),
        "ConvNext": ("ConvNextConfig", small_convnext, x64),
        "ConvNextV2": ("ConvNextV2Config", small_convnext, x64),
        "MobileViT": ("MobileViTConfig", {}, x256),
        "MobileViTV2": ("MobileViTV2Config", {}, x256),
        "MobileNetV1": ("MobileNetV1Config", {"depth_multiplier": 0.25}, x64),
        "MobileNetV2": ("MobileNetV2Config", {"depth_multiplier": 0.25}, x64),
        "EfficientNet": ("EfficientNetConfig", {"width_coefficient": 0.25, "hidden_dim": 320,
                                                "depth_coefficient": 0.25, "image_size": 64}, x64),
        "RegNet": ("RegNetConfig", {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                                    "depths": [1, 1, 1, 1], "groups_width": 8}, x64),
        "Swin": ("SwinConfig", {"image_size": 64, "embed_dim": 16, "depths": [1, 1],
                                "num_heads": [1, 2], "window_size": 4}, x64),
        "ViT": ("ViTConfig", {"image_size": 64, "patch_size": 16, "hidden_size": 32,
                              "num_hidden_layers": 2, "num_attention_heads": 2,
                              "intermediate_size": 64}, x64),
    }
    cases = []
    for family, (config, settings, x) in families.items():
        labels = torch.zeros(x.shape[0], dtype=torch.long)
        cases.append(Case(f"hf:{family}Model", "transformers", _hf(f"{family}Model", config, **settings),
                          [((x,), {}), ((x,), {"output_hidden_states": True}),
                           ((x,), {"return_dict": False})], ((x,), {})))
        cases.append(Case(f"hf:{family}ForImageClassification", "transformers",
                          _hf(f"{family}ForImageClassification", config, num_labels=3, **settings),
                          [((x,), {}), ((x,), {"labels": labels}),
                           ((x,), {"output_hidden_states": True}), ((x,), {"return_dict": False})],
                          ((x,), {"labels": labels})))
    seg = torch.zeros(2, 64, 64, dtype=torch.long)
    cases.append(Case("hf:SegformerForSemanticSegmentation", "transformers",
                      _hf("SegformerForSemanticSegmentation", "SegformerConfig", num_labels=3,
                          hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=32),
                      [((x64,), {}), ((x64,), {"labels": seg}), ((x64,), {"return_dict": False})],
                      ((x64,), {"labels": seg})))
    cases.append(Case("hf:UperNetForSemanticSegmentation", "transformers", _upernet,
                      [((x64,), {}), ((x64,), {"labels": seg})], ((x64,), {"labels": seg})))
    cases.append(Case("hf:DPTForDepthEstimation", "transformers", _dpt,
                      [((torch.randn(1, 3, 64, 64),), {})], ((torch.randn(1, 3, 64, 64),), {})))
    for name in ("Detr", "ConditionalDetr"):
        cases.append(Case(f"hf:{name}ForObjectDetection", "transformers", _detr(name),
                          [((x64,), {}), ((x64,), {"output_hidden_states": True})],
                          ((x64,), {"labels": [{"class_labels": torch.tensor([1]),
                                                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2}),
                          double=False))
    return cases


def _upernet():
    import transformers

    backbone = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=32, auxiliary_in_channels=64, num_labels=3))


def _dpt():
    import transformers

    return transformers.DPTForDepthEstimation(transformers.DPTConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3], head_in_index=-1))


def _detr(name):
    def build():
        import transformers

        backbone = transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            out_features=["stage1", "stage2", "stage3", "stage4"])
        config = getattr(transformers, f"{name}Config")(
            backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
            num_labels=3)
        return getattr(transformers, f"{name}ForObjectDetection")(config)
    return build


def _diffusers(cls_name, **config):
    def build():
        import diffusers

        return getattr(diffusers, cls_name)(**config)
    return build


def diffusers_cases() -> list[Case]:
    sample, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    text = torch.randn(1, 4, 32)
    unet = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=8)
    cond = dict(unet, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8)
    control = {k: v for k, v in cond.items() if k not in ("out_channels", "up_block_types", "sample_size")}
    return [
        Case("diffusers:UNet2DModel", "diffusers", _diffusers(
            "UNet2DModel", **unet, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D")),
            [((sample, t), {}), ((sample, t), {"return_dict": False})], ((sample, t), {})),
        Case("diffusers:UNet2DConditionModel", "diffusers", _diffusers("UNet2DConditionModel", **cond),
             [((sample, t, text), {}), ((sample, t, text), {"return_dict": False})],
             ((sample, t, text), {})),
        Case("diffusers:AutoencoderKL", "diffusers", _diffusers(
            "AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8),
            [((torch.randn(1, 3, 32, 32),), {}), ((torch.randn(1, 3, 32, 32),), {"return_dict": False})],
            ((torch.randn(1, 3, 32, 32),), {})),
        Case("diffusers:ControlNetModel", "diffusers", _diffusers(
            "ControlNetModel", **control, conditioning_embedding_out_channels=(16, 32)),
            [((sample, t, text, torch.randn(1, 3, 32, 32)), {}),
             ((sample, t, text, torch.randn(1, 3, 32, 32)), {"return_dict": False})],
            ((sample, t, text, torch.randn(1, 3, 32, 32)), {})),
    ]


def _smp(arch, encoder):
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder, encoder_weights=None, classes=2)
    return build


def smp_cases() -> list[Case]:
    archs = ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "PAN", "DeepLabV3",
             "DeepLabV3Plus", "UPerNet", "Segformer")
    small, large = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 128, 128)  # PAN pools to 1/32
    return [Case(f"smp:{arch}-{encoder}", "smp", _smp(arch, encoder),
                 [(((large if arch == "PAN" else small),), {})],
                 (((large if arch == "PAN" else small),), {}))
            for arch in archs for encoder in ("resnet18", "mobilenet_v2", "efficientnet-b0")]


def _torchvision(kind, name, **kwargs):
    def build():
        import torchvision

        getter = getattr(torchvision.models, kind) if kind else torchvision.models
        return getattr(getter, name)(weights=None, weights_backbone=None, **kwargs)
    return build


def torchvision_cases() -> list[Case]:
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, h, w, dtype=torch.uint8),
                "keypoints": torch.tensor([[[20.0, 30.0, 1.0]] * 17])}
               for h, w in ((128, 128), (96, 128))]
    small = {"min_size": 128, "max_size": 128}
    cases = []
    for name, extra in (("fasterrcnn_mobilenet_v3_large_320_fpn", {}),
                        ("retinanet_resnet50_fpn", small), ("fcos_resnet50_fpn", small),
                        ("ssdlite320_mobilenet_v3_large", {}), ("maskrcnn_resnet50_fpn", small),
                        ("keypointrcnn_resnet50_fpn", small)):
        cases.append(Case(f"torchvision:{name}", "torchvision", _torchvision("detection", name, **extra),
                          [((images,), {})], ((images, targets), {}), double=False))
    x = torch.randn(2, 3, 96, 96)
    for name in ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"):
        kwargs = {"aux_loss": False} if name != "lraspp_mobilenet_v3_large" else {}
        cases.append(Case(f"torchvision:{name}", "torchvision",
                          _torchvision("segmentation", name, **kwargs), [((x,), {})], ((x,), {})))
    first, second = torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 128, 128) * 2 - 1  # [-1, 1]; RAFT needs >= 128
    cases.append(Case("torchvision:raft_small", "torchvision", _raft,
                      [((first, second), {}), ((first, second), {"num_flow_updates": 2})],
                      ((first, second), {"num_flow_updates": 4}), double=False))  # float32 grids inside
    return cases


def _raft():
    from torchvision.models.optical_flow import raft_small

    return raft_small(weights=None)


# -- MONAI: 2-D networks (LegoNet rewrites Conv2d), the deep-supervision head in train mode --


def _monai(cls_name, **config):
    def build():
        import monai.networks.nets as nets

        return getattr(nets, cls_name)(**config)
    return build


def monai_cases() -> list[Case]:
    x = torch.randn(2, 1, 32, 32)
    common = dict(spatial_dims=2, in_channels=1, out_channels=2)
    models = {
        "UNet": dict(common, channels=(8, 16, 32), strides=(2, 2), num_res_units=1),
        "BasicUNet": dict(common, features=(8, 8, 16, 16, 32, 8)),
        "DynUNet": dict(common, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                        upsample_kernel_size=[2, 2], filters=[8, 16, 32],
                        deep_supervision=True, deep_supr_num=1),
        "AttentionUnet": dict(common, channels=(8, 16, 32), strides=(2, 2)),
    }
    return [Case(f"monai:{name}", "monai", _monai(name, **config), [((x,), {})], ((x,), {}))
            for name, config in models.items()]


# -- kornia: local features; DISK and LoFTR are inference-only in kornia (no train call) --------


def _hardnet():
    from kornia.feature import HardNet

    return HardNet(pretrained=False)


def _disk():
    from kornia.feature import DISK

    return DISK()


def _loftr():
    from kornia.feature import LoFTR
    from kornia.feature.loftr.loftr import default_cfg

    config = copy.deepcopy(default_cfg)
    config["match_coarse"]["thr"] = 0.0  # random weights: no coarse match above 0.2, nothing to check
    return LoFTR(pretrained=None, config=config)


def kornia_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(0)  # outputs of DISK / LoFTR: value-dependent sizes
    patches = torch.rand(4, 1, 32, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    gray = torch.rand(1, 1, 64, 64, generator=generator)
    pair = {"image0": gray, "image1": (gray + 0.05 * torch.rand(1, 1, 64, 64, generator=generator)).clamp(0, 1)}
    return [
        Case("kornia:HardNet", "kornia", _hardnet, [((patches,), {})], ((patches,), {})),
        Case("kornia:DISK", "kornia", _disk,
             [((image,), {"n": 32}), ((image,), {}),
              ((image,), {"n": 16, "window_size": 3, "score_threshold": 0.0,
                          "pad_if_not_divisible": True})]),
        Case("kornia:LoFTR", "kornia", _loftr, [((pair,), {})]),
    ]


# -- segment-anything: a small SAM from its own classes; forward is inference-only -------------


def _sam():
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    size, dim = 64, 32
    return Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=16, embed_dim=dim, depth=2,
                                      num_heads=2, out_chans=dim, use_rel_pos=True, window_size=2,
                                      global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // 16, size // 16),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(
            depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2), num_multimask_outputs=3,
            iou_head_depth=3, iou_head_hidden_dim=32))


def sam_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 48, generator=generator) * 255  # SAM pads it to 64 x 64 itself
    prompts = {"image": image, "original_size": (128, 96),
               "point_coords": torch.tensor([[[10.0, 20.0], [30.0, 40.0]]]),
               "point_labels": torch.tensor([[1, 0]]),
               "boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]),
               "mask_inputs": torch.randn(1, 1, 16, 16, generator=generator)}
    points = {k: prompts[k] for k in ("image", "original_size", "point_coords", "point_labels")}
    return [Case("sam:small", "sam", _sam,  # float32: its prompt encoder casts coordinates to float
                 [(([prompts],), {"multimask_output": True}),
                  (([points, prompts],), {"multimask_output": False})], double=False)]


# -- spandrel: its ESRGAN architecture (RRDBNet) ------------------------------------------------


def _rrdbnet():
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    return RRDBNet(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=4)


def spandrel_cases() -> list[Case]:
    x = torch.rand(1, 3, 16, 16)
    return [Case("spandrel:RRDBNet", "spandrel", _rrdbnet, [((x,), {})], ((x,), {}))]


# -- open_clip: RN50 with random weights (image size 64 to keep it small), image and text -------


def _open_clip(name):
    def build():
        import open_clip

        return open_clip.create_model(name, pretrained=None, force_image_size=64)
    return build


def open_clip_cases() -> list[Case]:
    image = torch.randn(2, 3, 64, 64)
    text = torch.randint(1, 49407, (2, 77))
    return [Case("open_clip:RN50", "open_clip", _open_clip("RN50"),
                 [((image, text), {}), ((image,), {}), ((), {"image": image, "text": text})],
                 ((image, text), {}), double=False)]


LIBRARIES = {"ultralytics": ultralytics_cases, "transformers": transformers_cases,
             "diffusers": diffusers_cases, "smp": smp_cases, "torchvision": torchvision_cases,
             "monai": monai_cases, "kornia": kornia_cases, "sam": sam_cases,
             "spandrel": spandrel_cases, "open_clip": open_clip_cases}
# library -> (module it imports, what to pip install where it is missing)
PACKAGES = {"ultralytics": ("ultralytics", "ultralytics"), "transformers": ("transformers", "transformers"),
            "diffusers": ("diffusers", "diffusers"),
            "smp": ("segmentation_models_pytorch", "segmentation-models-pytorch"),
            "torchvision": ("torchvision", "torchvision"), "monai": ("monai", "monai"),
            "kornia": ("kornia", "kornia"), "sam": ("segment_anything", "segment-anything"),
            "spandrel": ("spandrel", "spandrel"), "open_clip": ("open_clip", "open_clip_torch")}


# ---- one model -----------------------------------------------------------------------------


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("took longer than the per-model limit")


def tensors(value) -> list[torch.Tensor]:
    """The tensors of an output, also inside dataclasses (kornia's ``DISKFeatures``), which
    pytree takes for leaves."""
    found = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found += tensors([getattr(leaf, f.name) for f in dataclasses.fields(leaf)])
    return found


def _cast(value, dtype):
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor)
                           and t.is_floating_point() else t, value)


def run_case(case: Case, export: bool) -> Result:
    result = Result(case.name, case.library)
    stage = "build"
    try:
        torch.manual_seed(0)
        model = case.build().eval()
        dtype = torch.float64 if case.double else torch.float32
        calls = [_cast(call, dtype) for call in case.calls]
        train_call = None if case.train is None else _cast(case.train, dtype)
        model = model.to(dtype)
        result.dtype = str(dtype).removeprefix("torch.")
        stage = "original"
        with torch.no_grad():
            for args, kwargs in calls:
                model(*args, **kwargs)
        stage = "transform"
        start = time.perf_counter()
        gm = legofx.transform(model, o=2, m=0.5, example_inputs=calls[0][0],
                              example_kwargs=calls[0][1])
        result.transform_s = time.perf_counter() - start
        records = legofx.summary(gm)
        result.convs = len(records)
        eligible = [r for r in records if not any(why in r.reason for why in NOT_ELIGIBLE)]
        result.eligible = len(eligible)
        result.rewritten = sum(r.rewritten for r in records)
        result.skipped_reasons = dict(Counter(reason_kind(r.reason) for r in records if not r.rewritten))
        randomize_lego(gm, torch.Generator().manual_seed(0))
        stage = "fold"
        folded = legofx.fold(gm.eval())
        stage = "interface (eval)"
        worst = 0.0
        for args, kwargs in calls:
            compare_calls(model, gm, args, kwargs)
            compare_calls(gm, folded, args, kwargs, same_function=True)
            with torch.no_grad():
                ours, reference = tensors(folded(*args, **kwargs)), tensors(gm(*args, **kwargs))
            if ours:
                worst = max(worst, relative_error(torch.cat([t.flatten().double() for t in ours]),
                                                  torch.cat([t.flatten().double() for t in reference])))
            result.eval_calls += 1
        result.fold_error = worst
        result.interface_ok = True
        if train_call is not None:
            stage = "interface (train)"
            original = copy.deepcopy(model).train()
            gm.train()
            want = original(*train_call[0], **train_call[1])
            out = gm(*train_call[0], **train_call[1])
            result.train_ok = (pytree.tree_structure(want) == pytree.tree_structure(out)
                               and type(want) is type(out))
            stage = "backward"
            loss = sum(t.float().square().mean() for t in tensors(out) if t.is_floating_point())
            loss.backward()
            lego = [p for name, p in gm.named_parameters() if name.endswith(".lego")]
            result.backward_ok = bool(lego) and all(p.grad is not None for p in lego)
        if export:
            stage = "export"
            result.export = try_export(model, folded, calls[0])
        complete = result.rewritten >= result.eligible  # vacuous where none is eligible
        passed = result.interface_ok and result.train_ok is not False and complete
        result.status = "pass" if passed else "fail"
        result.cause = "" if passed else (
            "train-mode output differs" if result.train_ok is False
            else f"{result.eligible - result.rewritten} eligible convs not rewritten")
    except Exception as err:  # noqa: BLE001 - every failure is recorded, with its stage
        result.status = "original fails" if stage in ("build", "original") else "fail"
        result.cause = f"{stage}: {type(err).__name__}"
        result.detail = f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        if stage not in ("build", "original"):
            result.detail += " | " + traceback.format_exc().strip().splitlines()[-3][:200]
    return result


def try_export(model, folded, call) -> str:
    """``legofx.export`` of the folded model to ONNX with default arguments, where the
    original exports with the same call (``"original does not export"`` otherwise). Both in
    float32, as models are deployed (ONNX Runtime's CPU convolutions take no float64)."""
    model, folded = copy.deepcopy(model).float(), copy.deepcopy(folded).float()
    args, kwargs = _cast(call, torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        try:
            legofx.export(model, args, Path(folder) / "original.onnx", check=None,
                          **({"example_kwargs": kwargs} if kwargs else {}))
        except Exception as err:  # noqa: BLE001
            return f"original does not export ({type(err).__name__})"
        try:
            legofx.export(folded, args, Path(folder) / "lego.onnx",
                          **({"example_kwargs": kwargs} if kwargs else {}))
        except Exception as err:  # noqa: BLE001
            return f"FAIL {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return "ok"


# ---- the sweep -----------------------------------------------------------------------------


def per_model(results: list[Result]) -> str:
    """One row per model: transform (convs rewritten / eligible), interface in train and eval
    mode, fold error, export; a failure shows its stage and cause."""
    rows = []
    for r in results:
        if r.status in ("skipped", "original fails"):
            rows.append([r.model, f"{r.status}: {r.cause}", "", "", "", ""])
            continue
        failed = r.cause.split(":")[0] if r.status == "fail" else ""
        transform = ("FAIL " + r.cause if failed == "transform"
                     else f"ok {r.rewritten}/{r.eligible} ({r.transform_s:.1f} s)")
        evaluation = ("ok" if r.interface_ok else f"FAIL {r.cause}" if failed.startswith(("interface (eval)", "fold"))
                      else "-")
        train = ("no train call" if r.train_ok is None and r.interface_ok
                 else "ok" if r.train_ok and r.backward_ok else
                 f"FAIL {r.cause}" if r.train_ok is False or failed in ("interface (train)", "backward")
                 else "backward misses Lego" if r.backward_ok is False else "-")
        fold = f"{r.fold_error:.1e} ({r.dtype})" if r.fold_error is not None else "-"
        rows.append([r.model, transform, train, evaluation, fold, r.export])
    return tabulate(rows, ["model", "transform (rewritten/eligible)", "interface train",
                           "interface eval", "fold error", "export"], tablefmt="github")


def summary(results: list[Result]) -> str:
    by_library = defaultdict(list)
    for r in results:
        by_library[r.library].append(r)
    rows = []
    for library, group in by_library.items():
        if all(r.status == "skipped" for r in group):
            rows.append([library, len(group), f"skipped ({group[0].cause})", "", "", "", "", ""])
            continue
        group = [r for r in group if r.status != "skipped"]
        runs = [r for r in group if r.status != "original fails"]
        exports = [r for r in runs if r.export not in ("not run",) and not r.export.startswith("original")]
        rows.append([library, len(group), len(runs), sum(r.status == "pass" for r in runs),
                     f"{sum(r.rewritten for r in runs)}/{sum(r.eligible for r in runs)}",
                     sum(bool(r.backward_ok) for r in runs),
                     max((r.fold_error or 0.0 for r in runs), default=0.0),
                     f"{sum(r.export == 'ok' for r in exports)}/{len(exports)}" if exports else "-"])
    table = tabulate(rows, ["library", "models", "original runs", "pass", "convs rewritten/eligible",
                            "backward reaches Lego", "worst fold error", "ONNX export"],
                     tablefmt="github", floatfmt=".1e")
    causes = Counter(r.cause for r in results if r.status == "fail")
    lines = [table, ""]
    if causes:
        lines.append("failures by cause:")
        for cause, count in causes.most_common():
            names = [r.model for r in results if r.status == "fail" and r.cause == cause]
            lines.append(f"  {count} x {cause}: {', '.join(names[:6])}")
    skipped = [r.model for r in results if r.status == "original fails"]
    if skipped:
        lines.append(f"originals that do not build or run here ({len(skipped)}): "
                     + "; ".join(f"{r.model} ({r.cause}: {r.detail[:80]})"
                                 for r in results if r.status == "original fails"))
    return "\n".join(lines)


def save(results: list[Result]) -> list[Result]:
    """Write ``results`` over the saved rows of the same models (a partial run updates its
    rows); returns every saved row."""
    RESULTS.mkdir(exist_ok=True)
    saved = RESULTS / "real_models.jsonl"
    rows = {}
    if saved.exists():
        rows = {row["model"]: Result(**row) for row in map(json.loads, saved.read_text().splitlines())}
    rows.update({r.model: r for r in results})
    order = [case.name for library in LIBRARIES for case in LIBRARIES[library]()]
    results = sorted(rows.values(), key=lambda r: order.index(r.model) if r.model in order else len(order))
    with open(RESULTS / "real_models.jsonl", "w") as file:
        for r in results:
            file.write(json.dumps(asdict(r)) + "\n")
    with open(RESULTS / "real_models.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        for r in results:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v
                             for k, v in asdict(r).items()})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", nargs="*", choices=sorted(LIBRARIES), default=None)
    parser.add_argument("--models", nargs="*", default=None,
                        help="model names, e.g. hf:ResNetModel (with --library: these too)")
    parser.add_argument("--export", action="store_true", help="also export to ONNX (slow)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--report", action="store_true", help="print the saved summary")
    parser.add_argument("--per-model", action="store_true",
                        help="with --report: one row per model (transform / interface / fold / export)")
    args = parser.parse_args(argv)
    if args.report:
        lines = (RESULTS / "real_models.jsonl").read_text().splitlines()
        saved = [Result(**json.loads(line)) for line in lines]
        if args.library or args.models:
            saved = [r for r in saved if r.library in (args.library or ()) or r.model in (args.models or ())]
        print(per_model(saved) if args.per_model else summary(saved))
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    every = [case for library in LIBRARIES for case in LIBRARIES[library]()]
    if args.library is None and args.models is None:
        cases = every
    else:  # the libraries' models and the models named
        cases = [case for case in every
                 if case.library in (args.library or ()) or case.name in (args.models or ())]
    results = []
    signal.signal(signal.SIGALRM, _alarm)
    for index, case in enumerate(cases, 1):
        signal.alarm(args.timeout)
        start = time.perf_counter()
        module, package = PACKAGES[case.library]
        try:
            if importlib.util.find_spec(module) is None:
                result = Result(case.name, case.library, status="skipped",
                                cause=f"not installed: pip install {package}")
            else:
                result = run_case(case, args.export)
        except Timeout as err:
            result = Result(case.name, case.library, cause=f"timeout: {err}")
        signal.alarm(0)
        results.append(result)
        print(f"[{index}/{len(cases)}] {case.name}: {result.status} {result.cause} "
              f"({result.rewritten}/{result.eligible} convs, {time.perf_counter() - start:.1f} s)"
              + (f" {result.detail[:160]}" if result.detail else ""), flush=True)
    print()
    print(summary(save(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
