"""Dilated ResNet-18/50/101 backbones with torchvision's state-dict layout.

Module names and parameter shapes follow `torchvision.models.resnet` (v1.5: the stride sits on the
3x3 conv of a bottleneck), so `backbone.load_state_dict` accepts a torchvision ImageNet checkpoint
without its `fc.*` entries. For output stride 8 or 16 the last stages trade their stride for dilation
as torchvision's `replace_stride_with_dilation` does: the first block of a dilated stage keeps the
previous dilation, the following blocks use the new one. Unlike torchvision, BasicBlock (ResNet-18)
supports dilation too, which segmentation students need.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import scaled

_STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, prev_dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=prev_dilation,
                               dilation=prev_dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def residual(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, prev_dilation: int = 1):
        super().__init__()
        del prev_dilation  # only the 3x3 conv is dilated; torchvision passes one dilation per block
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x))


class ResNet(nn.Module):
    """Stages `layer1..layer4` at strides 4, 8, then 8/16 depending on `output_stride`."""

    def __init__(self, depth: str, *, output_stride: int = 8, width: float = 1.0,
                 in_channels: int = 3, deep_stem: bool = False):
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"unknown ResNet {depth!r}; choose one of {sorted(_STAGE_BLOCKS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block = BasicBlock if depth == "resnet18" else Bottleneck
        blocks = _STAGE_BLOCKS[depth]
        # torchvision's replace_stride_with_dilation for layer2..layer4
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[
            output_stride]
        self.in_channels, self.deep_stem = in_channels, deep_stem
        self.inplanes = scaled(64, width)
        self.dilation = 1
        if deep_stem:
            # ResNet-v1c / CIRKD's "resnet18-imagenet.pth" stem: three 3x3 convs (64, 64, 128) instead
            # of one 7x7; the baseline CIRKD and LAD report uses it (module names as CIRKD's ResNetV1b)
            stem = self.inplanes
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                nn.Conv2d(stem, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                nn.Conv2d(stem, 2 * stem, 3, 1, 1, bias=False))
            self.inplanes = 2 * stem
            self.first_conv = "conv1.0.weight"
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = [scaled(p, width) for p in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(block, planes[0], blocks[0])
        self.layer2 = self._make_layer(block, planes[1], blocks[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, planes[2], blocks[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, planes[3], blocks[3], 2, dilate[2])
        self.channels = {f"layer{i + 1}": p * block.expansion for i, p in enumerate(planes)}
        strides, s = {}, 4
        for i, d in enumerate((False,) + dilate):
            if i > 0 and not d:
                s *= 2
            strides[f"layer{i + 1}"] = s
        self.strides = strides
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, n: int, stride: int = 1, dilate: bool = False):
        prev_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, prev_dilation if block is Bottleneck
                        else self.dilation, downsample, prev_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, n):
            layers.append(block(self.inplanes, planes, dilation=self.dilation,
                                prev_dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in ("layer1", "layer2", "layer3"):
            x = getattr(self, name)(x)
            out[name] = x
        for block in self.layer4[:-1]:
            x = block(x)
        # layer4 before its final ReLU too (AttnFD distils it there, as its official code does);
        # the ReLU is not in place so both tensors live
        out["layer4_pre"] = self.layer4[-1].residual(x)
        out["layer4"] = F.relu(out["layer4_pre"])
        return out

    # names of the first conv and of entries a torchvision checkpoint has but this backbone lacks
    first_conv = "conv1.weight"
    ignored_prefixes = ("fc.",)
