"""int8 ONNX files: a verified float32 ONNX file quantized by ONNX Runtime's static quantizer in
QDQ form (``QuantizeLinear`` / ``DequantizeLinear`` around each quantized op: the explicit
quantization TensorRT builds int8 engines from, and ONNX Runtime runs), with per-channel int8
weights and uint8 activations calibrated on the user's batches.

Only ``Conv``, ``MatMul`` and ``Gemm`` are quantized (:data:`QUANTIZED_OPS`): they hold nearly
all the weights and the arithmetic. The Lego merge's ``Gather`` (index_select), ``Mul`` by the
coefficients and ``ReduceSum`` stay float: they are elementwise and memory-bound with no
weights worth shrinking, and in QDQ form each would add a quantize / dequantize pair around
an op that is cheaper than the pair (the sum of ``o`` products is also where an int8 rounding
of each product would add up).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from legofx.core.arguments import as_args
from legofx.deploy.onnx_runtime import OnnxRuntimeModule, numpy_input
from legofx.deploy.structure import flat_tensors, tensor_leaves
from legofx.deploy.verify import MismatchError, max_error

QUANTIZE = ("int8",)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
MIN_COSINE = 0.99  # default threshold of the int8 file's agreement with the float model


def check_quantize_arguments(quantize, calibration, min_cosine, kind: str, args: tuple
                             ) -> list[tuple] | None:
    """The calibration batches as argument tuples, checked against ``args`` (the example
    inputs): same structure, same shapes but for dimension 0 of the batched tensors. Every
    error is raised here, before any export work; ``None`` without ``quantize``."""
    if quantize is None:
        if calibration is not None:
            raise ValueError("calibration is only used with quantize='int8'; got calibration "
                             "without quantize")
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8', got quantize={quantize!r}")
    if kind != "onnx":
        raise ValueError(f"quantize={quantize!r} writes a QDQ ONNX file: give a path ending in "
                         f".onnx (got a .{kind} path); int8 for PyTorch is not in torch 2.14")
    if isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float)) or \
            not -1.0 <= min_cosine <= 1.0 or math.isnan(min_cosine):
        raise ValueError(f"min_cosine must be a number in [-1, 1], got min_cosine={min_cosine!r}")
    if calibration is None or isinstance(calibration, (torch.Tensor, str)):
        raise ValueError("quantize='int8' needs calibration=: an iterable of calibration batches, "
                         "each a tensor or a tuple of inputs like example_inputs (a few batches "
                         f"of real data), got calibration={calibration!r:.60}")
    batches = [as_args(batch) for batch in calibration]
    if not batches:
        raise ValueError("calibration is empty: give at least one batch of inputs")
    expected = tensor_leaves(args, "example_inputs")
    structure = pytree.tree_structure(args)
    for number, batch in enumerate(batches):
        if pytree.tree_structure(batch) != structure:
            raise ValueError(f"calibration batch {number} is not shaped like example_inputs: "
                             f"{pytree.tree_structure(batch)} vs {structure}")
        for (name, want), (_, got) in zip(expected, tensor_leaves(batch, "example_inputs")):
            batched = want.dim() >= 2 and any(want is a for a in args)
            if got.shape[batched:] != want.shape[batched:] or got.dtype != want.dtype:
                raise ValueError(f"calibration batch {number}: {name} is {got.dtype} "
                                 f"{tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
                                 + (" (any batch size)" if batched else ""))
    return batches


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a list of input feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def quantize_file(source: Path, target: Path, feeds: list[dict], per_channel: bool = True) -> None:
    """``source`` (float ONNX) -> ``target`` (QDQ int8): ``quant_pre_process`` (shape inference
    and graph optimisation), then ``quantize_static`` calibrated (min-max) on ``feeds``."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(feeds)
        quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        prepared.unlink(missing_ok=True)


def int8_agreement(actual, expected) -> tuple[float, float]:
    """(cosine similarity, max relative error) of int8 outputs against float ones, the worst
    over all floating output tensors, in float64: the cosine is what int8 rounding keeps (the
    direction of each output), max|a - e| / max|e| the largest single deviation."""
    cosine, relative = 1.0, 0.0
    for a, (_, e) in zip([t for _, t in tensor_leaves(actual)], tensor_leaves(expected)):
        if not e.is_floating_point() or not e.numel():
            continue
        relative = max(relative, max_error(a, e)[0])
        a, e = a.detach().cpu().double().flatten(), e.detach().cpu().double().flatten()
        norms = a.norm() * e.norm()
        cosine = min(cosine, (a @ e / norms).item() if norms > 0 else float(torch.equal(a, e)))
    return cosine, relative


def write_int8(staged: Path, model, program, calibration: list[tuple], kwargs: dict,
               checked: list[tuple[tuple, dict]], min_cosine: float) -> tuple[float, float]:
    """Replace the verified float ONNX file ``staged`` by its int8 QDQ form, calibrated on
    ``calibration`` (argument tuples; ``kwargs`` as the example's), and check it on ``checked``
    against ``model``. Returns (cosine, max relative error); raises :class:`MismatchError`
    when the cosine falls below ``min_cosine``."""
    names = OnnxRuntimeModule.from_file(staged).input_names
    feeds = [dict(zip(names, map(numpy_input, flat_tensors(batch, kwargs, program))))
             for batch in calibration]
    int8 = staged.with_name(staged.stem + ".int8.onnx")
    quantize_file(staged, int8, feeds)
    session = OnnxRuntimeModule.from_file(int8)
    cosine, relative = 1.0, 0.0
    with torch.no_grad():
        for args, kw in checked:
            found = int8_agreement(session(*flat_tensors(args, kw, program)), model(*args, **kw))
            cosine, relative = min(cosine, found[0]), max(relative, found[1])
    if cosine < min_cosine:
        raise MismatchError(f"the int8 file's outputs have cosine similarity {cosine:.5f} with "
                            f"the float model's (max relative error {relative:.3e}) < "
                            f"min_cosine={min_cosine}: calibrate on more (or more typical) "
                            f"batches, or lower min_cosine")
    int8.replace(staged)
    return cosine, relative
