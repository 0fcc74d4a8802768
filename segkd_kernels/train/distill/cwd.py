"""cwd: channel-wise distillation on the logits, 3 x CWD at tau 4 (docs/losses.md 1 and 8).

Optionally also on the neck (ASPP) features through a 1x1 conv + BN adapter (weight `feat`, off by
default as in the paper's logits recipe)."""

from __future__ import annotations

import segkd_kernels as sk

from .base import Distiller, adapter, match_size, register


@register("cwd")
class CWD(Distiller):
    ops = ("channel_wise_kd",)  # the segkd_kernels ops it calls
    student_points = ("logits", "neck")
    teacher_points = ("logits", "neck")
    default_weights = {"cwd": 3.0, "feat": 0.0}
    default_options = {"tau": 4.0, "feat_tau": 4.0}

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        if self.active("feat"):
            self.adapter = adapter(student_channels["neck"], teacher_channels["neck"])

    def forward(self, student, teacher, labels):
        s = student["logits"]
        out = {"cwd": self.weights["cwd"] * sk.channel_wise_kd(s, match_size(teacher["logits"], s),
                                                                 self.options["tau"], backend=self.backend)}
        if self.active("feat"):
            fs = self.adapter(student["neck"])
            out["feat"] = self.weights["feat"] * sk.channel_wise_kd(
                fs, match_size(teacher["neck"], fs), self.options["feat_tau"], backend=self.backend)
        return out
