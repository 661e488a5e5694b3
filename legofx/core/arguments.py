"""Checks of user arguments: each bad value raises an error that names the argument and value."""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    return model


def check_positive_int(name: str, value: object) -> int:
    """An int >= 1; bools and floats are refused (``o=2.0`` is a ``TypeError``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {name}={value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {name}={value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r} ({type(value).__name__})")
    return value


def check_size_spec(name: str, value: object, of: str) -> int | float:
    """A float fraction in (0, 1] of ``of``, or an absolute int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float in (0, 1] (a fraction of {of}) or an int >= 1 "
            f"(an absolute number), got {name}={value!r} ({type(value).__name__})"
        )
    if isinstance(value, numbers.Integral):
        return check_positive_int(name, value)
    value = float(value)
    if not (0.0 < value <= 1.0):  # also refuses NaN
        raise ValueError(
            f"{name} as a float is a fraction of {of} and must be in (0, 1], got {name}={value!r}; "
            f"pass an int for an absolute number"
        )
    return value


def resolve_size(spec: int | float, total: int) -> int:
    """An int spec as is; a fraction of ``total``, rounded half up, at least 1."""
    if isinstance(spec, int):
        return spec
    return max(1, math.floor(spec * total + 0.5))


class Patterns:
    """``include`` / ``exclude``: module names or glob patterns.

    A pattern selects a module whose qualified name matches it (``fnmatch``, where ``*`` also
    crosses dots) or lies under a matching prefix: ``"layer1"`` selects ``layer1.0.conv1``.
    """

    def __init__(self, include: object, exclude: object) -> None:
        self.include = self._check("include", include)
        self.exclude = self._check("exclude", exclude) or ()

    @staticmethod
    def _check(name: str, value: object) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
            raise TypeError(
                f"{name} must be a module name, a glob pattern or a list of them, got {name}={value!r}"
            )
        return tuple(value)

    @staticmethod
    def matches(pattern: str, name: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")

    def check_used(self, names: Sequence[str], kind: str) -> None:
        """Refuse patterns that match none of ``names``: a typo must not silently do nothing."""
        for arg, patterns in (("include", self.include or ()), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(self.matches(pattern, name) for name in names):
                    sample = ", ".join(repr(n) for n in names[:3]) or "none"
                    raise ValueError(
                        f"{arg} pattern {pattern!r} matches no {kind} module of the model "
                        f"(names look like {sample})"
                    )

    def reason_to_skip(self, name: str) -> str | None:
        for pattern in self.exclude:
            if self.matches(pattern, name):
                return f"excluded by exclude pattern {pattern!r}"
        if self.include is not None and not any(self.matches(p, name) for p in self.include):
            return f"not selected by include={list(self.include)!r}"
        return None


def as_input_tuple(example_inputs, tensors_only: bool = False) -> tuple:
    """``example_inputs`` (a tensor, or a tuple or list of a model's arguments) as a tuple;
    ``tensors_only``: a non-empty tuple of tensors, nothing else."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and (not tensors_only or example_inputs and all(
            isinstance(item, torch.Tensor) for item in example_inputs)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors, "
                    f"got {type(example_inputs).__name__}")


def as_args(example_inputs, allow_empty: bool = False) -> tuple:
    """``example_inputs`` as the positional arguments: a tensor, or a tuple / list of them (any
    structure inside); an empty one only with ``allow_empty``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and (example_inputs or allow_empty):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a {'' if allow_empty else 'non-empty '}"
                    "tuple of the model's positional arguments (tensors, or tuples, lists, dicts "
                    f"of tensors), got example_inputs={example_inputs!r:.80} "
                    f"({type(example_inputs).__name__})")


def as_kwargs(example_kwargs) -> dict:
    """``example_kwargs`` (``None`` or a dict of keyword arguments) as a dict."""
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise TypeError("example_kwargs must be a dict of the model's keyword arguments, got "
                        f"example_kwargs={example_kwargs!r:.80} ({type(example_kwargs).__name__})")
    return dict(example_kwargs)


def example_call(example_inputs, example_kwargs) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of an example call (:func:`as_args`, :func:`as_kwargs`), or ``None``
    when neither is given; keywords alone are a call without positional arguments."""
    if example_inputs is None and example_kwargs is None:
        return None
    kwargs = as_kwargs(example_kwargs)
    return () if example_inputs is None else as_args(example_inputs, allow_empty=True), kwargs


def nested_tensors(value) -> list[torch.Tensor]:
    """Every tensor of ``value``: a tensor, or tuples / lists / dicts of them (dicts in sorted key
    order), in order; anything else holds none."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in nested_tensors(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in nested_tensors(item)]
    return []


def smallest_index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds ``0..largest`` (what the index is stored in)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def check_index_dtype(index_dtype, largest: int) -> torch.dtype:
    """``index_dtype`` as a dtype that holds ``0..largest``; ``"smallest"`` picks the smallest."""
    if index_dtype == "smallest":
        return smallest_index_dtype(largest)
    if not isinstance(index_dtype, torch.dtype) or index_dtype.is_floating_point or \
            index_dtype.is_complex or index_dtype == torch.bool:
        raise TypeError(f"index_dtype must be an integer torch.dtype or 'smallest', "
                        f"got index_dtype={index_dtype!r}")
    if largest > torch.iinfo(index_dtype).max:
        raise ValueError(f"index_dtype={index_dtype} cannot hold index {largest} (o*m - 1); "
                         "use a wider dtype or 'smallest'")
    return index_dtype
