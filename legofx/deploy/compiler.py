"""``compile``: a folded (or any plain) model compiled for inductor, ONNX Runtime or
Torch-TensorRT; the same backends are registered for ``fold(strategy="auto", backend=...)``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.fx as fx
from torch import Tensor, nn

from legofx.core.arguments import as_input_tuple
from legofx.deploy.exporter import export, export_program
from legofx.deploy.onnx_runtime import TAKING_TURNS, OnnxRuntimeModule
from legofx.deploy.op_check import load_torch_tensorrt
from legofx.deploy.verify import model_dtype, require_inference_form, require_standard_ops, check_outputs
from legofx.lowering.registry import register_backend

BACKENDS = ("inductor", "onnxruntime", "tensorrt")


def compile(model: nn.Module, example_inputs, backend: str = "inductor", *,  # noqa: A001
            verify: bool = True, **options) -> nn.Module:
    """A compiled, callable version of a folded (or any plain) model.

    ``inductor``: ``torch.compile`` (``options`` go to it). ``onnxruntime``: the model
    exported to ONNX, run by an ONNX Runtime session wrapped in an ``nn.Module`` (tensors in
    and out; ``options``: ``opset``, and ``session_config``, ONNX Runtime session config
    entries such as :data:`legofx.deploy.onnx_runtime.TAKING_TURNS` for sessions timed in turn).
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
        check_outputs(compiled, model, [(inputs, {})], dtype, f"the {backend} module")
    return compiled


def save_tensorrt(module: nn.Module, path, example_inputs) -> None:
    """Save a module from ``compile(..., backend="tensorrt")`` with ``torch_tensorrt.save``."""
    inputs = as_input_tuple(example_inputs, tensors_only=True)
    load_torch_tensorrt().save(module, str(path), arg_inputs=list(inputs))


def prepare_for_timing(backend: str):
    """How ``fold(strategy="auto", backend=backend)`` prepares each candidate layer.

    ``x`` is the layer's input, or the whole model's tuple of tensor inputs (the whole-model
    check of ``"auto"``). For inductor the layer is first traced into a GraphModule of its own
    (where it traces), so that dynamo compiles every candidate separately, for static shapes,
    instead of reusing (or giving up after) the compilations of other layers of the same
    class; ONNX Runtime sessions take turns.
    """

    def prepare(layer: nn.Module, x: Tensor | tuple[Tensor, ...]):
        if backend == "inductor":
            return compile(_traced_or_itself(layer), x, backend, verify=False, dynamic=False)
        if backend == "onnxruntime":
            return compile(layer, x, backend, verify=False, session_config=TAKING_TURNS)
        return compile(layer, x, backend, verify=False)

    return prepare


def _traced_or_itself(module: nn.Module) -> nn.Module:
    """``module`` as a GraphModule where it is one or traces, else as it is."""
    if isinstance(module, fx.GraphModule):
        return module
    try:
        return fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - a whole model need not trace; dynamo takes it as it is
        return module


def int8_session(model: nn.Module, x: Tensor | tuple[Tensor, ...]) -> OnnxRuntimeModule:
    """How ``fold(strategy="auto", backend="onnxruntime-int8")`` prepares each candidate: the
    int8 QDQ file ``export(quantize="int8")`` writes, calibrated on ``x`` itself (enough to
    time it; its accuracy is checked when the chosen model is exported), in an ONNX Runtime
    session taking turns. The file lives in a private temporary folder while it loads."""
    inputs = as_input_tuple(x, tensors_only=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "candidate.onnx"
        export(model, inputs, path, check=None, dynamic_batch=False, quantize="int8",
               calibration=[inputs], min_cosine=-1.0)
        return OnnxRuntimeModule.from_file(path, session_config=TAKING_TURNS)


for _backend in BACKENDS:
    register_backend(_backend, prepare_for_timing(_backend))
register_backend("onnxruntime-int8", int8_session)
