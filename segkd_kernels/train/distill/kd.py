"""kd: Hinton KD per pixel on the logits (docs/losses.md 2 and 8), 1 x pixel KD at tau 1."""

from __future__ import annotations

import segkd_kernels as sk

from .base import Distiller, ignore_mask_at, match_size, register


@register("kd")
class KD(Distiller):
    ops = ("pixel_kd",)  # the segkd_kernels ops it calls
    student_points = ("logits",)
    teacher_points = ("logits",)
    default_weights = {"kd": 1.0}
    # mask_ignore: leave pixels labelled "ignore" out of the KD average (CIRKD's CriterionKD keeps them).
    default_options = {"tau": 1.0, "mask_ignore": False}

    def forward(self, student, teacher, labels):
        s, t = student["logits"], match_size(teacher["logits"], student["logits"])
        mask = ignore_mask_at(labels, s) if self.options["mask_ignore"] else None
        return {"kd": self.weights["kd"] * sk.pixel_kd(s, t, self.options["tau"], ignore_mask=mask,
                                                         backend=self.backend)}
