"""Does Torch-TensorRT convert every op of an exported graph? Which nodes does it not?

Where ``torch_tensorrt`` imports, its own converter registry answers (after its own
decompositions); elsewhere the static list :data:`TENSORRT_OPS` does, on the ATen graph
``torch.export`` gives after the decompositions Torch-TensorRT applies. Either way the answer
names every offending node and where it comes from.
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from legofx.core.layer import RewrittenLayer
from legofx.passes.inline_modules import region_of

# The ATen ops (``str(OpOverload)``) that Torch-TensorRT 2.x turns into TensorRT layers, read
# from its source (github.com/pytorch/TensorRT, py/torch_tensorrt/dynamo/):
#   1. ops with a ``@dynamo_tensorrt_converter`` in conversion/aten_ops_converters.py and
#      conversion/ops_evaluators.py (a few converters also check arguments, e.g. no
#      ``divisor_override`` in avg_pool, no dilation in max_pool; this list checks op types only);
#   2. ops its decomposition table (lowering/_decomposition_groups.py,
#      ``torch_enabled_decompositions``) rewrites into ops of group 1 before conversion.
# The graph is checked after the decompositions Torch-TensorRT applies to every program (all
# CompositeImplicitAutograd ops), see :func:`_composite_decompositions`. What its lowering
# passes (lowering/passes/) handle is decided per node in :func:`_lowered`: ``getitem``
# (converted when its producer is), ``max_pool*_with_indices`` (replaced by ``max_pool*`` when
# only the values are used: replace_max_pool_with_indices.py), assertions (deleted:
# remove_assert_nodes.py). 3-D ops are in: ``avg_pool3d``, ``max_pool3d``, and ``convolution`` (any
# rank). Left out on purpose: ``slice_scatter`` and ``empty.memory_format``, which circular
# padding becomes: only recent Torch-TensorRT sources convert them, ``empty`` only without the
# ``device`` argument exported graphs carry; so circular padding is reported, not assumed.
#   3. lowering passes that replace an op by one group 1 converts: the SDPA lowering
#    (lowering/passes/lower_scaled_dot_product_attention.py) replaces the flash and efficient
#    attention ops by ``scaled_dot_product_attention``; ``_scaled_dot_product_flash_attention_for_cpu``
#    is what the same call exports to on CPU (Torch-TensorRT traces on the GPU, where it is flash).
# Each entry keeps the file it was read from (:data:`TENSORRT_OP_SOURCES`), to re-read when
# Torch-TensorRT changes.
_SOURCE = "py/torch_tensorrt/dynamo/"
TENSORRT_OP_SOURCES: dict[str, str] = {
    **{f"aten.{op}": _SOURCE + "conversion/aten_ops_converters.py" for op in """
    convolution.default linear.default addmm.default mm.default bmm.default mv.default
    dot.default _cdist_forward.default _pdist_forward.default
    batch_norm.default native_batch_norm.default _native_batch_norm_legit_no_training.default
    layer_norm.default native_layer_norm.default group_norm.default native_group_norm.default
    relu.default sigmoid.default tanh.default leaky_relu.default elu.default softplus.default
    hardsigmoid.default gelu.default _prelu_kernel.default _softmax.default native_dropout.default
    avg_pool1d.default avg_pool2d.default avg_pool3d.default
    adaptive_avg_pool1d.default adaptive_avg_pool2d.default _adaptive_avg_pool2d.default
    adaptive_avg_pool3d.default _adaptive_avg_pool3d.default
    max_pool1d.default max_pool2d.default max_pool3d.default
    add.Tensor add.Scalar sub.Tensor sub.Scalar mul.Tensor mul.Scalar div.Tensor div.Tensor_mode
    div.Scalar div.Scalar_mode pow.Tensor_Tensor pow.Tensor_Scalar pow.Scalar
    floor_divide.default floor_divide.Scalar fmod.Tensor fmod.Scalar remainder.Tensor
    remainder.Scalar maximum.default minimum.default atan2.default
    clamp.default clamp.Tensor clip.default clip.Tensor where.self
    eq.Tensor eq.Scalar ne.Tensor ne.Scalar gt.Tensor gt.Scalar ge.Tensor ge.Scalar
    lt.Tensor lt.Scalar le.Tensor le.Scalar logical_and.default logical_or.default
    logical_xor.default logical_not.default bitwise_and.Tensor bitwise_and.Scalar
    bitwise_or.Tensor bitwise_or.Scalar bitwise_xor.Tensor bitwise_xor.Scalar bitwise_not.default
    exp.default expm1.default log.default log2.default log10.default log1p.default sqrt.default
    rsqrt.default reciprocal.default abs.default neg.default sign.default round.default
    ceil.default floor.default trunc.default erf.default isinf.default isnan.default
    sin.default cos.default tan.default sinh.default cosh.default asin.default acos.default
    atan.default asinh.default acosh.default atanh.default
    sum.default sum.dim_IntList mean.default mean.dim prod.default prod.dim_int amax.default
    amin.default max.default max.dim min.default min.dim any.default any.dim any.dims
    argmax.default argmin.default cumsum.default topk.default sort.default
    view.default reshape.default permute.default expand.default squeeze.dim squeeze.dims
    unsqueeze.default cat.default split.Tensor split.sizes split_with_sizes.default
    slice.Tensor select.int as_strided.default tile.default flip.default roll.default
    diagonal.default pixel_shuffle.default pixel_unshuffle.default resize_.default
    index_select.default index.Tensor gather.default scatter.src scatter.value
    index_put.default embedding.default embedding_bag.default _embedding_bag.default
    constant_pad_nd.default pad.default reflection_pad1d.default reflection_pad2d.default
    reflection_pad3d.default replication_pad1d.default replication_pad2d.default
    replication_pad3d.default _pad_circular.default
    upsample_nearest1d.default upsample_nearest2d.default upsample_nearest3d.default
    upsample_linear1d.default upsample_bilinear2d.default upsample_trilinear3d.default
    upsample_bicubic2d.default grid_sampler.default grid_sampler_2d.default
    clone.default _to_copy.default copy.default scalar_tensor.default
    arange.start_step full.default sym_size.int
    """.split()},
    "aten.detach.default": _SOURCE + "conversion/ops_evaluators.py",
    **{f"aten.{op}": _SOURCE + "lowering/_decomposition_groups.py" for op in """
    hardtanh.default hardswish.default silu.default mish.default celu.default
    threshold.default _log_softmax.default logsumexp.default var.correction var_mean.correction
    std.correction t.default transpose.int stack.default narrow.default repeat.default
    clamp_min.default clamp_max.default rsub.Scalar rsub.Tensor lerp.Scalar lerp.Tensor
    masked_fill.Scalar masked_fill.Tensor zeros.default ones.default zeros_like.default
    ones_like.default full_like.default new_zeros.default new_ones.default new_full.default
    new_empty.default unbind.int _unsafe_index.Tensor upsample_bilinear2d.vec
    linalg_vector_norm.default sgn.default xlogy.Tensor tril.default triu.default addcmul.default
    arange.default arange.start
    """.split()},
    **{f"aten.{op}": _SOURCE + "lowering/passes/lower_scaled_dot_product_attention.py" for op in """
    _scaled_dot_product_flash_attention.default _scaled_dot_product_efficient_attention.default
    _scaled_dot_product_flash_attention_for_cpu.default
    """.split()},
}
TENSORRT_OPS = frozenset(TENSORRT_OP_SOURCES)

_WITH_INDICES = {"aten.max_pool1d_with_indices.default", "aten.max_pool2d_with_indices.default",
                 "aten.max_pool3d_with_indices.default"}
_ASSERTIONS = {"aten._assert_scalar.default", "aten._assert_tensor_metadata.default"}
_EXTRA = "legofx[tensorrt]"


class TensorRTUnavailable(ImportError):
    """``torch_tensorrt`` is not installed, or cannot load TensorRT's libraries."""


def load_torch_tensorrt():
    """``import torch_tensorrt``, or a :class:`TensorRTUnavailable` that says what is missing.

    Without TensorRT's libraries the import raises a plain ``Exception``, not ``ImportError``.
    """
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as err:
        raise TensorRTUnavailable(
            f"the tensorrt backend needs Torch-TensorRT, which is not installed ({err}): "
            f"pip install '{_EXTRA}' (torch-tensorrt 2.14 with NVIDIA's TensorRT libraries "
            "and a CUDA GPU)") from err
    except Exception as err:  # noqa: BLE001 - torch_tensorrt's own failure mode
        raise TensorRTUnavailable(
            f"torch_tensorrt is installed but cannot load TensorRT's libraries ({type(err).__name__}: "
            f"{err}); install NVIDIA TensorRT for CUDA (the '{_EXTRA}' extra needs them, and "
            "PyPI's tensorrt packages only download them from NVIDIA's server)") from err


@dataclass
class OpIssue:
    """One node Torch-TensorRT would not convert: its name, op and where it comes from."""

    node: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}){': ' + self.where if self.where else ''}"


_SKIP = "pass check=None to legofx.export (--check none on the command line) to skip this check"


@dataclass
class OpReport:
    """The ops of an exported graph (op -> node count) and the nodes Torch-TensorRT would not
    convert: ``unsupported`` inside legofx's own regions (split, Lego conv, merge, absorbed
    BatchNorm / ReLU: a refusal), ``outside`` them, in the user's own model (Torch-TensorRT
    partitions the graph and runs those in PyTorch: a warning)."""

    ops: Counter
    unsupported: list[OpIssue] = field(default_factory=list)
    source: str = ""
    outside: list[OpIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def warning(self) -> str:
        """What to tell about the nodes outside legofx's regions ("" if none)."""
        if not self.outside:
            return ""
        lines = [f"  {issue}" for issue in self.outside]
        return (f"{len(self.outside)} nodes of the model outside legofx's layers have no "
                "Torch-TensorRT converter; Torch-TensorRT will run them in PyTorch:\n"
                + "\n".join(lines))

    def __str__(self) -> str:
        head = f"Torch-TensorRT op check ({self.source}): {len(self.ops)} op types, "
        if self.ok and not self.outside:
            return head + "all convertible"
        if self.ok:
            return head + "legofx's layers all convertible; " + self.warning()
        lines = [f"  {issue}" for issue in self.unsupported]
        text = (head + f"{len(self.unsupported)} nodes of legofx's layers not convertible:\n"
                + "\n".join(lines) + f"\n({_SKIP})")
        return text + ("\n" + self.warning() if self.outside else "")


class UnsupportedOpsError(ValueError):
    """Some ops of legofx's own layers in the exported graph have no Torch-TensorRT converter."""

    def __init__(self, report: OpReport) -> None:
        super().__init__(str(report))
        self.report = report


def _registry():
    """Torch-TensorRT's converter registry and decomposition table, or ``None`` without it."""
    try:
        trt = load_torch_tensorrt()
    except TensorRTUnavailable:
        return None
    for name in ("_ConverterRegistry", "converter_registry"):  # 2.x, early 2.x
        try:
            registry = importlib.import_module(f"torch_tensorrt.dynamo.conversion.{name}")
            break
        except Exception:  # noqa: BLE001 - as for torch_tensorrt itself
            registry = None
    if registry is None or not hasattr(registry, "DYNAMO_CONVERTERS"):
        return None
    try:
        decompositions = importlib.import_module("torch_tensorrt.dynamo.lowering").get_decompositions()
    except Exception:  # noqa: BLE001
        decompositions = None
    return registry.DYNAMO_CONVERTERS, decompositions, getattr(trt, "__version__", "?")


def _in_registry(registry, node: fx.Node) -> bool:
    try:  # validated lookup: the converters' own argument checks run
        return node in registry
    except Exception:  # noqa: BLE001 - a validator that fails on this node rejects it
        return False


@functools.cache
def _composite_decompositions() -> dict | None:
    """What Torch-TensorRT's table decomposes besides the ops of group 2: every
    CompositeImplicitAutograd ATen op (``conv2d``, ``pad``, ``linear``...). Its other
    decompositions are not applied here (group 2 accepts their inputs instead), so
    ``reflection_pad2d`` stays whole, as it does for TensorRT. ``None``: the default table."""
    try:
        from torch._export.utils import (_collect_all_valid_cia_ops_for_aten_namespace,
                                         _get_decomp_for_cia)
    except ImportError:  # private torch API: fall back to core ATen
        return None
    return {op: _get_decomp_for_cia(op) for op in _collect_all_valid_cia_ops_for_aten_namespace()}


def _name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(
        target, "__name__", str(target))


def _lowered(node: fx.Node, convertible) -> bool | None:
    """Nodes Torch-TensorRT's lowering passes take care of (``None``: ask the op list)."""
    if node.target is operator.getitem:
        parent = node.args[0]
        return not isinstance(parent, fx.Node) or parent.op != "call_function" or convertible(parent)
    if _name(node.target) in _ASSERTIONS:
        return True
    if _name(node.target) in _WITH_INDICES:
        users = list(node.users)
        return all(u.target is operator.getitem and u.args[1] == 0 for u in users)
    if not isinstance(node.target, torch._ops.OpOverload) and not isinstance(
            node.meta.get("val"), torch.Tensor):  # shape arithmetic on SymInts (dynamic batch)
        return True
    return None


def _origin(node: fx.Node, sources: dict[str, fx.Node]) -> str:
    """Where an exported node comes from: module, legofx layer, source node or line."""
    parts = []
    stack = node.meta.get("nn_module_stack") or {}
    path, kind = list(stack.values())[-1] if stack else ("", "")
    if path:
        parts.append(f"module {path!r} ({str(kind).rpartition('.')[2]})")
    source = _source_node(node)
    if source and source in sources:
        original = sources[source]
        region = region_of(original)
        if region:
            parts.append(f"legofx layer {region['layer']!r} ({region['role']})")
        elif original.op == "call_module":
            parts.append(f"module {original.target!r}")
        parts.append(f"graph node {source!r}")
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    if trace:
        parts.append(" ".join(line.strip() for line in trace[-2:]))
    return "; ".join(parts)


def _source_node(node: fx.Node) -> str | None:
    """The name of the node of the original graph this one was traced from (provenance)."""
    chain = node.meta.get("from_node") or []
    source = chain[-1] if chain else None
    while source is not None and getattr(source, "from_node", None):
        source = source.from_node[-1]
    return getattr(source, "name", None)


def check_program(program: torch.export.ExportedProgram, model: torch.nn.Module | None = None
                  ) -> OpReport:
    """Which nodes of ``program`` (any IR; decomposed here) Torch-TensorRT would not convert.

    ``model`` (the exported module) only helps to name where offending nodes come from.
    """
    found = _registry()
    if found is None:
        core = program.run_decompositions(_composite_decompositions())
        convertible = lambda node: _name(node.target) in TENSORRT_OPS  # noqa: E731
        source = "static list from Torch-TensorRT's converter source; torch_tensorrt not importable"
    else:
        registry, decompositions, version = found
        core = program.run_decompositions(decompositions or _composite_decompositions())
        convertible = functools.partial(_in_registry, registry)
        source = f"torch_tensorrt {version} converter registry"

    def ok(node: fx.Node) -> bool:
        lowered = _lowered(node, ok)
        return convertible(node) if lowered is None else lowered

    sources = {}
    for graph_module in [] if model is None else reversed(list(model.modules())):
        if isinstance(graph_module, fx.GraphModule):
            sources.update({n.name: n for n in graph_module.graph.nodes})
    nodes = [n for n in core.graph.nodes if n.op == "call_function"]
    report = OpReport(Counter(_name(n.target) for n in nodes), source=source)
    for node in nodes:
        if node.target is not operator.getitem and not ok(node):
            issue = OpIssue(node.name, _name(node.target), _origin(node, sources))
            (report.unsupported if _in_legofx_layer(node, sources, model) else
             report.outside).append(issue)
    return report


def _in_legofx_layer(node: fx.Node, sources: dict[str, fx.Node], model) -> bool:
    """Was ``node`` traced from a legofx region (an inlined layer) or a legofx layer module?"""
    source = sources.get(_source_node(node) or "")
    if source is not None and region_of(source):
        return True
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        try:
            module = model.get_submodule(path) if model is not None and path else None
        except AttributeError:  # a path torch.export spelled its own way
            module = None
        if isinstance(module, RewrittenLayer):
            return True
    return False
