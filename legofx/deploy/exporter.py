"""``export``: a folded (or any plain) model to ``.pt2`` or ``.onnx``, verified against PyTorch;
``check_ops``: the Torch-TensorRT op check of its exported graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from legofx.core.arguments import as_input_tuple
from legofx.deploy.onnx_runtime import OPSET, OnnxRuntimeModule, save_onnx
from legofx.deploy.op_check import OpReport, UnsupportedOpsError, check_program
from legofx.deploy.verify import (MismatchError, model_dtype, require_inference_form,
                                  require_standard_ops, check_outputs)


@dataclass
class ExportResult:
    """What :func:`export` wrote and verified.

    ``max_error`` is max|deployed - eager| / max|eager| (the worst output) over the example
    inputs and, with a dynamic batch, a second batch size (``batches``); ``max_abs_error`` the
    same without the scaling; ``ops`` the Torch-TensorRT op check (``None`` if not asked).
    """

    path: Path
    format: str
    dtype: torch.dtype
    max_error: float
    max_abs_error: float
    tolerance: float
    batches: tuple[int, ...]
    ops: OpReport | None = None

    def __str__(self) -> str:
        runtime = "ONNX Runtime" if self.format == "onnx" else "reloaded torch.export program"
        lines = [f"{runtime} vs PyTorch ({str(self.dtype).removeprefix('torch.')}, batch "
                 f"{', '.join(map(str, self.batches))}): max error {self.max_error:.2e} of the "
                 f"output scale (abs {self.max_abs_error:.2e}) <= tolerance {self.tolerance:g}"]
        if self.ops is not None:
            lines.append(str(self.ops))
        return "\n".join(lines)


def _batch_of_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A batch of 2 (torch.export specialises a dimension it sees as 1, even if asked not to)."""
    return tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in inputs)


def export_program(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model``, with dimension 0 of every input dynamic if asked."""
    if not dynamic_batch:
        return torch.export.export(model, inputs)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, _batch_of_two(inputs),
                               dynamic_shapes=tuple({0: batch} if t.dim() else None for t in inputs))


def check_ops(model: nn.Module, example_inputs) -> OpReport:
    """The Torch-TensorRT op check of ``model``'s exported graph (see :mod:`legofx.deploy.op_check`)."""
    require_inference_form(model)
    inputs = as_input_tuple(example_inputs, tensors_only=True)
    return check_program(export_program(model, inputs, dynamic_batch=False), model)


def export(model: nn.Module, example_inputs, path, *, check: str | None = "tensorrt",
           dynamic_batch: bool = True, opset: int = OPSET) -> ExportResult:
    """Export a folded (or any plain) model to ``path`` and verify the file against PyTorch.

    ``.pt2``: ``torch.export`` program saved with ``torch.export.save``, reloaded and run.
    ``.onnx``: ONNX (``opset`` >= 17), run in ONNX Runtime. Dimension 0 of every input is
    dynamic unless ``dynamic_batch=False``; both files are checked at the example batch and a
    second one. ``check="tensorrt"`` first runs the Torch-TensorRT op check and raises
    :class:`UnsupportedOpsError` (nothing written) if a node has no converter; ``None`` skips.
    Raises :class:`MismatchError` if the file's outputs differ beyond :data:`TOLERANCES`.
    """
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("pt2", "onnx"):
        raise ValueError(f"path must end in .pt2 (torch.export) or .onnx (ONNX), got {str(path)!r}")
    if check not in ("tensorrt", None):
        raise ValueError(f"check must be 'tensorrt' or None, got check={check!r}")
    require_inference_form(model)
    if kind == "onnx":
        require_standard_ops(model, "ONNX")
    inputs = as_input_tuple(example_inputs, tensors_only=True)
    program = export_program(model, inputs, dynamic_batch)
    ops = check_program(program, model) if check else None
    if ops is not None and not ops.ok:
        raise UnsupportedOpsError(ops)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pt2":
        torch.export.save(program, str(path))
        deployed = torch.export.load(str(path)).module()
    else:
        save_onnx(program, inputs, path, opset)
        deployed = OnnxRuntimeModule.from_file(path, inputs[0].device)
    batches = [inputs]
    if dynamic_batch:  # and at twice the example batch
        batches.append(tuple(torch.cat([t, t]) if t.dim() else t for t in inputs))
    dtype = model_dtype(model, inputs)
    error, absolute, tolerance = check_outputs(deployed, model, batches, dtype, f"{path.name}")
    return ExportResult(path, kind, dtype, error, absolute, tolerance,
                        tuple(b[0].shape[0] for b in batches), ops)
