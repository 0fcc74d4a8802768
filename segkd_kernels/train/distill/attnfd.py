"""attnfd: attention-guided feature distillation (docs/losses.md 6 and 8): CBAM-refined features at the
last backbone stage, the ASPP output and the decoder output (the points both models have), connector
1x1 conv + BN, lambda 2 x the sum over points."""

from __future__ import annotations

from torch import nn

import segkd_kernels as sk

from .base import Distiller, match_size, register


@register("attnfd")
class AttnFD(Distiller):
    ops = ("attnfd_loss", "spatial_pool", "channel_pool", "cbam_gate")  # the segkd_kernels ops it calls
    student_points = ("layer4", "neck")
    teacher_points = ("layer4", "neck")
    default_weights = {"attnfd": 2.0}
    default_options = {"points": ["layer4", "neck", "decoder"], "reduction": 16, "kernel_size": 7}

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        # "decoder" exists only on DeepLabV3+; distil the listed points that both models have.
        self.points = [p for p in self.options["points"] if p in student_channels and p in teacher_channels]
        if not self.points:
            raise ValueError(f"distill.options.points: none of {self.options['points']} is a feature point of "
                             f"both models")
        self.blocks = nn.ModuleDict({
            p: sk.nn.AttnFD(student_channels[p], teacher_channels[p], self.options["reduction"],
                            self.options["kernel_size"], backend=self.backend)
            for p in self.points})

    def forward(self, student, teacher, labels):
        total = 0.0
        for p in self.points:
            fs = student[p]
            total = total + self.blocks[p](fs, match_size(teacher[p], fs))
        return {"attnfd": self.weights["attnfd"] * total}
