"""``export``: a folded (or any plain) model to ``.pt2`` or ``.onnx``, verified against PyTorch;
``check_ops``: the Torch-TensorRT op check of its exported graph."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from legofx.core.arguments import as_args, as_kwargs
from legofx.deploy.onnx_runtime import OPSET, OnnxRuntimeModule, output_structure, save_onnx
from legofx.deploy.op_check import OpReport, UnsupportedOpsError, check_program
from legofx.deploy.quantize import MIN_COSINE, check_quantize_arguments, write_int8
from legofx.deploy.structure import (check_leaves, flat_tensors, output_names,
                                     register_dataclasses)
from legofx.deploy.verify import (MismatchError, model_dtype, require_inference_form,
                                  require_standard_ops, check_outputs)


@dataclass
class ExportResult:
    """What :func:`export` wrote and verified.

    ``max_error`` is max|deployed - eager| / max|eager| (the worst output) over the example
    inputs and, with a dynamic batch, a second batch size (``batches``); ``max_abs_error`` the
    same without the scaling; ``ops`` the Torch-TensorRT op check (``None`` if not asked);
    ``dynamic``: whether the file's batch is dynamic; ``size_bytes`` the file's size. With
    ``quantized="int8"`` the errors are the float file's, checked before quantizing; ``cosine``
    and ``int8_max_error`` compare the int8 file with the float model.
    """

    path: Path
    format: str
    dtype: torch.dtype
    max_error: float
    max_abs_error: float
    tolerance: float
    batches: tuple[int, ...]
    ops: OpReport | None = None
    dynamic: bool = True
    size_bytes: int = 0
    quantized: str | None = None
    cosine: float | None = None
    int8_max_error: float | None = None

    def __str__(self) -> str:
        runtime = "ONNX Runtime" if self.format == "onnx" else "reloaded torch.export program"
        lines = [f"{runtime} vs PyTorch ({str(self.dtype).removeprefix('torch.')}, batch "
                 f"{', '.join(map(str, self.batches))}): max error {self.max_error:.2e} of the "
                 f"output scale (abs {self.max_abs_error:.2e}) <= tolerance {self.tolerance:g}"]
        if self.quantized:
            lines.append(f"{self.quantized} QDQ file ({self.size_bytes / 1e6:.2f} MB) vs the float "
                         f"model: cosine similarity {self.cosine:.5f}, max error "
                         f"{self.int8_max_error:.2e} of the output scale")
        if self.ops is not None:
            lines.append(str(self.ops))
        return "\n".join(lines)


def _dynamic_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors whose dimension 0 is the batch: each argument (or keyword argument) that is
    itself a tensor of 2 dimensions or more. Tensors nested in lists or dicts (a detection
    model's images) and vectors (a scale, a diffusion timestep broadcast over the batch) keep
    their shapes."""
    return [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.dim() >= 2]


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Dimension 0 of the first batched tensor (:func:`_dynamic_tensors`), ``None`` if none."""
    found = _dynamic_tensors(args, kwargs)
    return found[0].shape[0] if found else None


def _doubled(args: tuple, kwargs: dict, only_ones: bool = False) -> tuple[tuple, dict]:
    """The inputs at twice the batch (``only_ones``: only where the batch is 1)."""
    dynamic = {id(t) for t in _dynamic_tensors(args, kwargs)}

    def double(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t]) if id(t) in dynamic and (t.shape[0] == 1 or not only_ones) else t

    return (tuple(double(a) if isinstance(a, torch.Tensor) else a for a in args),
            {k: double(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def export_program(model: nn.Module, inputs: tuple, dynamic_batch: bool = True,
                   kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``inputs`` (and ``kwargs``), with dimension 0 of every
    tensor argument dynamic if asked (a batch of 1 is exported as 2: torch.export specialises a
    dimension it sees as 1, even if asked not to)."""
    kwargs = kwargs or {}
    if not dynamic_batch:
        return torch.export.export(model, inputs, kwargs)
    args, kwargs = _doubled(inputs, kwargs, only_ones=True)
    batch, shapes = torch.export.Dim("batch", min=1), torch.export.ShapesCollection()
    for tensor in _dynamic_tensors(args, kwargs):
        shapes[tensor] = {0: batch}
    return torch.export.export(model, args, kwargs,
                               dynamic_shapes=shapes.dynamic_shapes(model, args, kwargs))


def _program(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool | None
             ) -> tuple[torch.export.ExportedProgram, bool]:
    """The exported program and whether its batch is dynamic (``None``: if torch.export can)."""
    if dynamic_batch is False or not _dynamic_tensors(args, kwargs):
        return export_program(model, args, False, kwargs), False
    try:
        return export_program(model, args, True, kwargs), True
    except Exception as err:  # noqa: BLE001 - any failure of the dynamic export is retried fixed
        if dynamic_batch:
            raise ValueError(f"torch.export could not make the batch dynamic ({type(err).__name__}: "
                             f"{err});\nexport with a fixed batch (dynamic_batch=False: the "
                             f"example batch {_batch_size(args, kwargs)} only)"
                             ) from err
        program = export_program(model, args, False, kwargs)  # its own error if it fails too
        warnings.warn(f"torch.export could not make the batch dynamic ({str(err).splitlines()[0]}"
                      f"); exported with the example batch fixed. Pass dynamic_batch=False to "
                      f"ask for that and silence this warning", stacklevel=3)
        return program, False


def check_ops(model: nn.Module, example_inputs, example_kwargs: dict | None = None) -> OpReport:
    """The Torch-TensorRT op check of ``model``'s exported graph (see :mod:`legofx.deploy.op_check`)."""
    require_inference_form(model)
    kwargs = as_kwargs(example_kwargs)
    args = as_args(example_inputs, allow_empty=bool(kwargs))
    register_dataclasses((args, kwargs))
    return check_program(export_program(model, args, False, kwargs), model)


def export(model: nn.Module, example_inputs, path, *, example_kwargs: dict | None = None,
           check: str | None = "tensorrt", dynamic_batch: bool | None = None,
           opset: int = OPSET, quantize: str | None = None, calibration=None,
           min_cosine: float = MIN_COSINE) -> ExportResult:
    """Export a folded (or any plain) model to ``path`` and verify the file against PyTorch.

    ``example_inputs``: a tensor or a tuple of the model's positional arguments, and
    ``example_kwargs`` its keyword arguments; tensors may sit in tuples, lists, dicts,
    dataclasses, and so may they in the outputs (``ModelOutput`` too). ``.pt2``: the
    ``torch.export`` program, reloaded and run as it was called. ``.onnx`` (``opset`` >= 17):
    inputs and outputs flattened, named after their paths (``pixel_values``,
    ``hidden_states.2``), run in ONNX Runtime; every output tensor is compared.

    Dimension 0 of every tensor argument (not nested, 2-D or more) is the batch: dynamic with
    ``dynamic_batch=True``, fixed with ``False``; ``None`` (default): dynamic if
    ``torch.export`` can, otherwise fixed with a warning. A dynamic file is checked at the
    example batch and at twice it.
    ``check="tensorrt"`` first runs the Torch-TensorRT op check: a node of legofx's own layers
    without a converter raises :class:`UnsupportedOpsError`; nodes of the rest of the model
    without one are listed in a warning (Torch-TensorRT runs them in PyTorch); ``None`` skips.
    Raises :class:`MismatchError` if an output differs beyond :data:`TOLERANCES`. The file is
    written next to ``path`` under a temporary name and renamed only once verified: on any
    failure nothing is left, and a file already at ``path`` is untouched.

    ``quantize="int8"`` (``.onnx`` only): the verified float file is quantized by ONNX Runtime's
    static quantizer into QDQ form (int8 per-channel weights, uint8 activations; Conv, MatMul
    and Gemm, see :mod:`legofx.deploy.quantize`), calibrated on ``calibration``, an iterable of
    batches (each a tensor or a tuple like ``example_inputs``). The int8 file is checked on the
    example inputs against the float model: :class:`MismatchError` if the cosine similarity of
    any output falls below ``min_cosine`` (default 0.99).
    """
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("pt2", "onnx"):
        raise ValueError(f"path must end in .pt2 (torch.export) or .onnx (ONNX), got {str(path)!r}")
    if check not in ("tensorrt", None):
        raise ValueError(f"check must be 'tensorrt' or None, got check={check!r}")
    if dynamic_batch not in (True, False, None):
        raise TypeError(f"dynamic_batch must be True, False or None, got dynamic_batch={dynamic_batch!r}")
    require_inference_form(model)
    if kind == "onnx":
        require_standard_ops(model, "ONNX")
    kwargs = as_kwargs(example_kwargs)
    args = as_args(example_inputs, allow_empty=bool(kwargs))
    calibrating = check_quantize_arguments(quantize, calibration, min_cosine, kind, args)
    register_dataclasses((args, kwargs))
    check_leaves(args, "example_inputs", "an input")
    check_leaves(kwargs, "example_kwargs", "an input")
    with torch.no_grad():
        expected = model(*args, **kwargs)
    register_dataclasses(expected)
    check_leaves(expected, "out", "an output")
    # torch.export traces a copy: a model that caches tensors in its forward (ultralytics'
    # anchors) would otherwise keep the trace's fake tensors
    program, dynamic = _program(copy.deepcopy(model), args, kwargs, dynamic_batch)
    ops = check_program(program, model) if check else None
    if ops is not None and not ops.ok:
        raise UnsupportedOpsError(ops)
    if ops is not None and ops.outside:
        warnings.warn(ops.warning(), stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = flat_tensors(args, kwargs, program)
    batches = [(args, kwargs)] + ([_doubled(args, kwargs)] if dynamic else [])
    dtype = model_dtype(model, tuple(flat))
    with _staged(path) as staged:
        if kind == "pt2":
            torch.export.save(program, str(staged))
            deployed = torch.export.load(str(staged)).module()
        else:
            save_onnx(program, args, staged, opset, kwargs=kwargs, output_names=output_names(expected))
            session = OnnxRuntimeModule.from_file(staged, flat[0].device if flat else torch.device("cpu"))
            session.rebuild = output_structure(program)
            deployed = lambda *a, **k: session(*flat_tensors(a, k, program))  # noqa: E731
        error, absolute, tolerance = check_outputs(deployed, model, batches, dtype, path.name)
        cosine = int8_error = None
        if calibrating is not None:
            if not dynamic and any(_batch_size(batch, {}) not in (None, _batch_size(args, {}))
                                   for batch in calibrating):
                raise ValueError("the file's batch is fixed (see the warning above): give "
                                 "calibration batches of the example's batch size")
            cosine, int8_error = write_int8(staged, model, program, calibrating, kwargs,
                                            batches[:1], min_cosine)
        size = staged.stat().st_size
    sizes = tuple(size for size in (_batch_size(*b) for b in batches) if size is not None)
    return ExportResult(path, kind, dtype, error, absolute, tolerance, sizes, ops, dynamic, size,
                        quantize, cosine, int8_error)


@contextlib.contextmanager
def _staged(path: Path):
    """A temporary path beside ``path`` (in a private folder, same file system); renamed to
    ``path`` (with any external-data file) when the block succeeds, removed in any case."""
    folder = Path(tempfile.mkdtemp(prefix=".legofx-export-", dir=path.parent))
    try:
        yield folder / path.name
        for file in sorted(folder.iterdir(), key=lambda f: f.name == path.name):  # path last
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
