"""Deploy folded models: ``export`` (``.pt2`` / ``.onnx``, verified), ``compile`` (inductor,
ONNX Runtime, Torch-TensorRT; registered as ``fold`` backends) and ``check_ops`` (the
Torch-TensorRT op check)."""

from legofx.deploy.compiler import BACKENDS, compile, save_tensorrt
from legofx.deploy.exporter import ExportResult, check_ops, export, export_program
from legofx.deploy.verify import TOLERANCES, MismatchError, output_error

__all__ = ["BACKENDS", "TOLERANCES", "ExportResult", "MismatchError", "check_ops", "compile",
           "export", "export_program", "output_error", "save_tensorrt"]
