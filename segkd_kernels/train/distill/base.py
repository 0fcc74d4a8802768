"""The distiller interface shared by every method."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

REGISTRY: dict[str, type["Distiller"]] = {}


def register(name: str):
    """Class decorator: make a Distiller subclass available as `method: name`."""

    def wrap(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"distillation method {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


class Distiller(nn.Module, abc.ABC):
    """Turns the student's and the teacher's named outputs into named, weighted loss terms.

    Subclasses declare:
      student_points / teacher_points: the names of `SegModel.forward` outputs they read
          (the trainer checks both models provide them before any work starts),
      default_weights: {term name: weight}; the config's `distill.weights` overrides entries,
      default_options: method hyper-parameters (tau, pool, ...); `distill.options` overrides entries.
    They build their adapters in `__init__` from the channel counts, and `forward` returns
    {term name: weight * loss}; the trainer adds the task loss (cross-entropy) itself.
    Learned adapters are parameters of the distiller: the optimiser trains them with the student.
    """

    name: ClassVar[str] = ""
    ops: ClassVar[tuple[str, ...]] = ()  # the segkd_kernels ops it calls (backend availability)
    student_points: ClassVar[tuple[str, ...]] = ("logits",)
    teacher_points: ClassVar[tuple[str, ...]] = ("logits",)
    default_weights: ClassVar[dict[str, float]] = {}
    default_options: ClassVar[dict] = {}
    # LAD's teacher sees the label as a fourth input channel.
    teacher_in_channels: ClassVar[int] = 3

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int], num_classes: int, *,
                 weights: dict | None = None, options: dict | None = None, backend: str = "auto"):
        super().__init__()
        unknown = set(weights or {}) - set(self.default_weights)
        if unknown:
            raise ValueError(f"distill.weights: unknown term(s) {sorted(unknown)} for method {self.name!r}; "
                             f"terms: {sorted(self.default_weights)}")
        unknown = set(options or {}) - set(self.default_options)
        if unknown:
            raise ValueError(f"distill.options: unknown option(s) {sorted(unknown)} for method {self.name!r}; "
                             f"options: {sorted(self.default_options) or 'none'}")
        self.weights = {**self.default_weights, **(weights or {})}
        for k, v in self.weights.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"distill.weights.{k}: expected a non-negative number, got {v!r}")
        self.options = {**self.default_options, **(options or {})}
        self.backend = backend
        self.num_classes = num_classes
        for point in self.student_points:
            if point not in student_channels:
                raise ValueError(f"method {self.name!r} needs the student feature point {point!r}; "
                                 f"the student has {sorted(student_channels)}")
        for point in self.teacher_points:
            if point not in teacher_channels:
                raise ValueError(f"method {self.name!r} needs the teacher feature point {point!r}; "
                                 f"the teacher has {sorted(teacher_channels)}")
        self.student_channels = dict(student_channels)
        self.teacher_channels = dict(teacher_channels)

    def teacher_input(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the teacher sees (the image, except for label-assisted teachers)."""
        return images

    @abc.abstractmethod
    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{term name: weight * loss} for one batch; every method implements it."""

    # Training-schedule hooks (defaults: none of them changes anything).
    @property
    def teacher_train_mode(self) -> bool:
        """True: the teacher runs in training mode (batch statistics, dropout), as some official codes do."""
        return False

    def task_scale(self, batch_size: int) -> float:
        """Factor on the task loss (cross-entropy and auxiliary): a recipe's normalisation of it."""
        return 1.0

    def frozen_parameters(self, step: int, steps_per_epoch: int, model: nn.Module):
        """Parameters (of the student `model` or of this distiller) not to update at `step` (0-based):
        the trainer drops their gradients before the optimiser step, so neither the update nor the
        weight decay touches them, and the phase is a function of the step alone (exact resume)."""
        return ()

    def active(self, term: str) -> bool:
        return self.weights.get(term, 0.0) > 0


def check_point(point, student_channels: dict, teacher_channels: dict, key: str = "distill.options.point") -> None:
    """A configured feature point that both models have, or a one-line error naming what they have."""
    if point not in student_channels or point not in teacher_channels:
        raise ValueError(f"{key}: {point!r} is not a feature point of both models (student "
                         f"{sorted(student_channels)}, teacher {sorted(teacher_channels)})")


def match_size(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Teacher maps at the student's spatial size (the two heads may have different output strides)."""
    if t.shape[-2:] == like.shape[-2:]:
        return t
    return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)


def adapter(in_channels: int, out_channels: int) -> nn.Module:
    """1x1 conv + BN mapping student channels to the teacher's (docs/losses.md 1, 5)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def ignore_mask_at(labels: torch.Tensor, like: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """(N, h, w) bool mask of ignored pixels, the label map resized (nearest) to a logit map's size."""
    lab = labels[:, None].float()
    if lab.shape[-2:] != like.shape[-2:]:
        lab = F.interpolate(lab, size=like.shape[-2:], mode="nearest")
    return lab[:, 0] == ignore_index
