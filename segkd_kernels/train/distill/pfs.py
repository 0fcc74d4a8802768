"""pfs: pairwise feature similarities at full resolution on high-level features + knowledge-gap
weighted pixel KD on the logits (docs/losses.md 2b, 3 and 8), weights 1 and 1."""

from __future__ import annotations

import segkd_kernels as sk

from .base import Distiller, match_size, register


@register("pfs")
class PFS(Distiller):
    ops = ("pairwise_kd", "pfs_pixel_kd")  # the segkd_kernels ops it calls
    student_points = ("logits", "neck")
    teacher_points = ("logits", "neck")
    default_weights = {"pairwise": 1.0, "gap_kd": 1.0}
    default_options = {"tau": 1.0, "point": "neck"}

    def forward(self, student, teacher, labels):
        point = self.options["point"]
        fs = student[point]
        s = student["logits"]
        return {
            "pairwise": self.weights["pairwise"] * sk.pairwise_kd(fs, match_size(teacher[point], fs), pool=None,
                                                                  backend=self.backend),
            "gap_kd": self.weights["gap_kd"] * sk.pfs_pixel_kd(s, match_size(teacher["logits"], s),
                                                               self.options["tau"], backend=self.backend),
        }
