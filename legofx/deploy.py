"""Deploy folded models: ``export`` (``.pt2`` / ``.onnx``, each checked against PyTorch),
``compile`` (inductor / ONNX Runtime / Torch-TensorRT) and ``check_ops`` (TensorRT op set).

Every entry point refuses a model that still has training-form legofx layers, and compares
what it produced with the eager model on the example inputs within :data:`TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from legofx.arguments import as_input_tuple
from legofx.layer_base import RewrittenLayer
from legofx.onnx_runtime import OPSET, OnnxRuntimeModule, save_onnx
from legofx.op_check import OpReport, UnsupportedOpsError, check_program, load_torch_tensorrt

# Largest accepted error, as max|deployed - eager| / max|eager| over each output. The two sides
# compute the same function with other kernels (conv algorithms, fused BN, other summation
# orders), so they differ by rounding, which grows with the accumulation length and depth but
# stays a small multiple of the format's unit roundoff u; a real defect (a wrong index or
# coefficient, a dropped layer) gives errors of order 1.
#   float64: u = 1.1e-16;  1e-9 is far above any rounding.
#   float32: u = 6.0e-8;   observed ~3e-7 (resnet18, ONNX Runtime CPU); 1e-4 leaves 300x.
#   float16: u = 4.9e-4;   observed ~5e-4 (resnet18: both sides round every layer's output to
#                          fp16, in different places); 1e-2 is 20x that and ~20 u.
#   bfloat16: u = 3.9e-3;  5e-2 (~13 u), by the same reasoning (not exercised by ONNX).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
              torch.bfloat16: 5e-2}
BACKENDS = ("inductor", "onnxruntime", "tensorrt")


class MismatchError(RuntimeError):
    """The deployed model does not compute what the eager model computes."""


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


def require_inference_form(model: nn.Module) -> None:
    """Refuse training-form legofx layers and training mode."""
    training = [name or "<root>" for name, m in model.named_modules()
                if isinstance(m, RewrittenLayer) and m.form == "training"]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise ValueError(f"the model has training-form legofx layers ({shown}): call "
                         "legofx.fold(model.eval()) first and deploy the folded model")
    if any(m.training for m in model.modules()):
        raise ValueError("the model is in training mode: call model.eval() first")


def require_standard_ops(model: nn.Module, where: str) -> None:
    """Refuse layers lowered with a legofx custom op (``"fused"``) for ONNX / TensorRT."""
    custom = [name for name, m in model.named_modules()
              if isinstance(m, RewrittenLayer) and not m.standard_ops]
    if custom:
        shown = ", ".join(custom[:5]) + (f" and {len(custom) - 5} more" if len(custom) > 5 else "")
        raise ValueError(f"{where} does not take the legofx custom op of the fused lowering "
                         f"({shown}): fold with strategy gather, accumulate, merge-conv, dense "
                         f"or auto for it, and run fused models in PyTorch or torch.compile")


def model_dtype(model: nn.Module, inputs: tuple[torch.Tensor, ...] = ()) -> torch.dtype:
    """The floating-point dtype the model computes in (its first floating tensor's)."""
    for tensor in [*model.parameters(), *model.buffers(), *inputs]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def output_error(actual, expected) -> tuple[float, float]:
    """(max|a - e| / max|e|, max|a - e|): the worst over all outputs, in float64."""
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    if len(actual) != len(expected):
        raise MismatchError(f"{len(actual)} outputs, expected {len(expected)}")
    relative = absolute = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape or a.dtype != e.dtype:
            raise MismatchError(f"output {a.dtype} {tuple(a.shape)}, expected {e.dtype} "
                                f"{tuple(e.shape)}")
        e = e.detach().cpu().double()
        diff = (a.detach().cpu().double() - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        absolute = max(absolute, diff)
        relative = max(relative, diff / scale if scale > 0 else diff)
    return relative, absolute


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
    """The Torch-TensorRT op check of ``model``'s exported graph (see :mod:`legofx.op_check`)."""
    require_inference_form(model)
    inputs = as_input_tuple(example_inputs, tensors_only=True)
    return check_program(export_program(model, inputs, dynamic_batch=False), model)


@torch.no_grad()
def _verify(deployed, model: nn.Module, batches: list[tuple], dtype: torch.dtype, what: str
            ) -> tuple[float, float, float]:
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    worst = (0.0, 0.0)
    for inputs in batches:
        worst = max(worst, output_error(deployed(*inputs), model(*inputs)))
    if worst[0] > tolerance:
        raise MismatchError(f"{what} differs from the PyTorch model: max error {worst[0]:.3e} of "
                            f"the output scale (abs {worst[1]:.3e}) > tolerance {tolerance:g} "
                            f"for {dtype}")
    return worst[0], worst[1], tolerance


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
    error, absolute, tolerance = _verify(deployed, model, batches, dtype, f"{path.name}")
    return ExportResult(path, kind, dtype, error, absolute, tolerance,
                        tuple(b[0].shape[0] for b in batches), ops)


def compile(model: nn.Module, example_inputs, backend: str = "inductor", *,  # noqa: A001
            verify: bool = True, **options) -> nn.Module:
    """A compiled, callable version of a folded (or any plain) model.

    ``inductor``: ``torch.compile`` (``options`` go to it). ``onnxruntime``: the model
    exported to ONNX, run by an ONNX Runtime session wrapped in an ``nn.Module`` (tensors in
    and out; ``options``: ``opset``, and ``session_config``, ONNX Runtime session config
    entries such as :data:`legofx.onnx_runtime.TAKING_TURNS` for sessions timed in turn).
    ``tensorrt``: ``torch_tensorrt.compile(ir="dynamo", min_block_size=1)`` in the model's
    dtype, for the example inputs' shapes (needs the ``legofx[tensorrt]`` extra, TensorRT's
    libraries and a GPU; save it with :func:`save_tensorrt`). With ``verify`` the result is
    run once on the example inputs (so compilation happens here) and compared with the eager
    model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got backend={backend!r}")
    require_inference_form(model)
    if backend != "inductor":
        require_standard_ops(model, {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}[backend])
    inputs = as_input_tuple(example_inputs, tensors_only=True)
    dtype = model_dtype(model, inputs)
    if backend == "inductor":
        compiled = torch.compile(model, backend="inductor", **options)
    elif backend == "onnxruntime":
        compiled = OnnxRuntimeModule.from_program(export_program(model, inputs), inputs, **options)
    else:
        trt = load_torch_tensorrt()
        options = {"min_block_size": 1, "enabled_precisions": {dtype}, **options}
        compiled = trt.compile(model, ir="dynamo", arg_inputs=list(inputs), **options)
    if verify:
        _verify(compiled, model, [inputs], dtype, f"the {backend} module")
    return compiled


def save_tensorrt(module: nn.Module, path, example_inputs) -> None:
    """Save a module from ``compile(..., backend="tensorrt")`` with ``torch_tensorrt.save``."""
    inputs = as_input_tuple(example_inputs, tensors_only=True)
    load_torch_tensorrt().save(module, str(path), arg_inputs=list(inputs))
