"""Segmentation models for the trainer: dilated ResNet / MobileNetV2 backbones with torchvision
state-dict layouts, and DeepLabV3, DeepLabV3+, PSPNet and FCN heads.

    model = build_model("deeplabv3", "resnet18", num_classes=19, output_stride=8)
    out = model(images)   # {"layer1".."layer4", "layer4_pre", "neck", "aspp", "embed", "logits"[, "decoder", "aux"]}

Every model returns a dict of named feature points, so a distiller picks any point by name;
`feature_channels` / `feature_strides` describe each point: "layer4_pre" is layer4 before its final
ReLU, "aspp" the ASPP projection before its dropout ("neck" after it), "embed" the classifier's input
(DeepLabV3: after the 3x3 conv block that follows the ASPP). Logits come at the head's own resolution
(the output stride, or 4 for DeepLabV3+); the caller upsamples.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .heads import HEADS, FCNHead
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet

ARCHS = tuple(HEADS)
BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenetv2")

__all__ = ["ARCHS", "BACKBONES", "SegModel", "build_backbone", "build_model",
           "load_backbone_weights"]


def build_backbone(backbone: str, *, output_stride: int = 8, width: float = 1.0,
                   in_channels: int = 3, deep_stem: bool = False) -> nn.Module:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if backbone == "mobilenetv2":
        if deep_stem:
            raise ValueError("deep_stem: a ResNet option; mobilenetv2 has its own stem")
        return MobileNetV2(output_stride=output_stride, width=width, in_channels=in_channels)
    return ResNet(backbone, output_stride=output_stride, width=width, in_channels=in_channels,
                  deep_stem=deep_stem)


ASPP_ARCHS = ("deeplabv3", "deeplabv3plus")


class SegModel(nn.Module):
    """A backbone plus a head (plus an optional auxiliary FCN head on layer3)."""

    def __init__(self, arch: str, backbone: str, num_classes: int, *, output_stride: int = 8,
                 width: float = 1.0, in_channels: int = 3, aux: bool = False, deep_stem: bool = False,
                 aspp_rates: tuple[int, ...] | None = None):
        super().__init__()
        if arch not in HEADS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        self.arch, self.backbone_name = arch, backbone
        self.num_classes, self.output_stride, self.in_channels = num_classes, output_stride, in_channels
        self.backbone = build_backbone(backbone, output_stride=output_stride, width=width,
                                       in_channels=in_channels, deep_stem=deep_stem)
        self.head = HEADS[arch](self.backbone.channels, num_classes, width, output_stride,
                                # heads without an ASPP (pspnet, fcn) have no rates to set
                                **({"rates": tuple(aspp_rates)} if aspp_rates and arch in ASPP_ARCHS else {}))
        self.aux_head = FCNHead(self.backbone.channels["layer3"], num_classes) if aux else None
        self.feature_channels = dict(self.backbone.channels)
        self.feature_strides = dict(self.backbone.strides)
        self.feature_channels["layer4_pre"] = self.feature_channels["layer4"]
        self.feature_strides["layer4_pre"] = self.feature_strides["layer4"]
        head_stride = self.feature_strides["layer1"] if arch == "deeplabv3plus" else output_stride
        for name, c in self.head.channels.items():
            self.feature_channels[name] = c
            self.feature_strides[name] = head_stride if name in ("decoder", "embed") else output_stride
        self.feature_channels["logits"] = num_classes
        self.feature_strides["logits"] = head_stride
        if aux:
            self.feature_channels["aux"] = num_classes
            self.feature_strides["aux"] = self.feature_strides["layer3"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(x)
        out = dict(feats)
        out.update(self.head(feats))
        if self.aux_head is not None:
            out["aux"] = self.aux_head(feats["layer3"])
        return out


def load_backbone_weights(backbone: nn.Module, path_or_state: str | os.PathLike | dict,
                          *, generator: torch.Generator | None = None) -> None:
    """Load a torchvision-format ImageNet state dict into `backbone` (strict, after dropping the
    classifier entries torchvision has and the backbone does not).

    For a backbone with more input channels than the checkpoint (LAD's 4-channel teacher), the
    checkpoint's first-conv weights fill the first channels and the extra ones are drawn from
    N(0, 0.1^2) (docs/losses.md section 7)."""
    if isinstance(path_or_state, dict):
        state = path_or_state
    else:
        path = os.fspath(path_or_state)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(backbone.ignored_prefixes)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"backbone weights do not match {type(backbone).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    first = backbone.first_conv
    w = state[first]
    if w.shape[1] < own[first].shape[1] and w.shape[0] == own[first].shape[0]:
        extra_shape = (w.shape[0], own[first].shape[1] - w.shape[1], *w.shape[2:])
        extra = torch.randn(extra_shape, generator=generator, dtype=torch.float32) * 0.1
        state = dict(state)
        state[first] = torch.cat([w, extra.to(w.dtype)], 1)
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
           if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"backbone weights have wrong shapes (key, file, model): {bad[:5]} -- "
                         "was the model built with the same width?")
    backbone.load_state_dict(state, strict=True)


def build_model(arch: str, backbone: str, num_classes: int, *, output_stride: int = 8,
                width: float = 1.0, in_channels: int = 3, aux: bool = False,
                backbone_weights: str | None = None, deep_stem: bool = False,
                aspp_rates: tuple[int, ...] | None = None) -> SegModel:
    """Build `arch` on `backbone` ("resnet18/50/101", "mobilenetv2"); see the module docstring.
    deep_stem: ResNets start with three 3x3 convs (v1c, CIRKD's ImageNet weights) instead of one 7x7."""
    model = SegModel(arch, backbone, num_classes, output_stride=output_stride, width=width,
                     in_channels=in_channels, aux=aux, deep_stem=deep_stem, aspp_rates=aspp_rates)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model
