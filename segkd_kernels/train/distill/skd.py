"""skd: structured KD (docs/losses.md 3 and 8): 10 x pairwise similarity on the pixel embeddings + 1 x pixel
KD on the logits. `pool: 2` is CIRKD parity; `pool: null` is full resolution.

The embeddings are the "embed" point, the feature after the head's 3x3 conv block that follows the ASPP
(DeepLabV3), which is where CIRKD's reimplementation of SKD reads them (`point: neck` is the ASPP output,
one block earlier)."""

from __future__ import annotations

import segkd_kernels as sk

from .base import Distiller, check_point, match_size, register


@register("skd")
class SKD(Distiller):
    ops = ("pairwise_kd", "pixel_kd")  # the segkd_kernels ops it calls
    student_points = ("logits",)
    teacher_points = ("logits",)
    default_weights = {"pairwise": 10.0, "kd": 1.0}
    default_options = {"pool": 2, "detach_norm": False, "tau": 1.0, "point": "embed"}

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        check_point(self.options["point"], student_channels, teacher_channels)

    def forward(self, student, teacher, labels):
        point = self.options["point"]
        fs = student[point]
        out = {"pairwise": self.weights["pairwise"] * sk.pairwise_kd(
            fs, match_size(teacher[point], fs), pool=self.options["pool"],
            detach_norm=self.options["detach_norm"], backend=self.backend)}
        if self.active("kd"):
            s = student["logits"]
            out["kd"] = self.weights["kd"] * sk.pixel_kd(s, match_size(teacher["logits"], s), self.options["tau"],
                                                         backend=self.backend)
        return out
