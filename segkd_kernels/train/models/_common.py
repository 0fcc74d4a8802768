"""Small building blocks shared by the backbones and heads."""

from __future__ import annotations

from torch import nn

# Tiny widths scale every channel count down; this floor keeps BatchNorm statistics and grouped
# convolutions meaningful at widths like 0.125.
MIN_CHANNELS = 8


def scaled(channels: int, width: float, minimum: int = MIN_CHANNELS) -> int:
    """`channels * width` rounded, never below `minimum` (width=1.0 gives `channels` exactly)."""
    if width == 1.0:
        return channels
    return max(minimum, int(round(channels * width)))


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
