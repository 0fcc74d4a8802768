"""Dilated MobileNetV2 backbone with torchvision's state-dict layout (`features.N...`).

Blocks are numbered as in `torchvision.models.mobilenet_v2` (features.0 the stem, features.1-17 the
inverted residuals); the final 1x1 conv to 1280 channels (features.18) and the classifier are not
built, since segmentation heads read the 320-channel output, and are skipped when loading a
torchvision checkpoint. The four stages are exposed as layer1..layer4 (strides 4, 8, 16, 32 before
dilation: 24, 32, 96, 320 channels at width 1).
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion t, channels c, repeats n, stride s), torchvision's inverted_residual_setting
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
# last features index (inclusive) of each stage
_STAGE_END = {"layer1": 3, "layer2": 6, "layer3": 13, "layer4": 17}


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: nearest multiple of `divisor`, never more than 10% below."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 dilation: int = 1):
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, *, output_stride: int = 8, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.in_channels = in_channels
        cin = _make_divisible(32 * width)
        features: list[nn.Module] = [ConvBNReLU6(in_channels, cin, stride=2)]
        stride, dilation = 2, 1
        for t, c, n, s in _SETTING:
            cout = _make_divisible(c * width)
            for i in range(n):
                block_stride = s if i == 0 else 1
                block_dilation = dilation
                if block_stride > 1 and stride >= output_stride:
                    # past the output stride: keep the resolution, dilate from the next block on
                    dilation *= block_stride
                    block_stride = 1
                elif block_stride > 1:
                    stride *= block_stride
                features.append(InvertedResidual(cin, cout, block_stride, t,
                                                 block_dilation if i == 0 else dilation))
                cin = cout
        self.features = nn.Sequential(*features)
        self.channels, self.strides = {}, {}
        for name, end in _STAGE_END.items():
            self.channels[name] = _make_divisible(
                {3: 24, 6: 32, 13: 96, 17: 320}[end] * width)
            self.strides[name] = min({3: 4, 6: 8, 13: 16, 17: 32}[end], output_stride)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, end in _STAGE_END.items():
            for i in range(start, end + 1):
                x = self.features[i](x)
            out[name] = x
            start = end + 1
        out["layer4_pre"] = out["layer4"]  # the last block is a linear bottleneck: no final ReLU
        return out

    first_conv = "features.0.0.weight"
    ignored_prefixes = ("classifier.", "features.18.")
