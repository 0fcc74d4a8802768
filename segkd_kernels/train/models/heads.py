"""Segmentation heads: DeepLabV3 (ASPP), DeepLabV3+ (ASPP + decoder), PSPNet (PPM), FCN, and the
auxiliary FCN head. Each head takes the backbone's feature dict and adds its named points to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import conv_bn_relu, scaled


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling; concat; 1x1 project.

    Rates (6, 12, 18) at output stride 16, doubled at 8 (DeepLabV3 paper)."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], dropout: float = 0.1):
        super().__init__()
        branches = [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout, 1),
                                     nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        # expand, not interpolate: a 1x1 map broadcast is what bilinear upsampling gives anyway
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(projection before the dropout, after it): AttnFD reads the first, as its official code does."""
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        pre = self.project[0](torch.cat(outs, 1))
        return pre, self.project[1](pre)


class PPM(nn.Module):
    """PSPNet's pyramid pooling module (bins 1, 2, 3, 6) followed by the 3x3 bottleneck conv."""

    def __init__(self, cin: int, cout: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        red = max(cin // len(bins), 8)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(cin, red, 1)) for b in bins)
        self.bottleneck = conv_bn_relu(cin + red * len(bins), cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        outs = [x] + [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False)
                      for s in self.stages]
        return self.bottleneck(torch.cat(outs, 1))


class FCNHead(nn.Module):
    """3x3 conv (cin/4) + BN + ReLU + dropout + 1x1 classifier; the auxiliary head on layer3."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        mid = max(cin // 4, 8)
        self.conv = conv_bn_relu(cin, mid, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)
        self.channels = mid

    def features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class DeepLabV3Head(nn.Module):
    alias = "aspp"

    def __init__(self, channels: dict[str, int], num_classes: int, width: float, output_stride: int,
                 rates: tuple[int, ...] | None = None):
        super().__init__()
        mid = scaled(256, width)
        rates = rates or tuple(r * 16 // output_stride for r in (6, 12, 18))
        self.aspp = ASPP(channels["layer4"], mid, rates)
        # torchvision's DeepLabHead: ASPP then one more 3x3 conv before the classifier
        self.conv = conv_bn_relu(mid, mid, 3)
        self.classifier = nn.Conv2d(mid, num_classes, 1)
        self.channels = {"neck": mid, "aspp": mid, "embed": mid}

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        aspp, neck = self.aspp.features(feats["layer4"])
        # embed: after the head's 3x3 conv block, the pixel embedding CIRKD and SKD distil
        embed = self.conv(neck)
        return {"neck": neck, "aspp": aspp, "embed": embed, "logits": self.classifier(embed)}


class DeepLabV3PlusHead(nn.Module):
    def __init__(self, channels: dict[str, int], num_classes: int, width: float, output_stride: int,
                 rates: tuple[int, ...] | None = None):
        super().__init__()
        mid = scaled(256, width)
        low = scaled(48, width)
        rates = rates or tuple(r * 16 // output_stride for r in (6, 12, 18))
        self.aspp = ASPP(channels["layer4"], mid, rates)
        self.low = conv_bn_relu(channels["layer1"], low, 1)
        self.decoder = nn.Sequential(conv_bn_relu(mid + low, mid, 3), conv_bn_relu(mid, mid, 3))
        self.classifier = nn.Conv2d(mid, num_classes, 1)
        self.channels = {"neck": mid, "aspp": mid, "decoder": mid, "embed": mid}

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        aspp, neck = self.aspp.features(feats["layer4"])
        low = self.low(feats["layer1"])
        up = F.interpolate(neck, size=low.shape[2:], mode="bilinear", align_corners=False)
        dec = self.decoder(torch.cat([up, low], 1))
        return {"neck": neck, "aspp": aspp, "decoder": dec, "embed": dec, "logits": self.classifier(dec)}


class PSPHead(nn.Module):
    def __init__(self, channels: dict[str, int], num_classes: int, width: float, output_stride: int):
        super().__init__()
        mid = scaled(512, width)
        self.ppm = PPM(channels["layer4"], mid)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(mid, num_classes, 1)
        self.channels = {"neck": mid, "ppm": mid, "embed": mid}

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        neck = self.ppm(feats["layer4"])
        return {"neck": neck, "ppm": neck, "embed": neck, "logits": self.classifier(self.dropout(neck))}


class FCNSegHead(nn.Module):
    def __init__(self, channels: dict[str, int], num_classes: int, width: float, output_stride: int):
        super().__init__()
        self.head = FCNHead(channels["layer4"], num_classes)
        self.channels = {"neck": self.head.channels, "embed": self.head.channels}

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        neck = self.head.features(feats["layer4"])
        return {"neck": neck, "embed": neck, "logits": self.head.classifier(self.head.dropout(neck))}


HEADS = {"deeplabv3": DeepLabV3Head, "deeplabv3plus": DeepLabV3PlusHead, "pspnet": PSPHead,
         "fcn": FCNSegHead}
