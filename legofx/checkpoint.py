"""``legofx.save`` / ``legofx.restore``: checkpoints that do not depend on pickling code.

``torch.save(model)`` pickles the model's classes by name, so loading needs
``weights_only=False`` (which runs whatever the file says) and the same code. A legofx
checkpoint holds only data, loadable with ``torch.load(path, weights_only=True)``:

- ``format`` (:data:`FORMAT`) and the ``legofx`` version that wrote it;
- ``model_class``: the original model's class (``module.QualName``);
- ``recipe``: the calls that made the model from the original, in order (``transform`` /
  ``structure`` with their options; ``fold`` with the lowering each layer took,
  ``index_dtype`` and ``fuse_batchnorm``);
- ``state_dict``.

``restore(original_model, path)`` replays the recipe on a fresh original model (which is not
modified) and loads the state: the result is the saved model. A directory written by
transformers' ``save_pretrained`` of a model legofx made works too: ``transform`` puts the
recipe in ``config.legofx``, which ``save_pretrained`` writes to ``config.json`` beside the
weights.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from legofx.core.arguments import check_model
from legofx.core.files import write_atomically
from legofx.core.records import stored_recipe
from legofx.core.version import VERSION
from legofx.fx.traced_module import SOURCE
from legofx.lowering.fold import fold
from legofx.methods.lego.api import transform
from legofx.methods.structured.api import structure

FORMAT = 1  # the layout of the checkpoint; raised when an older legofx could not read it
CALLS = {"transform": transform, "structure": structure}


def original_class(model: nn.Module) -> type:
    """The class of the model legofx started from (a traced root is ``Traced<Name>``)."""
    source = model.__dict__.get(SOURCE)
    return type(source) if source is not None else type(model)


def class_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (what ``transform``, ``structure`` or ``fold`` returned, trained or not)
    to ``path`` as a legofx checkpoint (see the module docstring); returns the path.

    The file appears whole or not at all (written beside ``path``, then renamed).
    """
    check_model(model)
    recipe = stored_recipe(model)  # refuses models legofx did not make
    if not recipe:
        raise ValueError(f"{type(model).__name__} has no legofx recipe (it was made by a legofx "
                         "before 0.2): transform the original model again and load_state_dict its "
                         "weights, then save that")
    payload = {"format": FORMAT, "legofx": VERSION, "model_class": class_name(original_class(model)),
               "recipe": recipe, "state_dict": model.state_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomically(path, buffer.getvalue())


def _read_pretrained(folder: Path) -> dict:
    """The checkpoint fields of a ``save_pretrained`` folder of a legofx model."""
    config = json.loads((folder / "config.json").read_text())
    recipe = (config.get("legofx") or {}).get("recipe")
    if not recipe:
        raise ValueError(f"{folder}: config.json has no legofx recipe: this folder was not saved "
                         "from a model legofx made (save_pretrained of transform's result)")
    files = sorted(folder.glob("*.safetensors"))
    state: dict = {}
    if files:
        from safetensors.torch import load_file
        for file in files:
            state.update(load_file(file))
    elif (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", weights_only=True, map_location="cpu")
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin beside config.json")
    architectures = config.get("architectures") or []
    return {"format": FORMAT, "legofx": config["legofx"].get("version"), "recipe": recipe, "state_dict": state,
            "model_class": architectures[0] if architectures else None}


def read(path: str | Path) -> dict:
    """The fields of a legofx checkpoint file, or of a ``save_pretrained`` folder."""
    path = Path(path)
    if path.is_dir():
        return _read_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such file or folder")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - not a torch file, or one with pickled code
        raise ValueError(f"path={str(path)!r} is not a legofx checkpoint: torch.load(weights_only="
                         f"True) refused it ({type(err).__name__}; a file of pickled code, such as "
                         "torch.save(model), or not a torch file); write one with legofx.save") from None
    if not isinstance(payload, dict) or "recipe" not in payload or "format" not in payload:
        raise ValueError(f"path={str(path)!r} is a torch file but not a legofx checkpoint (no "
                         "format / recipe): write one with legofx.save")
    if payload["format"] != FORMAT:
        raise ValueError(f"path={str(path)!r} was written by legofx {payload.get('legofx')} in "
                         f"checkpoint format {payload['format']}; this legofx {VERSION} reads "
                         f"format {FORMAT}: load it with the legofx that wrote it")
    return payload


def _check_class(model: nn.Module, saved: str | None, path: Path) -> None:
    ours = original_class(model)
    if saved and saved not in (class_name(ours), ours.__name__):
        raise ValueError(f"path={str(path)!r} holds a {saved.rsplit('.', 1)[-1]} ({saved}), but "
                         f"model is a {ours.__name__} ({class_name(ours)}): restore it onto the "
                         "model class it was saved from")


def replay(model: nn.Module, recipe: list[dict]) -> nn.Module:
    """``model`` put through the recipe's calls (``model`` itself is not modified)."""
    result = model
    for step in recipe:
        call, options = step["call"], dict(step["options"])
        if call == "fold":  # the inference form, in eval mode as it was folded
            options["strategy"] = options.get("strategy") or None
            index_dtype = options.get("index_dtype", "int64")
            options["index_dtype"] = index_dtype if index_dtype == "smallest" else getattr(torch, index_dtype)
            result = fold(result.eval(), **options)
        elif call in CALLS:
            result = CALLS[call](result, **options)
        else:
            raise ValueError(f"the checkpoint's recipe has a step {call!r} this legofx does not "
                             f"know (known: {', '.join([*CALLS, 'fold'])})")
    return result


def restore(model: nn.Module, path: str | Path) -> nn.Module:
    """The model saved at ``path`` (by :func:`save`, or ``save_pretrained`` of a legofx model),
    rebuilt on ``model``, a fresh instance of the original class (not modified): its recipe
    replayed, then its state loaded (every key must match). A folded model comes back in eval
    mode, a training-form one in ``model``'s mode.

    One clear error when the checkpoint is of another model class, another rewrite (another
    ``o`` / ``m``: the layer shapes differ), or a checkpoint format this legofx does not read.
    """
    check_model(model)
    path = Path(path)
    payload = read(path)
    _check_class(model, payload.get("model_class"), path)
    result = replay(model, payload["recipe"])
    where = f"path={str(path)!r} does not fit this model after its recipe {_describe(payload['recipe'])}"
    try:
        missing, unexpected = result.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as err:  # shapes differ: another o / m, another model size
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"{where}: {' '.join(lines[1:3])[:500]}") from None
    if missing or unexpected:
        raise ValueError(f"{where}: {_keys(missing, 'missing from the checkpoint')}"
                         f"{'; ' if missing and unexpected else ''}"
                         f"{_keys(unexpected, 'in the checkpoint but not in the model')} (another "
                         "model configuration, or another include / exclude)")
    return result


def _keys(keys: list[str], what: str) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:3])
    return f"{len(keys)} key(s) {what} ({shown}{', ...' if len(keys) > 3 else ''})"


def _describe(recipe: list[dict]) -> str:
    parts = []
    for step in recipe:
        options = {k: v for k, v in step["options"].items() if k != "strategy" and v is not None}
        parts.append(f"{step['call']}({', '.join(f'{k}={v!r}' for k, v in options.items())})")
    return " -> ".join(parts)
