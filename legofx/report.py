"""``legofx.report``: a table of what a rewrite did, with the paper's formulas and MAC counts."""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from legofx import passes
from legofx.core.arguments import as_input_tuple
from legofx.core.layer import RewrittenLayer
from legofx.core.records import LayerRecord, stored_meta, summary
from legofx.fx.rewrite import graph_modules


@dataclass
class LayerMacs:
    before: int = 0
    after: int = 0
    counted: int = 0  # what FlopCounterMode sees inside the layer, to take out of the total


def dense_macs(module: nn.Module, output_shape: torch.Size) -> int:
    """MACs of one call of a plain ``Conv2d`` (grouped too) or ``Linear``."""
    if isinstance(module, nn.Linear):
        return output_shape.numel() * module.in_features
    pixels = output_shape[0] * output_shape[2] * output_shape[3]
    kernel = module.kernel_size[0] * module.kernel_size[1]
    return pixels * module.out_channels * (module.in_channels // module.groups) * kernel


def _counted_macs(module: nn.Module, shape: torch.Size, like: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(shape, dtype=like.dtype, device=like.device))
    return counter.get_total_flops() // 2


def measure_macs(gm: fx.GraphModule, example_inputs) -> tuple[dict[str, LayerMacs], int, int]:
    """Per-layer MACs before/after and the whole network's MACs before/after.

    Runs a copy of ``gm`` in eval mode with its rewritten regions collapsed into module calls,
    so forward hooks see every conv call (a module called twice counts twice). Layer MACs are
    each layer's theory (:meth:`RewrittenLayer.macs`); the network's total is ``FlopCounterMode``'s
    count (convs, matmuls) with each rewritten layer's own count replaced by its theory.
    """
    inputs = as_input_tuple(example_inputs)
    records = {r.name: r for r in summary(gm)}
    work = copy.deepcopy(gm).eval()
    for graph_module in graph_modules(work):
        passes.collapse_regions(graph_module)
    macs = {name: LayerMacs() for name in records}
    calls: list[tuple[str, torch.Size, torch.Tensor]] = []

    def hook(name):
        def record_call(module, args, output):
            if isinstance(module, RewrittenLayer):
                before, after = module.macs(output.shape)
                calls.append((name, args[0].shape, args[0]))
            else:
                before = after = dense_macs(module, output.shape)
            macs[name].before += before
            macs[name].after += after
        return record_call

    modules = dict(work.named_modules())
    handles = [modules[name].register_forward_hook(hook(name)) for name in records if name in modules]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            work(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, shape, like in calls:
        macs[name].counted += _counted_macs(work.get_submodule(name), shape, like)
    rest = counter.get_total_flops() // 2 - sum(m.counted for m in macs.values())
    rewritten = [m for name, m in macs.items() if records[name].rewritten]
    return (macs, rest + sum(m.before for m in rewritten), rest + sum(m.after for m in rewritten))


def network_params(gm: nn.Module, records: list[LayerRecord]) -> tuple[int, int]:
    """Parameters of the whole network before the rewrite and in its inference form."""
    rewritten = [r for r in records if r.rewritten]
    prefixes = tuple(r.name + "." for r in rewritten)
    rest = sum(p.numel() for name, p in gm.named_parameters() if not name.startswith(prefixes))
    return (rest + sum(r.params_before for r in rewritten),
            rest + sum(r.params_after for r in rewritten))


def reason_kind(reason: str) -> str:
    """A reason with its numbers and quoted names blanked, to group similar reasons."""
    return re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "#", reason)


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _theory(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _compact(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def coverage_lines(records: list[LayerRecord], untraced: dict[str, str],
                   unchecked: str = "") -> list[str]:
    """Found / rewritten (and how each is reached) / skipped, skipped grouped by reason, and
    the modules that run eagerly because they could not be traced, each with its reason."""
    rewritten = [r for r in records if r.rewritten]
    where = Counter(r.where for r in rewritten)
    via = ", ".join(f"{kind} {where[kind]}" for kind in ("graph", "leaf", "module") if where[kind])
    lines = [f"layers: {len(records)} found, rewritten {len(rewritten)}"
             + (f" ({via})" if via else "") + f", skipped {len(records) - len(rewritten)}"]
    kinds = Counter(reason_kind(r.reason) for r in records if not r.rewritten)
    for kind, count in kinds.most_common():
        example = next(r for r in records if not r.rewritten and reason_kind(r.reason) == kind)
        lines.append(f"  skipped {count} x: {example.reason}" + (" (and similar)" if count > 1 else ""))
    if untraced:
        lines.append(f"modules that could not be traced and run eagerly: {len(untraced)} "
                     "(convs inside them are rewritten in traced sub-graphs or at module level)")
        for name, reason in list(untraced.items())[:10]:
            lines.append(f"  {name}: {reason}")
        if len(untraced) > 10:
            lines.append(f"  ... and {len(untraced) - 10} more")
    if unchecked:
        lines.append(f"note: {unchecked}")
    return lines


def report(gm: fx.GraphModule, example_inputs=None) -> str:
    """A ``tabulate`` table, one row per conv, then totals for the whole network.

    Always: status, shapes, settings (``o``/``m``), parameters before/after and the method
    paper's compression and speed-up formulas per layer (LegoNet: eq. 1 and eq. 2). Given ``example_inputs`` (a tensor or a tuple of
    tensors; the model runs once, in eval mode, on a copy), also the MACs of every layer
    before/after for those inputs (a layer called twice counts twice) and of the network.
    Layers started from trained weights show their relative reconstruction error.
    """
    records = summary(gm)
    macs = totals = None
    if example_inputs is not None:
        macs, *totals = measure_macs(gm, example_inputs)
    with_init = any("init_error" in r.extra for r in records)
    rows = []
    for r in records:
        row = [r.name, r.status, r.where or "-", r.form, f"{r.in_channels}->{r.out_channels}",
               "x".join(map(str, r.kernel_size)) or "-", r.settings or "-",
               _compact(r.params_before), _compact(r.params_after),
               _theory(r.theory_compression), _theory(r.theory_speedup)]
        if macs is not None:
            layer = macs[r.name]
            row += [_compact(layer.before), _compact(layer.after), _ratio(layer.before, layer.after)]
        if with_init:
            error = r.extra.get("init_error")
            row.append("-" if error is None else f"{error:.3f}")
        rows.append(row + [r.reason])
    headers = ["layer", "status", "via", "form", "in->out", "kernel", "settings", "params",
               "params after", "compr. (paper)", "speed-up (paper)"]
    if macs is not None:
        headers += ["MACs", "MACs after", "MAC ratio"]
    if with_init:
        headers.append("init error")
    lines = [tabulate(rows, headers + ["reason"], tablefmt="github"), ""]
    meta = stored_meta(gm)
    lines += coverage_lines(records, meta["untraced"], meta.get("unchecked", ""))
    conv_before = sum(r.params_before for r in records)
    conv_after = sum(r.params_after for r in records)
    lines.append(f"layer parameters: {conv_before:,} -> {conv_after:,} "
                 f"({_ratio(conv_before, conv_after)} smaller)")
    net_before, net_after = network_params(gm, records)
    lines.append(f"network parameters (inference form): {net_before:,} -> {net_after:,} "
                 f"({_ratio(net_before, net_after)} smaller); selection indices: "
                 f"{sum(r.index_entries for r in records):,} integers")
    if macs is not None:
        conv_macs_before = sum(m.before for m in macs.values())
        conv_macs_after = sum(m.after for m in macs.values())
        lines.append(f"layer MACs: {conv_macs_before:,} -> {conv_macs_after:,} "
                     f"({_ratio(conv_macs_before, conv_macs_after)} fewer)")
        lines.append(f"network MACs: {totals[0]:,} -> {totals[1]:,} "
                     f"({_ratio(totals[0], totals[1])} fewer)")
    return "\n".join(lines)
