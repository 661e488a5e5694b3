"""Inputs and outputs of any pytree structure (tensors in tuples, lists, dicts, dataclasses,
transformers ``ModelOutput``): their leaves, named by path, as ONNX flattens them."""

from __future__ import annotations

import dataclasses
import torch
import torch.utils._pytree as pytree

# Leaves torch.export takes as constants besides tensors.
_CONSTANTS = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _parts(path) -> list[str]:
    parts = []
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return parts


def display(root: str, path) -> str:
    """``out.hidden_states[2]``: where a leaf sits, as a user would write it."""
    text = root
    for key, part in zip(path, _parts(path)):
        text += f"[{part}]" if isinstance(key, pytree.SequenceKey) or not part.isidentifier() \
            else f".{part}"
    return text


def onnx_name(path, prefix: str) -> str:
    """``hidden_states.2``: a leaf's ONNX name (``prefix`` alone for a single tensor,
    ``prefix_0`` ... for a flat tuple, as before)."""
    name = ".".join(_parts(path))
    return prefix if not name else f"{prefix}_{name}" if name[0].isdigit() else name


def leaves_with_paths(value, path: tuple = ()) -> list[tuple[tuple, object]]:
    """``pytree.tree_flatten_with_path(value)[0]``, also for nodes registered without key
    paths (diffusers' ``BaseOutput``): their children are keyed by the context's names when it
    lists one per child, else by position."""
    node_type = pytree._get_node_type(value)
    handler = pytree.SUPPORTED_NODES.get(node_type)
    if handler is None:
        return [(path, value)]
    if handler.flatten_with_keys_fn is not None:
        keyed = handler.flatten_with_keys_fn(value)[0]
    else:
        children, context = handler.flatten_fn(value)
        named = isinstance(context, (list, tuple)) and len(context) == len(children) and all(
            isinstance(key, str) for key in context)
        keyed = [(pytree.MappingKey(context[i]) if named else pytree.SequenceKey(i), child)
                 for i, child in enumerate(children)]
    return [found for key, child in keyed for found in leaves_with_paths(child, (*path, key))]


def register_dataclasses(value) -> None:
    """Register the dataclasses found in ``value`` as pytree nodes (what ``torch.export``
    needs to take or return them); registered ones are left as they are."""
    for _ in range(32):  # one level of nesting per round
        kinds = {type(leaf) for leaf in pytree.tree_leaves(value)
                 if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type)}
        if not kinds:
            return
        for kind in kinds:
            torch.export.register_dataclass(kind, serialized_type_name=
                                            f"{kind.__module__}.{kind.__qualname__}")


def check_leaves(value, root: str, what: str) -> None:
    """Refuse a leaf ``torch.export`` cannot take or return, naming it by its path."""
    for path, leaf in leaves_with_paths(value):
        if not isinstance(leaf, (torch.Tensor, *_CONSTANTS)):
            raise TypeError(
                f"{display(root, path)} is a {type(leaf).__name__}, which torch.export cannot "
                f"take as {what}: use tensors in tuples, lists, dicts or dataclasses (or register "
                f"{type(leaf).__name__} with torch.utils._pytree.register_pytree_node)")


def tensor_leaves(value, root: str = "out") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``value`` with its path, in pytree (= ONNX) order."""
    return [(display(root, path), leaf) for path, leaf in leaves_with_paths(value)
            if isinstance(leaf, torch.Tensor)]


def output_names(value, prefix: str = "output") -> list[str]:
    """ONNX names of the tensor leaves of an output ``value``."""
    return [onnx_name(path, prefix) for path, leaf in leaves_with_paths(value)
            if isinstance(leaf, torch.Tensor)]


def ordered_kwargs(kwargs: dict, program: torch.export.ExportedProgram) -> dict:
    """``kwargs`` in the order ``program`` flattens them (its signature's)."""
    spec = program.call_spec.in_spec
    order = spec.child(1).context if spec is not None and spec.num_children == 2 else None
    return {key: kwargs[key] for key in order} if order is not None else dict(kwargs)


def flat_tensors(args: tuple, kwargs: dict, program: torch.export.ExportedProgram
                 ) -> list[torch.Tensor]:
    """The tensors of ``(args, kwargs)`` in the order of ``program``'s (and its ONNX file's)
    inputs."""
    return [leaf for leaf in pytree.tree_leaves((args, ordered_kwargs(kwargs, program)))
            if isinstance(leaf, torch.Tensor)]
