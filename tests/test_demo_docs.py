"""docs/demo_output.md, the demo's example output, is what ``legofx demo`` prints.

The page is written by ``legofx demo --write-docs docs/demo_output.md``: the printed block, then
the JSON it was rendered from. Accuracy and latency cannot be re-measured in a test (a full run
takes ~2 minutes), so the test checks what can be checked exactly: the block is what the current
code prints for that JSON; the JSON comes from a run with the current defaults; and its sizes and
MACs, which do not depend on training or timing, are what the current code counts.
"""

import json
import re
from pathlib import Path

import pytest
import torchvision

from legofx.cli.main import parser
from legofx.cli.demo import docs_page, render
from legofx.demo.digits import Budget, cnn, digits as digits_data, inference_conv_params, network_macs
from legofx.demo.plot import save_figure
from legofx.demo.realistic import Setup, float_params
from legofx.lowering.fold import fold
from legofx.methods.lego.api import transform
from legofx.report import measure_macs

PAGE = Path(__file__).parent.parent / "docs" / "demo_output.md"


def blocks(page: str) -> tuple[str, dict]:
    text = re.search(r"```text\n(.*?)\n```", page, re.S).group(1)
    return text, json.loads(re.search(r"```json\n(.*?)\n```", page, re.S).group(1))


@pytest.fixture(scope="module")
def page():
    return PAGE.read_text()


def test_the_page_is_what_the_demo_prints_for_its_json(page):
    text, results = blocks(page)
    assert text == render(results)
    assert page == docs_page(results, "docs/demo_output.md")  # nothing edited by hand


def test_the_page_comes_from_a_run_with_the_current_defaults(page):
    _, results = blocks(page)
    defaults = parser().parse_args(["demo"])
    assert results["digits"]["budget"]["epochs"] == defaults.epochs == Budget(epochs=defaults.epochs).epochs
    assert results["realistic"]["model"] == defaults.model.partition(":")[2]
    setup = Setup(size=defaults.size, batches=tuple(defaults.batches), rounds=defaults.rounds,
                  backends=tuple(defaults.backends))
    assert results["realistic"]["setup"] == json.loads(json.dumps(setup.__dict__))


def test_the_pages_sizes_and_macs_are_what_the_code_counts(page):
    """Exact: parameter and MAC counts do not depend on training, timing or the machine."""
    _, results = blocks(page)
    sample = digits_data()[2][:1]
    dense, lego = cnn(), transform(cnn(), o=2, m=0.5)
    counts = {"dense": (inference_conv_params(dense), network_macs(dense, sample)),
              "lego": (inference_conv_params(fold(lego.eval())), network_macs(lego, sample))}
    for key, model in (("dense", "dense"), ("scratch", "lego"), ("tuned", "lego")):
        row = results["digits"][key]
        assert (row["conv_params"], row["macs"]) == counts[model]

    size = results["realistic"]["size"]
    original = torchvision.models.resnet18()
    gm = transform(original, o=2, m=0.5).eval()
    x = sample.new_zeros(1, 3, 224, 224)
    assert (size["original"]["params"], size["original"]["macs"]) == (float_params(original),
                                                                      measure_macs(gm, x)[1])
    for lowering in ("accumulate", "fused"):  # each Lego row: the fold it names
        folded = fold(gm, lowering, fuse_batchnorm=True)
        assert size[lowering]["fold"] == f"fold '{lowering}', BN fused"
        assert (size[lowering]["params"], size[lowering]["macs"]) == (float_params(folded),
                                                                      measure_macs(folded, x)[2])


def test_the_picture_is_drawn_from_the_pages_json(page, tmp_path):
    pytest.importorskip("matplotlib")
    _, results = blocks(page)
    path = save_figure(results["digits"], results["realistic"], tmp_path / "demo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
