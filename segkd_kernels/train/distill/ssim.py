"""ssim: SSIM feature distillation (docs/losses.md 5 and 8) on backbone / neck features, each student point
mapped to the teacher's channels by a 1x1 conv + BN adapter; weight 3 (the papers use 2..4)."""

from __future__ import annotations

from torch import nn

import segkd_kernels as sk

from .base import Distiller, adapter, match_size, register


@register("ssim")
class SSIM(Distiller):
    ops = ("ssim_kd",)  # the segkd_kernels ops it calls
    student_points = ("neck",)
    teacher_points = ("neck",)
    default_weights = {"ssim": 3.0}
    default_options = {"points": ["neck"], "window_size": 11, "sigma": 1.5, "padding": "reflect",
                       "normalize": True}

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        points = list(self.options["points"])
        for p in points:
            if p not in student_channels or p not in teacher_channels:
                raise ValueError(f"distill.options.points: {p!r} is not a feature point of both models "
                                 f"(student {sorted(student_channels)}, teacher {sorted(teacher_channels)})")
        self.points = points
        self.adapters = nn.ModuleDict({p: adapter(student_channels[p], teacher_channels[p]) for p in points})

    def forward(self, student, teacher, labels):
        total = 0.0
        for p in self.points:
            fs = self.adapters[p](student[p])
            # Small feature maps: a window larger than the map cannot be reflect-padded.
            window = min(self.options["window_size"], 2 * (min(fs.shape[-2:]) // 2) - 1)
            total = total + sk.ssim_kd(fs, match_size(teacher[p], fs), window_size=max(3, window),
                                       sigma=self.options["sigma"], padding=self.options["padding"],
                                       normalize=self.options["normalize"], backend=self.backend)
        return {"ssim": self.weights["ssim"] * total / len(self.points)}
