"""summary and report: per-conv records, the paper's formulas, parameter and MAC totals."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import legofx
from legofx.methods.lego.api import paper_compression, paper_speedup
from legofx.report import measure_macs, network_params, reason_kind


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.group = nn.Conv2d(16, 16, 3, groups=4)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.body(self.body(self.stem(x)))  # body is called twice
        x = self.group(self.down(x))
        return self.head(x.mean((2, 3)))


def flops(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_summary_fields():
    gm = legofx.transform(Small(), o=2, m=0.5)
    records = {r.name: r for r in legofx.summary(gm)}
    assert list(records) == ["stem", "body", "down", "group"]
    body = records["body"]
    assert (body.status, body.o, body.m, body.calls, body.form) == ("rewritten", 2, 4, 2, "training")
    assert body.kernel_size == (3, 3) and (body.in_channels, body.out_channels) == (8, 8)
    assert body.params_before == 8 * 8 * 9
    assert body.params_after == 4 * 4 * 9 + 8 * 2  # Lego filters + coefficients, no bias
    assert body.index_entries == 8 * 2
    assert records["down"].params_before == 16 * 8 + 16
    assert records["down"].params_after == 8 * 4 + 16 * 2 + 16
    assert records["stem"].status == records["group"].status == "skipped"
    assert records["stem"].params_after == records["stem"].params_before == 3 * 8 * 9 + 8


def test_summary_is_a_copy():
    gm = legofx.transform(Small())
    legofx.summary(gm)[0].reason = "changed"
    assert legofx.summary(gm)[0].reason != "changed"


def test_paper_formulas():
    gm = legofx.transform(nn.Sequential(nn.Conv2d(64, 64, 3)), o=2, m=32)
    record, layer = legofx.summary(gm)[0], gm.get_submodule("0")
    assert paper_compression(layer) == pytest.approx(64 * 64 * 9 / (32 * 32 * 9 + 64 * 2 * 32))
    assert paper_speedup(layer) == pytest.approx(64 * 64 * 9 / (32 * 64 * 9 + 64 * 2))
    assert (record.theory_compression, record.theory_speedup) == (
        paper_compression(layer), paper_speedup(layer))
    assert record.settings == "o=2 m=32"


def test_network_parameter_totals_are_exact():
    model = Small()
    gm = legofx.transform(model, o=2, m=0.5)
    before, after = network_params(gm, legofx.summary(gm))
    assert before == sum(p.numel() for p in model.parameters())
    assert after == sum(p.numel() for p in legofx.fold(gm).parameters())


def test_mac_totals_match_flop_counter():
    model, x = Small().eval(), torch.randn(2, 3, 16, 16)
    gm = legofx.transform(model, o=2, m=0.5)
    layers, before, after = measure_macs(gm, x)
    assert before == flops(model, x) // 2
    # after: FlopCounterMode sees the folded Lego convs; the merge (one multiply-add per
    # gathered map, n*o per output pixel) is index_select/mul/sum, which it does not count
    folded = legofx.fold(gm)
    merge = 2 * (16 * 16 * 8 * 2) * 2 + (8 * 8 * 16 * 2) * 2  # body twice, then down; batch 2
    assert after == flops(folded, x) // 2 + merge
    assert layers["body"].before == 2 * (2 * 16 * 16 * 8 * 8 * 9)
    assert layers["stem"].before == layers["stem"].after == 2 * 16 * 16 * 8 * 3 * 9
    assert layers["group"].before == 2 * 6 * 6 * 16 * 4 * 9


def test_report_table_and_totals():
    gm = legofx.fold(legofx.transform(Small(), o=2, m=0.5))
    text = legofx.report(gm, torch.randn(1, 3, 16, 16))
    for name in ("stem", "body", "down", "group"):
        assert name in text
    assert "layers: 4 found, rewritten 2 (graph 2), skipped 2" in text
    assert "in_channels=3 is not divisible by o=2" in text
    assert "groups=4: grouped convolutions are kept" in text
    assert "network MACs:" in text and "fewer" in text
    assert "MAC ratio" in legofx.report(gm, torch.randn(1, 3, 16, 16), wide=True)
    assert "MACs" not in legofx.report(gm)  # no inputs, no MAC columns


def test_reason_kind_groups_similar_reasons():
    assert reason_kind("in_channels=3 is not divisible by o=2") == \
        reason_kind("in_channels=9 is not divisible by o=4")
    assert reason_kind("excluded by exclude pattern 'a.b'") == reason_kind("excluded by exclude pattern 'c'")
    assert reason_kind("groups=3: grouped convolutions are kept") != \
        reason_kind("in_channels=3 is not divisible by o=2")
