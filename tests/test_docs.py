"""Every python block of README.md and docs/*.md runs (or says why not), and the documented
signatures are the code's. The mechanism is described in tests/docs_blocks.py."""

import inspect
import re

import pytest
import torch
from torch import nn

import legofx
from docs_blocks import PAGES, ROOT, page_blocks, python_blocks, run_page
from docs_signatures import differences, documented, parse

SIGNATURE_PAGES = [ROOT / "README.md", ROOT / "docs" / "api.md", ROOT / "docs" / "deployment.md"]


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """The stand-in for a torchvision model in the docs check: two convs, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def tiny_loader(batches: int = 2, size: int = 16, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g))
            for _ in range(batches)]


STAND_INS = {"tiny_cnn": tiny_cnn, "tiny_loader": tiny_loader}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_blocks_run(page, tmp_path, monkeypatch):
    blocks = page_blocks(page)
    for block in blocks:     # signature blocks are compared where the signature test looks
        assert not block.signatures or page in SIGNATURE_PAGES, f"{block.page}:{block.line}"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    run_page(blocks, {"__name__": "docs_page", **STAND_INS})


@pytest.mark.parametrize("page", SIGNATURE_PAGES, ids=lambda p: p.name)
def test_documented_signatures_are_the_code(page):
    found = documented(page.read_text(), page_blocks(page))
    assert found, f"no signature found in {page.name}"
    problems = [f"{where}: {p}" for where, text in found for p in differences(text)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "api.md"], ids=lambda p: p.name)
def test_every_public_function_is_documented(page):
    names = {parse(text)[0] for _, text in documented(page.read_text(), page_blocks(page))}
    functions = {n for n in legofx.__all__ if inspect.isfunction(getattr(legofx, n))}
    assert functions - names == set()


def test_export_result_fields_are_documented():
    from dataclasses import fields
    from legofx.deploy import ExportResult
    for page in ("api.md", "deployment.md"):
        text = (ROOT / "docs" / page).read_text()
        listed = text.split("`ExportResult`", 1)[1].split("\n\n")[0]
        assert [f.name for f in fields(ExportResult)] == [
            name for name in re.findall(r"`(\w+)`", listed) if name not in ("OpReport", "None")], page


# the checkers themselves: they catch what they are for

FAKE_PAGE = '''
<!-- docs-check: signatures -->
```python
legofx.transform(model, o=2, m=0.25, *, include=None, exclude=None, init="random",
                 coefficients=True, example_inputs=None, example_kwargs=None) -> nn.Module
legofx.save(path, model) -> Path
legofx.compile(model, example_inputs, backend="inductor", verify=True, **options) -> nn.Module
```

| function | what |
|---|---|
| `legofx.fold(gm, strategy=None, index_dtype=torch.int64)` | x |
'''


def test_a_wrong_signature_is_caught():
    found = documented(FAKE_PAGE, python_blocks(FAKE_PAGE))
    assert len(found) == 4
    problems = {text.split("(")[0]: differences(text) for _, text in found}
    assert problems["legofx.transform"] == ["transform: m default documented 0.25, is 0.5"]
    assert "parameters ['path', 'model'] documented" in problems["legofx.save"][0]
    assert any("parameters" in p for p in problems["legofx.fold"])   # keyword-only ones missing
    assert problems["legofx.compile"] == [
        "compile: verify documented positional or keyword, is keyword-only"]


def test_a_broken_block_fails_and_a_stale_stand_in_is_caught(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = "```python\nimport legofx\nlegofx.transform(tiny_cnn(), o=0)\n```\n"
    with pytest.raises(ValueError, match="o must be an int"):
        run_page(python_blocks(broken), dict(STAND_INS))
    stale = '<!-- docs-check: replace "resnet18()" with "tiny_cnn()" -->\n```python\nx = 1\n```\n'
    with pytest.raises(AssertionError, match="stand-in"):
        run_page(python_blocks(stale), {})


def test_directives_apply_to_the_next_block_only():
    text = ('<!-- docs-check: given\nx = 2\n-->\n```python\ny = x * 3\n```\n'
            'prose\n```python\n# not run by the docs check: needs a GPU\nz = y\n```\n')
    first, second = python_blocks(text)
    assert first.given == "x = 2\n" and second.given == "" and second.skip_reason == "needs a GPU"
    namespace = {}
    assert run_page([first, second], namespace) == 1 and namespace["y"] == 6


def test_install_without_make_is_what_the_makefile_runs():
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"^TORCH_PINS := (.+)$", makefile, re.M).group(1).strip()
    workers = re.search(r"^TEST_WORKERS \?= (\d+)", makefile, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    for command in (f"pip install {pins}", f"pip install -e '.[dev]' {pins}",
                    "lint-imports", f"pytest -n {workers}", "legofx demo"):
        assert command in readme.split("**Without make**")[1].split("```")[1], command
