"""ONNX files from exported programs, and ONNX Runtime sessions wrapped as ``nn.Module``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch import nn

OPSET = 18  # the opset torch.onnx's dynamo exporter (onnxscript's torchlib) targets natively
_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit: larger weights go to path.data
_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}

# ONNX Runtime session config for sessions that take turns in one process (interleaved timing,
# ``fold(strategy="auto", backend="onnxruntime")``): by default a session's worker threads keep
# spinning after a run, and take the cores of the session that runs next (docs/performance.md
# has the measurement). A session that runs alone is faster with spinning (the default).
TAKING_TURNS = {"session.intra_op.allow_spinning": "0"}


def names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def save_onnx(program: torch.export.ExportedProgram, inputs: tuple, path: Path,
              opset: int = OPSET, kwargs: dict | None = None,
              output_names: list[str] | None = None) -> None:
    """Write ``program`` as ONNX (its dynamic dimensions stay dynamic); one file unless the
    weights exceed protobuf's limit. Inputs keep torch.export's names (the arguments', with
    ``_0``... for nested tensors); ``output_names`` (one per output tensor) name the outputs,
    ``output``, ``output_0``... without; one that an input has already (diffusers' ``sample``
    in and out) becomes ``output.sample``."""
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got opset={opset}")
    weights = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    outputs = len(_tensor_outputs(program))
    if output_names is None or len(output_names) != outputs:
        output_names = names("output", outputs)
    inputs_named = {str(name) for name in program.graph_signature.user_inputs}
    output_names = [f"output.{name}" if name in inputs_named else name for name in output_names]
    torch.onnx.export(program, inputs, str(path), kwargs=kwargs, dynamo=True, opset_version=opset,
                      output_names=output_names,
                      external_data=weights > _SINGLE_FILE_BYTES, verbose=False)
    _restore_output_dtypes(path, [node.meta["val"].dtype for node in _tensor_outputs(program)])


def _tensor_outputs(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The program's outputs that are tensors (the ONNX file's outputs); ``None`` and other
    constants among its outputs are not in the file."""
    return [node for node in _user_outputs(program) if isinstance(node, torch.fx.Node)]


def _user_outputs(program: torch.export.ExportedProgram) -> list:
    """The output node's entries that the model returns (after any mutated buffers)."""
    count = len(program.graph_signature.user_outputs)
    return list(program.graph.output_node().args[0][-count:]) if count else []


def output_structure(program: torch.export.ExportedProgram):
    """A function that puts the ONNX file's output tensors back into the structure the model
    returns (dicts, tuples, dataclasses, ``ModelOutput``), with its constant outputs (``None``
    and the like) where they were."""
    leaves = _user_outputs(program)
    spec = program.call_spec.out_spec

    def rebuild(tensors):
        found = iter(tensors)
        values = [next(found) if isinstance(leaf, torch.fx.Node) else leaf for leaf in leaves]
        return values[0] if spec is None else pytree.tree_unflatten(values, spec)
    return rebuild


def _restore_output_dtypes(path: Path, dtypes: list[torch.dtype]) -> None:
    """Cast outputs back to the program's dtypes. torch 2.14's exporter computes a float16
    ``sum`` in float32 and drops the cast back when the sum is a graph output, so a float16
    model ending in a folded Lego merge would return float32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for output, dtype in zip(model.graph.output, dtypes):
        want = _ONNX_TYPES.get(dtype)
        if want is None or output.type.tensor_type.elem_type == want:
            continue
        inner = f"{output.name}_before_cast"
        for node in model.graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
            node.input[:] = [inner if name == output.name else name for name in node.input]
        model.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=want))
        output.type.tensor_type.elem_type = want
        changed = True
    if changed:
        onnx.save(model, str(path))


def numpy_input(tensor: torch.Tensor):
    if tensor.dtype == torch.bfloat16:
        raise TypeError("ONNX Runtime's Python API takes numpy arrays and numpy has no bfloat16; "
                        "use float16 or float32 for ONNX")
    return tensor.detach().cpu().contiguous().numpy()  # channels_last -> the NCHW ONNX expects


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime ``InferenceSession`` called like the model it was exported from.

    Tensors go in and come out (on the inputs' device; through host memory, no IO binding).
    """

    def __init__(self, session, device: torch.device, rebuild=None) -> None:
        super().__init__()
        self.session, self.device, self.rebuild = session, device, rebuild
        self.input_names = [i.name for i in session.get_inputs()]

    @classmethod
    def from_file(cls, path: Path, device: torch.device = torch.device("cpu"),
                  session_config: dict[str, str] | None = None) -> OnnxRuntimeModule:
        """A session for the ONNX file ``path``; ``session_config``: ONNX Runtime session
        config entries (e.g. :data:`TAKING_TURNS`)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        return cls(ort.InferenceSession(str(path), options, providers=providers), device)

    @classmethod
    def from_program(cls, program: torch.export.ExportedProgram, inputs: tuple,
                     opset: int = OPSET, session_config: dict[str, str] | None = None
                     ) -> OnnxRuntimeModule:
        """Export to a temporary ONNX file and load it (the session keeps what it needs)."""
        device = inputs[0].device if inputs else torch.device("cpu")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            save_onnx(program, inputs, path, opset)
            module = cls.from_file(path, device, session_config)
        module.rebuild = output_structure(program)
        return module

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
        feeds = {name: numpy_input(t) for name, t in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(out).to(self.device) for out in self.session.run(None, feeds)]
        if self.rebuild is not None:
            return self.rebuild(outputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
