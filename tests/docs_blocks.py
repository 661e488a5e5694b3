"""The python blocks of README.md and docs/*.md, and how tests/test_docs.py runs them.

A block runs as written, in order with the page's earlier blocks (one namespace per page),
unless the markdown says otherwise right before it, in one or more hidden comments:

    <!-- docs-check: given
    model = tiny_cnn()            # code run first: names the text leaves to the reader
    -->
    <!-- docs-check: replace "resnet18()" with "tiny_cnn()" -->   (a stand-in: must match)
    <!-- docs-check: then
    test_fold_keeps_the_function()   # code run after the block
    -->
    <!-- docs-check: signatures -->   (api signatures: tests/docs_signatures.py compares them)

or it starts with a visible comment ``# not run by the docs check: REASON`` (then it is only
compiled). Every ``given`` / ``then`` runs with the helpers below in the namespace.
"""

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^# not run by the docs check: (\S.*)$")
_DIRECTIVE = re.compile(r"<!--\s*docs-check:\s*(\w+)(.*?)-->", re.S)
_REPLACE = re.compile(r'\s*("(?:[^"\\]|\\.)*")\s+with\s+("(?:[^"\\]|\\.)*")\s*$', re.S)
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    page: str
    line: int                      # 1-based line of the opening fence
    source: str
    given: str = ""
    then: str = ""
    replacements: list = field(default_factory=list)  # (old, new)
    signatures: bool = False

    @property
    def skip_reason(self) -> str | None:
        first = self.source.lstrip().splitlines()[0] if self.source.strip() else ""
        match = NOT_RUN.match(first)
        return match.group(1) if match else None

    def code(self) -> str:
        """The source with the stand-ins applied; each must still match the block."""
        src = self.source
        for old, new in self.replacements:
            if old not in src:
                raise AssertionError(f"{self.page}:{self.line}: stand-in {old!r} is not in the block")
            src = src.replace(old, new)
        return src


def _directives(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _DIRECTIVE.finditer(text)]


def python_blocks(text: str, page: str = "<text>") -> list[Block]:
    """Every ```python block of a markdown text, with the directives just above it."""
    lines = text.splitlines()
    blocks, pending, i = [], [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence.group(1) == "python":
                block = Block(page, i + 1, "\n".join(lines[i + 1:end]) + "\n")
                for kind, body in _directives("\n".join(pending)):
                    _apply(block, kind, body)
                blocks.append(block)
            pending, i = [], end + 1
            continue
        if lines[i].strip() and not lines[i].lstrip().startswith("<!--") and not pending_open(pending):
            pending = []          # prose between a directive and a block cancels it
        else:
            pending.append(lines[i])
        i += 1
    return blocks


def pending_open(pending: list[str]) -> bool:
    joined = "\n".join(pending)
    return joined.count("<!--") > joined.count("-->")


def _apply(block: Block, kind: str, body: str) -> None:
    if kind == "given":
        block.given += body.strip("\n") + "\n"
    elif kind == "then":
        block.then += body.strip("\n") + "\n"
    elif kind == "replace":
        match = _REPLACE.match(body)
        if not match:
            raise ValueError(f"{block.page}:{block.line}: bad replace directive {body!r}")
        block.replacements.append((ast.literal_eval(match.group(1)), ast.literal_eval(match.group(2))))
    elif kind == "signatures":
        block.signatures = True
    else:
        raise ValueError(f"{block.page}:{block.line}: unknown docs-check directive {kind!r}")


def page_blocks(path: Path) -> list[Block]:
    return python_blocks(path.read_text(), str(path.relative_to(ROOT)))


def run_page(blocks: list[Block], namespace: dict) -> int:
    """Run a page's blocks in order in one namespace; returns how many ran (the rest compile)."""
    ran = 0
    for block in blocks:
        where = f"{block.page}:{block.line}"
        if block.signatures:
            continue
        if block.skip_reason is not None:
            compile(block.source, where, "exec")
            continue
        for part, code in (("given", block.given), ("block", block.code()), ("then", block.then)):
            if code.strip():
                exec(compile(code, f"{where} ({part})", "exec"), namespace)
        ran += 1
    return ran
