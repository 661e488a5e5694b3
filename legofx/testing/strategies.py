"""Hypothesis strategies: Conv2d configurations and small networks built from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@dataclass
class ConvCase:
    conv: nn.Conv2d
    x: torch.Tensor
    o: int
    m: int


def _out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def conv_cases(draw, dtype=torch.float64) -> ConvCase:
    """A Conv2d with every attribute drawn (``o | c``, ``1 <= m <= n``) and an input for it."""
    o = draw(st.integers(1, 4))
    c = o * draw(st.integers(1, 3))
    n = draw(st.integers(1, 8))
    m = draw(st.integers(1, n))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1, 1) if kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = {"int": draw(st.integers(0, 2)), "same": "same", "valid": "valid",
               "tuple": (draw(st.integers(0, 2)), draw(st.integers(0, 2)))}[kind]
    mode = draw(st.sampled_from(PADDING_MODES))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    height, width = 2 * draw(st.integers(2, 5)) + 1, 2 * draw(st.integers(2, 5)) + 1
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, n, kernel, stride, padding, dilation, bias=bias, padding_mode=mode,
                     dtype=dtype)
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    assume(_out_size(height, top + bottom, kernel[0], stride[0], dilation[0]) >= 1)
    assume(_out_size(width, left + right, kernel[1], stride[1], dilation[1]) >= 1)
    x = torch.randn(batch, c, height, width, dtype=dtype)
    return ConvCase(conv, x, o, m)


# ---- networks -----------------------------------------------------------------------------


def _conv(draw, c_in: int, c_out: int) -> nn.Conv2d:
    """A size-preserving conv (``padding='same'``) with drawn kernel, dilation, mode, bias."""
    kernel = draw(st.sampled_from([1, 3, (1, 3), (3, 2)]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    return nn.Conv2d(c_in, c_out, kernel, padding="same", dilation=dilation,
                     bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(PADDING_MODES)))


class Residual(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(conv.out_channels)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class Concat(nn.Module):
    def __init__(self, left: nn.Conv2d, right: nn.Conv2d) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Twice(nn.Module):
    """One conv module called twice: its parameters must be shared after the rewrite."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so legofx keeps it as a leaf."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x) if x.mean() > -100 else x


class DropPath(nn.Module):
    """Code that branches on ``self.training`` (stochastic depth)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.8) / 0.8
        return x + y


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.head is None else self.head(x)


@st.composite
def networks(draw, dtype=torch.float64, max_blocks: int = 6,
             data_dependent: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A small random CNN: convs, BN, ReLU, residual adds, concat, pooling, shared convs, and
    blocks fx cannot trace (data-dependent control flow, unless ``data_dependent=False``, and
    code that branches on training)."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels = draw(st.sampled_from([2, 4, 6]))
    c_in, size, blocks = channels, 12, []
    with_convs = ["conv", "residual", "concat", "twice", "droppath"] + ["gate"] * data_dependent
    for index in range(draw(st.integers(1, max_blocks))):
        kinds = with_convs if index == 0 else with_convs + ["bn", "relu", "pool"]
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            out = draw(st.sampled_from([2, 3, 4, 6, 8]))
            blocks.append(_conv(draw, channels, out))
            channels = out
        elif kind == "bn":
            blocks.append(nn.BatchNorm2d(channels))
        elif kind == "relu":
            blocks.append(nn.ReLU())
        elif kind == "residual":
            blocks.append(Residual(_conv(draw, channels, channels)))
        elif kind == "concat":
            left, right = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 3, 4]))
            blocks.append(Concat(_conv(draw, channels, left), _conv(draw, channels, right)))
            channels = left + right
        elif kind == "twice":
            blocks.append(Twice(_conv(draw, channels, channels)))
        elif kind == "gate":
            out = draw(st.sampled_from([2, 4, 6]))
            blocks.append(Gate(_conv(draw, channels, out)))
            channels = out
        elif kind == "droppath":
            blocks.append(DropPath(_conv(draw, channels, channels)))
        elif size >= 6:
            blocks.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
            size //= 2
        else:
            blocks.append(nn.MaxPool2d(3, stride=1, padding=1))
    head = draw(st.sampled_from([None, "linear"]))
    if head == "linear":
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))
    net = Net(blocks, head).to(dtype).eval()
    with torch.no_grad():  # BN statistics that are not the identity
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(draw(st.integers(1, 3)), c_in, 12, 12, dtype=dtype)
    return net, x
