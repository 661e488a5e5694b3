"""``legofx.structure``: rewrite a model's convs (and optionally linears) into Structured
Convolutions (Bhalgat et al., NeurIPS 2020); ``structural_loss``, the paper's regulariser."""

from __future__ import annotations

import torch
from torch import nn

from legofx.core.arguments import (
    check_bool, check_choice, check_model, check_positive_int, check_size_spec, resolve_size,
)
from legofx.core.records import LayerRecord
from legofx.fx.rewrite import Method, rewrite
from legofx.methods.structured.layers import (
    StructuredConv2d, StructuredLinear, project, structural_residual,
)


def structure_method(c: int | float, n: int, init: str = "project") -> Method:
    """Structured convolutions with underlying kernel ``c x n x n`` (``c``: fraction or count)."""

    def reason_to_skip(conv: nn.Conv2d) -> str | None:
        reasons = []
        if conv.groups != 1:
            reasons.append(f"groups={conv.groups}: grouped convolutions are kept")
        if n > min(conv.kernel_size):
            reasons.append(f"n={n} exceeds kernel_size={tuple(conv.kernel_size)}")
        under = resolve_size(c, conv.in_channels)
        if under > conv.in_channels:
            reasons.append(f"c={c} exceeds in_channels={conv.in_channels}")
        (kh, kw), C = conv.kernel_size, conv.in_channels
        if not reasons and under * n * n >= C * kh * kw:
            reasons.append(f"c={under} n={n} keeps all {C}x{kh}x{kw} weights per filter: "
                           "nothing to save")
        return "; ".join(reasons) or None

    def build(conv: nn.Conv2d) -> StructuredConv2d:
        layer = StructuredConv2d(conv, resolve_size(c, conv.in_channels), n, n)
        if init == "project":
            _start_from(layer, conv.weight)
        return layer

    def record(name: str, layer: StructuredConv2d, calls: int) -> LayerRecord:
        before, after = layer.params_before, layer.params_after
        return LayerRecord(
            name=name, status="rewritten", reason="", method="structured",
            in_channels=layer.in_channels, out_channels=layer.out_channels,
            kernel_size=layer.kernel_size, o=None, m=None,
            params_before=before, params_after=after, calls=calls, form=layer.form,
            settings=f"c={layer.c} n={layer.nh}x{layer.nw}",
            theory_compression=before / after, theory_speedup=_speedup(layer),
            extra={} if layer.init_error is None else {"init_error": layer.init_error},
        )

    return Method("structured", reason_to_skip, build, record)


def _speedup(layer) -> float:
    """Dense MACs over structured MACs (sum-pool additions included) of a 64x64 output: per
    output pixel once the pooled border (``(n-1)*dilation`` rows and columns) is negligible."""
    before, after = layer.macs((1, 1, 64, 64))
    return before / after


def linear_method(c: int | float, init: str = "project") -> Method:
    """``nn.Linear(F, out)`` -> 1-D sum-pool of window ``F-f+1`` then ``Linear(f, out)``."""

    def reason_to_skip(linear: nn.Linear) -> str | None:
        under = resolve_size(c, linear.in_features)
        if under > linear.in_features:
            return f"c={c} exceeds in_features={linear.in_features}"
        if under == linear.in_features:
            return f"c={c} keeps all {linear.in_features} in_features: nothing to save"
        return None

    def build(linear: nn.Linear) -> StructuredLinear:
        layer = StructuredLinear(linear, resolve_size(c, linear.in_features))
        if init == "project":
            _start_from(layer, linear.weight)
        return layer

    def record(name: str, layer: StructuredLinear, calls: int) -> LayerRecord:
        before, after = layer.params_before, layer.params_after
        dense, small = layer.macs((1, layer.out_features))
        return LayerRecord(
            name=name, status="rewritten", reason="", method="structured",
            in_channels=layer.in_features, out_channels=layer.out_features, kernel_size=(),
            o=None, m=None, params_before=before, params_after=after, calls=calls,
            form=layer.form, settings=f"c={layer.f}", theory_compression=before / after,
            theory_speedup=dense / small,
            extra={} if layer.init_error is None else {"init_error": layer.init_error},
        )

    return Method("structured", reason_to_skip, build, record, types=(nn.Linear,))


def _conv_or_linear(conv: Method, linear: Method) -> Method:
    """One method for both kinds, so that one rewrite (one trace, one ``include``/``exclude``
    check over convs and linears together) does both."""

    def pick(module: nn.Module) -> Method:
        return linear if isinstance(module, (nn.Linear, StructuredLinear)) else conv

    return Method("structured", lambda module: pick(module).reason_to_skip(module),
                  lambda module: pick(module).build(module),
                  lambda name, layer, calls: pick(layer).record(name, layer, calls),
                  types=(nn.Conv2d, nn.Linear))


@torch.no_grad()
def _start_from(layer, weight: torch.Tensor) -> None:
    """``alpha = A^+ W``: the structured weight nearest to ``weight`` (Frobenius norm)."""
    alpha, error = project(weight, tuple(layer.alpha.shape[1:]))
    layer.alpha.copy_(alpha)
    layer.init_error = error


def structure(model: nn.Module, c: int | float = 0.5, n: int = 2, *, include=None,
              exclude=None, init: str = "project", linear: bool = False,
              example_inputs=None, example_kwargs=None) -> nn.Module:
    """Rewrite every eligible ``nn.Conv2d`` of ``model`` into a :class:`StructuredConv2d`.

    Args:
        model: any ``nn.Module``; it is never modified (legofx works on a traced copy).
        c: underlying channels: a float in (0, 1] is a fraction of each layer's in_channels
            ``C`` (rounded half up, at least 1); an int >= 1 an absolute count.
        n: underlying kernel size (int >= 1), the same for height and width.
        include, exclude: module names or glob patterns, as for :func:`legofx.transform`.
        init: ``"project"``: ``alpha`` = the least-squares projection of the trained weight
            (its relative error goes to the summary's ``extra["init_error"]``), or
            ``"random"``: the scale of a fresh conv (see ``StructuredConv2d.reset_parameters``).
        linear: also rewrite ``nn.Linear`` layers (``c`` as a fraction of in_features).
        example_inputs, example_kwargs: check the result against ``model`` on one call, as
            for :func:`legofx.transform`.

    A conv is kept (with its reason in :func:`legofx.summary`) when ``groups != 1``, ``n``
    exceeds its kernel height or width, the resolved ``c`` exceeds ``C``, or ``c*n*n >=
    C*kh*kw`` (nothing saved). ``legofx.fold`` turns each layer into pad + 3-D sum-pool + a
    small conv.
    """
    check_model(model)
    c = check_size_spec("c", c, of="each layer's in_channels")
    n = check_positive_int("n", n)
    init = check_choice("init", init, ("project", "random"))
    linear = check_bool("linear", linear)
    method = structure_method(c, n, init)
    if linear:
        method = _conv_or_linear(method, linear_method(c, init))
    call = {"call": "structure", "options": {"c": c, "n": n, "include": include, "exclude": exclude,
                                             "linear": linear}}
    return rewrite(model, method, include=include, exclude=exclude,
                   example_inputs=example_inputs, example_kwargs=example_kwargs, call=call)


def structural_loss(model: nn.Module, c: int | float = 0.5, n: int = 2) -> torch.Tensor:
    """``sum over plain nn.Conv2d layers of ||(I - A A^+) W|| / ||W||``, differentiable.

    ``A`` is the structure matrix of the layer's shape for underlying size ``(c, n, n)``
    (``c`` resolved as in :func:`structure`); convs :func:`structure` would keep (grouped,
    ``n`` larger than the kernel, ``c > C``) are left out. Zero (up to rounding) exactly when
    every such weight is structured; add ``lambda * structural_loss(model)`` to the training
    loss, then :func:`structure` with ``init="project"`` loses almost nothing.
    """
    check_model(model)
    c = check_size_spec("c", c, of="each layer's in_channels")
    n = check_positive_int("n", n)
    total = None
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or module.groups != 1 or n > min(module.kernel_size):
            continue
        under = resolve_size(c, module.in_channels)
        if under > module.in_channels:
            continue
        term = structural_residual(module.weight, (under, n, n))
        total = term if total is None else total + term
    if total is None:
        params = next(model.parameters(), None)
        return torch.zeros((), dtype=torch.float32 if params is None else params.dtype)
    return total
