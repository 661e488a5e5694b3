"""Per-conv records of what a rewrite did, and :func:`summary`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn
from torch.nn.parameter import is_lazy

from legofx.core.layer import RewrittenLayer
from legofx.core.version import VERSION

META_KEY = "legofx"


@dataclass
class LayerRecord:
    """What happened to one conv module.

    ``params_before`` counts the dense conv's weight and bias; ``params_after`` the
    floating-point parameters of the layer's inference form (for a Lego layer: Lego filters,
    coefficients, bias; the selection adds ``index_entries`` small integers). A skipped conv
    keeps its parameters, so there ``params_after == params_before``. ``form`` is
    ``"training"``, ``"folded"`` or, for a skipped conv, ``"original"``. ``settings`` shows
    the method's per-layer settings (``"o=2 m=32"``); ``theory_compression`` and
    ``theory_speedup`` are the method paper's formulas for the layer (LegoNet eq. 1 and 2).
    ``where`` tells how a rewritten layer is reached: ``"graph"`` (explicit nodes of the main
    graph), ``"leaf"`` (nodes of a graph traced inside a module that could not be traced as a
    whole) or ``"module"`` (a module replaced in place, called by eager code).
    """

    name: str
    status: str  # "rewritten" or "skipped"
    reason: str
    method: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    o: int | None
    m: int | None
    params_before: int
    params_after: int
    index_entries: int = 0
    calls: int = 0
    form: str = "original"
    where: str = ""
    lowering: str = ""
    groups: int = 1
    settings: str = ""
    theory_compression: float | None = None
    theory_speedup: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"


def own_params(conv: nn.Module) -> int:
    """The module's own parameters (0 for those a lazy module has not created yet)."""
    return sum(p.numel() for p in conv.parameters(recurse=False) if not is_lazy(p))


def skipped_record(name: str, module: nn.Module, method: str, reason: str, calls: int) -> LayerRecord:
    """The record of a kept ``Conv2d`` (or ``Linear``: features as channels, no kernel)."""
    params = own_params(module)
    return LayerRecord(
        name=name, status="skipped", reason=reason, method=method,
        in_channels=getattr(module, "in_channels", getattr(module, "in_features", 0)),
        out_channels=getattr(module, "out_channels", getattr(module, "out_features", 0)),
        kernel_size=tuple(getattr(module, "kernel_size", ())), o=None, m=None,
        params_before=params, params_after=params, calls=calls,
        groups=getattr(module, "groups", 1),
    )


def _meta(module: nn.Module) -> dict | None:
    """Where legofx keeps its records: ``GraphModule.meta`` (which its deepcopy keeps), or
    the module's ``__dict__`` for a model whose own forward could not be traced."""
    if isinstance(module, fx.GraphModule):
        return getattr(module, "meta", {}).get(META_KEY)
    return module.__dict__.get("_legofx_meta") if isinstance(module, nn.Module) else None


def stored_meta(module: nn.Module) -> dict:
    meta = _meta(module)
    if meta is None:
        if isinstance(module, nn.Module) and any(
                isinstance(sub, RewrittenLayer) for sub in module.modules()):
            raise ValueError(
                f"{type(module).__name__} holds legofx layers but has lost its records (a copy "
                "made by re-tracing it, such as torch.fx.symbolic_trace, keeps none): rebuild it "
                "with legofx.restore(original_model, path) from a legofx.save checkpoint, or "
                "legofx.transform on the original model and load_state_dict the saved weights"
            )
        raise ValueError(
            f"gm must be a model returned by legofx.transform (or fold), got "
            f"{type(module).__name__} without legofx records"
        )
    return meta


def stored_records(module: nn.Module) -> list[LayerRecord]:
    return stored_meta(module)["records"]


def stored_recipe(module: nn.Module) -> list[dict]:
    """The calls that made ``module`` from its original model, in order (``legofx.save``
    replays them): ``{"call": "transform" | "structure" | "fold", "options": {...}}``, plain
    Python values only."""
    return list(stored_meta(module).get("recipe", []))


def add_to_recipe(module: nn.Module, call: str, options: dict) -> None:
    """Append one call to ``module``'s recipe (:func:`stored_recipe`)."""
    meta = stored_meta(module)
    meta["recipe"] = [*meta.get("recipe", []), {"call": call, "options": options}]
    recipe_to_config(module)


def recipe_to_config(model: nn.Module) -> None:
    """For a model with a transformers-style ``config`` (one with ``to_dict`` and
    ``save_pretrained``): the recipe goes to ``config.legofx`` (``save_pretrained`` writes it to
    ``config.json``, where ``legofx.restore`` reads it), and every rewritten layer guards its
    state against ``from_pretrained`` of the original class
    (:meth:`~legofx.core.layer.RewrittenLayer._save_to_state_dict`). The config is the
    model's own (``transform`` and ``fold`` work on copies)."""
    config = getattr(model, "config", None)
    if not (hasattr(config, "to_dict") and hasattr(config, "save_pretrained")):
        return
    config.legofx = {"recipe": stored_recipe(model), "version": VERSION}
    for layer in model.modules():
        if isinstance(layer, RewrittenLayer):
            layer.guard_pretrained = True


def store_records(module: nn.Module, records: list[LayerRecord], untraced: dict[str, str],
                  recipe: list[dict] | None = None, unchecked: str = "") -> None:
    """Keep the records, the modules left untraced (name -> why), the recipe and why graphs
    were not checked against eager code (if so) with the model."""
    meta = {"records": records, "untraced": untraced, "recipe": list(recipe or []),
            "unchecked": unchecked}
    if isinstance(module, fx.GraphModule):
        module.meta[META_KEY] = meta
    else:
        module.__dict__["_legofx_meta"] = meta


def summary(gm: nn.Module) -> list[LayerRecord]:
    """One :class:`LayerRecord` per conv of the original model, in module order.

    Works on transformed and folded models; ``form`` tells which form each layer is in now.
    """
    result = []
    for record in stored_records(gm):
        record = dataclasses.replace(record, extra=dict(record.extra))
        if record.rewritten:
            layer = gm.get_submodule(record.name)
            record.form, record.lowering = layer.form, layer.lowering
            record.params_after = layer.params_after
        result.append(record)
    return result
