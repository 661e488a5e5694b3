"""The contract every rewritten layer meets, whatever the method."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from torch import Tensor, nn

from legofx.core.geometry import GEOMETRY


def parameter_copy(tensor: Tensor | None) -> nn.Parameter | None:
    """A detached copy of a parameter that keeps its ``requires_grad`` (``None`` stays)."""
    return None if tensor is None else nn.Parameter(tensor.detach().clone(), tensor.requires_grad)


def conv_extra_repr(layer: nn.Module, settings: str = "") -> str:
    """``extra_repr`` of a layer standing for an ``nn.Conv2d``; ``settings`` go after the
    kernel size (``"o=2, m=32"``)."""
    middle = f"{settings}, " if settings else ""
    return (f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
            f"{middle}stride={layer.stride}, padding={layer.padding!r}, "
            f"dilation={layer.dilation}, padding_mode={layer.padding_mode!r}, "
            f"bias={layer.bias is not None}")


def computed_weight(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is computed from other tensors (a property), not stored."""
    return isinstance(getattr(type(layer), "weight", None), property)


def full_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a sharded ``DTensor`` (FSDP2's parameters between steps) gathered."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def assigned_weight(layer: nn.Module, value, shape: tuple[int, ...]) -> Tensor:
    """``value`` as the detached dense weight assigned to ``layer`` (checked against ``shape``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(layer).__name__}.weight must be assigned a tensor of shape "
                        f"{shape}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{type(layer).__name__}.weight must be assigned a tensor of shape "
                         f"{tuple(shape)}, got {tuple(value.shape)}")
    return value.detach()


def check_representable(layer: nn.Module, weight: Tensor, rebuilt: Tensor, what: str) -> None:
    """Refuse an assigned ``weight`` that ``rebuilt`` (its projection onto ``layer``'s own
    structure) misses by more than rounding: largest difference above ``64 * eps`` of the
    weight's dtype times its largest entry."""
    scale = weight.abs().max().item() if weight.numel() else 0.0
    error = (rebuilt.to(weight.dtype) - weight).abs().max().item() if weight.numel() else 0.0
    allowed = 64 * torch.finfo(weight.dtype).eps * scale if weight.is_floating_point() else 0.0
    if error > allowed:
        raise ValueError(
            f"{type(layer).__name__}({layer.extra_repr()}): the assigned weight is not one this "
            f"layer can hold: {what}, it differs by up to {error:.3g} (at most {allowed:.3g} "
            f"allowed, relative {error / scale if scale else float('inf'):.3g}). Assigning a "
            "weight keeps the layer's structure and fits its other factors (exact for conv+"
            "BatchNorm fusion, which scales each output filter); for any other dense weight, "
            "fold(model, strategy='dense') first, or transform the new weights with "
            "init='weights'")


def _no_stage(role: str) -> nullcontext:
    return nullcontext()


class RewrittenLayer(nn.Module):
    """A layer that replaces a conv: one math, two ways to run it.

    Subclasses define ``compute(x, attr, stage)`` (see :mod:`legofx.passes.inline_modules`),
    which ``forward`` runs eagerly and the inline pass expands into graph nodes; ``form``
    (``"training"`` or ``"folded"``); ``folded()``, the default inference form (``self`` when
    already folded); ``params_before`` / ``params_after``; ``macs(output_shape)``, the
    multiply-accumulates of one call before and after the rewrite (the method's theory); and
    ``lowering``, how the current form computes (shown in summaries). The other inference forms
    a training-form layer offers are registered in :mod:`legofx.lowering.registry`.
    """

    form: str
    lowering: str = ""
    inline = True  # whether the inline pass expands its compute() into graph nodes
    standard_ops = True  # False: computes with a legofx custom op (no ONNX / TensorRT)
    per_output: str | None = None  # folded forms: the tensor (dim 0 = output channel) the
    # output is linear in, besides the bias; fold(fuse_batchnorm=True) scales its rows

    def __setattr__(self, name: str, value) -> None:
        """Assignments that code written for ``nn.Conv2d`` makes (``fuse_conv_bn_eval``,
        ultralytics' ``fuse_conv_and_bn``), where ``nn.Module`` would raise ``KeyError``:
        ``layer.weight = w`` on a layer whose ``weight`` is computed (a property) calls
        ``assign_weight(w)``, which fits the layer's own factors to ``w`` or refuses it; a
        ``Parameter`` assigned to a ``bias`` that was ``None`` becomes the bias parameter."""
        if name == "weight" and computed_weight(self):
            with torch.no_grad():
                self.assign_weight(value)
            return
        if (name == "bias" and isinstance(value, nn.Parameter) and "bias" in self.__dict__
                and self.__dict__["bias"] is None):
            del self.__dict__["bias"]
        super().__setattr__(name, value)

    def assign_weight(self, value: Tensor) -> None:
        raise AttributeError(f"{type(self).__name__}.weight cannot be assigned")

    guard_pretrained = False  # set on the layers of models with a transformers config

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """With ``guard_pretrained``, a ``weight`` of shape ``(1,)`` beside the layer's own
        tensors: transformers' ``from_pretrained`` of the *original* class then stops at the
        size mismatch with the conv's weight instead of loading nothing into it (missing and
        unexpected keys only warn there). ``load_state_dict`` of a legofx model drops it."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.guard_pretrained and computed_weight(self):
            destination[prefix + "weight"] = torch.zeros(1)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        marker = state_dict.get(prefix + "weight")
        if computed_weight(self) and isinstance(marker, Tensor) and tuple(marker.shape) == (1,):
            del state_dict[prefix + "weight"]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def compute(self, x: Tensor, attr, stage) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.compute(x, partial(getattr, self), _no_stage)

    def folded(self) -> RewrittenLayer:
        raise NotImplementedError

    def macs(self, output_shape: tuple[int, ...]) -> tuple[int, int]:
        raise NotImplementedError


class ConvLayer(RewrittenLayer):
    """A rewritten layer that stands for an ``nn.Conv2d``: it keeps the conv's geometry
    (:func:`legofx.core.geometry.conv_geometry`) as attributes of the same names, so code
    written for the replaced conv can still read them."""

    groups = 1

    def __init__(self, geometry: dict) -> None:
        super().__init__()
        for key in GEOMETRY:
            setattr(self, key, geometry[key])

    @property
    def geometry(self) -> dict:
        """Channels, kernel size and the conv hyper-parameters, as ``conv_geometry`` gives."""
        return {key: getattr(self, key) for key in GEOMETRY}

    @property
    def params_before(self) -> int:
        """Parameters of the dense conv this layer replaced."""
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return n * c * kh * kw + (0 if self.bias is None else n)
