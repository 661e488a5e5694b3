"""``legofx.transform``: rewrite a model's ``nn.Conv2d`` layers into LegoNet layers."""

from __future__ import annotations

import torch
from torch import nn

from legofx.core.arguments import (
    check_bool, check_choice, check_positive_int, check_size_spec, resolve_size,
)
from legofx.methods.lego.init import fit_lego
from legofx.methods.lego.layers import LegoConv2d
from legofx.core.records import LayerRecord
from legofx.fx.rewrite import Method, rewrite


@torch.no_grad()
def start_from_weights(layer: LegoConv2d, weight: torch.Tensor) -> None:
    """Set the layer's Lego filters, selection and coefficients to reconstruct ``weight``
    (see :mod:`legofx.methods.lego.init`); the relative error goes to ``layer.init_error``."""
    lego, selection, coef, error = fit_lego(weight, layer.o, layer.m)
    if not isinstance(layer.coef, nn.Parameter):  # no coefficients: fold the scale in B
        coef = torch.ones_like(coef)
    layer.lego.copy_(lego)
    layer.coef.copy_(coef)
    layer.proxy.zero_().scatter_(-1, selection.unsqueeze(-1).to(layer.proxy.device), 1.0)
    layer.init_error = error


def paper_compression(layer: LegoConv2d) -> float:
    """LegoNet eq. 1: ``n c d^2 / (m (c/o) d^2 + n o m)`` (M stored as bits; d^2 = kh*kw)."""
    n, c, (kh, kw), o, m = layer.out_channels, layer.in_channels, layer.kernel_size, layer.o, layer.m
    return n * c * kh * kw / (m * (c // o) * kh * kw + n * o * m)


def paper_speedup(layer: LegoConv2d) -> float:
    """LegoNet eq. 2: ``n c d^2 / (m c d^2 + n o)`` (the merge's additions included)."""
    n, c, (kh, kw), o, m = layer.out_channels, layer.in_channels, layer.kernel_size, layer.o, layer.m
    return n * c * kh * kw / (m * c * kh * kw + n * o)


def lego_method(o: int, m: int | float, init: str = "random", coefficients: bool = True) -> Method:
    """The LegoNet rewrite with ``o`` fragments and ``m`` Lego filters (fraction or count)."""

    def reason_to_skip(conv: nn.Conv2d) -> str | None:
        reasons = []
        if conv.groups != 1:
            reasons.append(f"groups={conv.groups}: grouped convolutions are kept")
        if conv.in_channels % o:
            reasons.append(f"in_channels={conv.in_channels} is not divisible by o={o}")
        if resolve_size(m, conv.out_channels) > conv.out_channels:
            reasons.append(f"m={m} exceeds out_channels n={conv.out_channels}")
        return "; ".join(reasons) or None

    def build(conv: nn.Conv2d) -> LegoConv2d:
        layer = LegoConv2d(conv, o, resolve_size(m, conv.out_channels), coefficients)
        if init == "weights":
            start_from_weights(layer, conv.weight)
        return layer

    def record(name: str, layer: LegoConv2d, calls: int) -> LayerRecord:
        return LayerRecord(
            name=name, status="rewritten", reason="", method="lego",
            in_channels=layer.in_channels, out_channels=layer.out_channels,
            kernel_size=layer.kernel_size, o=layer.o, m=layer.m,
            params_before=layer.params_before, params_after=layer.params_after,
            index_entries=layer.out_channels * layer.o, calls=calls, form=layer.form,
            settings=f"o={layer.o} m={layer.m}" + ("" if coefficients else " no-coef"),
            theory_compression=paper_compression(layer), theory_speedup=paper_speedup(layer),
            extra={} if layer.init_error is None else {"init_error": layer.init_error},
        )

    return Method("lego", reason_to_skip, build, record)


def transform(model: nn.Module, o: int = 2, m: int | float = 0.5, *, include=None,
              exclude=None, init: str = "random", coefficients: bool = True,
              example_inputs=None, example_kwargs=None) -> nn.Module:
    """Rewrite every eligible ``nn.Conv2d`` of ``model`` into a trainable LegoNet layer.

    Args:
        model: any ``nn.Module``; it is never modified (legofx works on a traced copy).
        o: number of contiguous input-channel fragments (int >= 1).
        m: Lego filters per layer: a float in (0, 1] is a fraction of the layer's output
            channels ``n`` (rounded half up, at least 1); an int >= 1 is an absolute count.
            ``m=1`` means one filter, ``m=1.0`` means ``n`` filters.
        include, exclude: conv module names or glob patterns (``"layer1.*"``,
            ``"*.downsample.0"``); a name also selects the modules under it (``"layer1"``).
        init: ``"random"`` (the scale of a fresh conv; see ``LegoConv2d.reset_parameters``)
            or ``"weights"``: the Lego filters, selection and coefficients that best
            reconstruct each conv's trained weight (exact for ``o=1, m=1.0``); the summary
            records each layer's relative reconstruction error (``extra["init_error"]``).
        coefficients: learn one coefficient per (output channel, fragment) (the paper's
            better variant); ``False`` keeps them at 1.

    A conv is rewritten when ``groups == 1``, ``in_channels % o == 0`` and the resolved
    ``m <= out_channels``; every other conv stays as it is, with its reason in
    :func:`legofx.summary`. Parameters live under the conv's name (``layer1.0.conv1.lego``,
    ``.proxy``, ``.coef``, ``.bias``).

    The result is a drop-in replacement for ``model``: it takes the same positional and keyword
    arguments with the same effect, returns the same types (a ``ModelOutput`` stays one), and
    keeps the module tree, containers and attributes the model's own code uses. Where the
    model's ``forward`` traces without changing its interface, the result is a
    ``torch.fx.GraphModule`` (a :class:`~legofx.fx.traced_module.TracedModule` sharing the
    model's module tree) in which each rewritten call is explicit split / Lego conv / select /
    merge nodes; otherwise it is a copy of the model itself, with its traceable children traced
    and the rest of its convs replaced at module level (``legofx.report`` says where and why).

    ``example_inputs`` (a tensor or tuple of positional arguments) and ``example_kwargs`` (a
    dict): run the model and the result once (eval mode, no gradients) and raise
    :class:`legofx.InterfaceError` naming the first difference of output structure, shape or
    dtype. Without them nothing extra runs.
    """
    o = check_positive_int("o", o)
    m = check_size_spec("m", m, of="each layer's out_channels")
    init = check_choice("init", init, ("random", "weights"))
    coefficients = check_bool("coefficients", coefficients)
    call = {"call": "transform", "options": {"o": o, "m": m, "include": include, "exclude": exclude,
                                             "coefficients": coefficients}}
    return rewrite(model, lego_method(o, m, init, coefficients), include=include, exclude=exclude,
                   example_inputs=example_inputs, example_kwargs=example_kwargs, call=call)
