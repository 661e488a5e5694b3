"""Documented signatures (docs/api.md, docs/deployment.md, the README's "API at a glance")
against ``inspect.signature`` of the code.

A documented signature is ``[legofx.]name(params) [-> ret]``: a line (or lines) of a block
marked ``<!-- docs-check: signatures -->``, or a code span in a table's first column. Names
resolve in ``legofx``, then ``legofx.lowering.registry`` (the extension points).
"""

import ast
import importlib
import inspect
import re

import torch

MODULES = ("legofx", "legofx.lowering.registry")
_SPAN = re.compile(r"`((?:legofx\.)?(\w+)\((.*?)\)(?:\s*->\s*[^`]*)?)`")
_STATEMENT = re.compile(r"^(?:legofx\.)?(\w+)\((.*)\)\s*(?:->.*)?$", re.S)


def parse(text: str) -> tuple[str, inspect.Signature]:
    """``legofx.fold(gm, strategy=None, *, ...) -> nn.Module`` -> ("fold", Signature)."""
    match = _STATEMENT.match(" ".join(text.split()))
    if not match:
        raise ValueError(f"not a signature: {text!r}")
    name, params = match.groups()
    args = ast.parse(f"def {name}({params}): pass").body[0].args
    kinds = inspect.Parameter
    out = []
    positional = args.posonlyargs + args.args
    pos_defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
    for arg, default in zip(positional, pos_defaults):
        kind = kinds.POSITIONAL_ONLY if arg in args.posonlyargs else kinds.POSITIONAL_OR_KEYWORD
        out.append(kinds(arg.arg, kind, default=_value(default)))
    if args.vararg:
        out.append(kinds(args.vararg.arg, kinds.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append(kinds(arg.arg, kinds.KEYWORD_ONLY, default=_value(default)))
    if args.kwarg:
        out.append(kinds(args.kwarg.arg, kinds.VAR_KEYWORD))
    return name, inspect.Signature(out)


def _value(node):
    if node is None:
        return inspect.Parameter.empty
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"torch": torch})


def documented(text: str, blocks) -> list[tuple[str, str]]:
    """(where, signature text) of every documented signature of a page."""
    found = []
    for block in blocks:
        if block.signatures:
            for statement in re.split(r"\n(?=legofx\.|\w+\()", block.source.strip()):
                found.append((f"{block.page}:{block.line}", statement))
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            for span in _SPAN.finditer(first_cell):
                if _resolve(span.group(2)) is not None:
                    found.append((f"line {number}", span.group(1)))
    return found


def _resolve(name: str):
    for module in MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if callable(obj) and not isinstance(obj, type):
            return obj
    return None


def differences(signature_text: str) -> list[str]:
    """What a documented signature gets wrong about the code (empty: nothing)."""
    name, doc = parse(signature_text)
    obj = _resolve(name)
    if obj is None:
        return [f"{name}: no such public function"]
    real = list(inspect.signature(obj).parameters.values())
    doc = list(doc.parameters.values())
    problems = []
    if [p.name for p in doc] != [p.name for p in real]:
        problems.append(f"{name}: parameters {[p.name for p in doc]} documented, "
                        f"{[p.name for p in real]} in the code")
    for d, r in zip(doc, real):
        if d.name == r.name and d.kind != r.kind:
            problems.append(f"{name}: {d.name} documented {d.kind.description}, is {r.kind.description}")
        if d.name == r.name and d.default != r.default:
            problems.append(f"{name}: {d.name} default documented {d.default!r}, is {r.default!r}")
    return problems
