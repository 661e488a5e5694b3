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
                   unchecked: str = "", numbered: bool = False) -> list[str]:
    """Found / rewritten (and how each is reached) / skipped, skipped grouped by reason (each
    group ``[1]``, ``[2]``... with ``numbered``, in the order met, as the narrow table refers
    to them), and the modules that run eagerly because they could not be traced, with reasons."""
    rewritten = [r for r in records if r.rewritten]
    where = Counter(r.where for r in rewritten)
    via = ", ".join(f"{kind} {where[kind]}" for kind in ("graph", "leaf", "module") if where[kind])
    lines = [f"layers: {len(records)} found, rewritten {len(rewritten)}"
             + (f" ({via})" if via else "") + f", skipped {len(records) - len(rewritten)}"]
    kinds = Counter(reason_kind(r.reason) for r in records if not r.rewritten)
    for number, kind in enumerate(kinds, 1):
        count = kinds[kind]
        example = next(r for r in records if not r.rewritten and reason_kind(r.reason) == kind)
        lines.append(f"  {f'[{number}] ' if numbered else ''}skipped {count} x: {example.reason}"
                     + (" (and similar)" if count > 1 else ""))
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


WIDTH = 120  # columns the default table fits in
ELLIPSIS = "\u2026"


def shorten(name: str, width: int) -> str:
    """``name`` cut in the middle to ``width`` characters (``layer4.\u2026.conv2``), ends kept."""
    if len(name) <= width:
        return name
    head = width // 2
    return name[:head] + ELLIPSIS + name[len(name) - (width - 1 - head):]


def _before_after(before: int, after: int, rewritten: bool) -> str:
    return f"{_compact(before)}->{_compact(after)}" if rewritten else _compact(before)


def _narrow_table(records: list[LayerRecord], macs, with_init: bool, kinds: list[str]) -> str:
    """Layer, status (a skipped conv's reason is numbered below), shape, parameters and MACs
    with their ratios; the layer names cut in the middle to fit :data:`WIDTH` columns."""
    rows = []
    for r in records:
        done = r.rewritten
        status = "rewritten" if done else f"skipped [{kinds.index(reason_kind(r.reason)) + 1}]"
        row = [r.name, status, f"{r.in_channels}->{r.out_channels} "
               + ("x".join(map(str, r.kernel_size)) or "-"),
               _before_after(r.params_before, r.params_after, done),
               _ratio(r.params_before, r.params_after) if done else "-"]
        if macs is not None:
            layer = macs[r.name]
            row += [_before_after(layer.before, layer.after, done),
                    _ratio(layer.before, layer.after) if done else "-"]
        if with_init:
            error = r.extra.get("init_error")
            row.append("-" if error is None else f"{error:.3f}")
        rows.append(row)
    headers = ["layer", "status", "in->out kernel", "params", "smaller"]
    headers += ["MACs", "fewer"] if macs is not None else []
    headers += ["init error"] if with_init else []
    table = tabulate(rows, headers, tablefmt="github", disable_numparse=True)
    excess = len(table.splitlines()[0]) - WIDTH
    if excess > 0:
        longest = max(len(r.name) for r in records)
        width = max(longest - excess, 12)
        table = tabulate([[shorten(row[0], width), *row[1:]] for row in rows], headers,
                         tablefmt="github", disable_numparse=True)
    return table


def _wide_table(records: list[LayerRecord], macs, with_init: bool) -> str:
    """Every column: also how each conv is reached, its form, settings and the method paper's
    formulas, and the reasons in full."""
    rows = []
    for r in records:
        row = [r.name, r.status, r.where or "-", r.form, f"{r.in_channels}->{r.out_channels}",
               "x".join(map(str, r.kernel_size)) or "-", r.settings or "-",
               _compact(r.params_before), _compact(r.params_after),
               _ratio(r.params_before, r.params_after),
               _theory(r.theory_compression), _theory(r.theory_speedup)]
        if macs is not None:
            layer = macs[r.name]
            row += [_compact(layer.before), _compact(layer.after), _ratio(layer.before, layer.after)]
        if with_init:
            error = r.extra.get("init_error")
            row.append("-" if error is None else f"{error:.3f}")
        rows.append(row + [r.reason])
    headers = ["layer", "status", "via", "form", "in->out", "kernel", "settings", "params",
               "params after", "params ratio", "paper eq.1", "paper eq.2"]
    if macs is not None:
        headers += ["MACs", "MACs after", "MAC ratio"]
    if with_init:
        headers.append("init error")
    return tabulate(rows, headers + ["reason"], tablefmt="github", disable_numparse=True)


PAPER_NOTE = ("paper eq.1 is LegoNet's compression, which counts the selection M as n*o*m "
              "entries (legofx stores n*o indices), so it is below the measured params ratio, "
              "most for 1x1 convs; paper eq.2 is its speed-up in MACs")


def report(gm: fx.GraphModule, example_inputs=None, *, wide: bool = False) -> str:
    """A ``tabulate`` table, one row per conv, then totals for the whole network.

    By default the table fits 120 columns: each conv's name (cut in the middle if need be),
    status (a skipped conv's reason is numbered in the lines below the table), in/out channels
    and kernel, parameters before -> after (the inference form's, measured) and the ratio.
    Given ``example_inputs`` (a tensor or a tuple of tensors; the model runs once, in eval
    mode, on a copy), also the MACs of every layer before -> after for those inputs (a layer
    called twice counts twice) and of the network. Layers started from trained weights show
    their relative reconstruction error. ``wide=True`` shows every column: also how each conv
    is reached, its form, settings, the method paper's compression and speed-up formulas
    (LegoNet: eq. 1 and eq. 2) and the reasons in full.
    """
    records = summary(gm)
    macs = totals = None
    if example_inputs is not None:
        macs, *totals = measure_macs(gm, example_inputs)
    with_init = any("init_error" in r.extra for r in records)
    kinds = list(Counter(reason_kind(r.reason) for r in records if not r.rewritten))
    if wide:
        table = _wide_table(records, macs, with_init)
    else:
        table = _narrow_table(records, macs, with_init, kinds)
    lines = [table, ""]
    meta = stored_meta(gm)
    lines += coverage_lines(records, meta["untraced"], meta.get("unchecked", ""), numbered=not wide)
    if wide and any(r.method == "lego" and r.rewritten for r in records):
        lines.append(f"note: {PAPER_NOTE}")
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
