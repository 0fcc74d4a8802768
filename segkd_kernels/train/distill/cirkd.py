"""cirkd: cross-image pixel-to-pixel distillation on the neck (ASPP-block) embeddings, tau 0.1,
+ 1 x pixel KD on the logits (docs/losses.md 4 and 8). The similarity matrices live inside one image
pair, so student and teacher channel counts may differ (no adapter)."""

from __future__ import annotations

import torch.nn.functional as F

import segkd_kernels as sk

from .base import Distiller, match_size, register


@register("cirkd")
class CIRKD(Distiller):
    ops = ("cross_image_kd", "pixel_kd")  # the segkd_kernels ops it calls
    student_points = ("logits", "neck")
    teacher_points = ("logits", "neck")
    default_weights = {"cross_image": 1.0, "kd": 1.0}
    # pool: average-pool the embeddings by this factor first (memory; null = full resolution).
    default_options = {"tau": 0.1, "kd_tau": 1.0, "pool": None, "point": "neck"}

    def forward(self, student, teacher, labels):
        point, pool = self.options["point"], self.options["pool"]
        fs = student[point]
        ft = match_size(teacher[point], fs)
        if pool:
            fs = F.avg_pool2d(fs, pool, ceil_mode=True)
            ft = F.avg_pool2d(ft, pool, ceil_mode=True)
        s = student["logits"]
        return {
            "cross_image": self.weights["cross_image"] * sk.cross_image_kd(fs, ft, self.options["tau"],
                                                                           backend=self.backend),
            "kd": self.weights["kd"] * sk.pixel_kd(s, match_size(teacher["logits"], s), self.options["kd_tau"],
                                                   backend=self.backend),
        }
