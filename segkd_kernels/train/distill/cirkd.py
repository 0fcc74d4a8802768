"""cirkd: CIRKD (docs/losses.md 4, 4b and 8) as its official training script combines it: cross-image
pixel-to-pixel distillation on the pixel embeddings, tau 0.1; the two memory terms (pixel-to-pixel and
pixel-to-region contrast of the student's projected embeddings against queues of teacher
embeddings, weights 0.1 and 0.1, its Pascal VOC scripts 0.01 and 0.01); + 1 x pixel KD on the
logits. The similarity matrices of the cross-image term live inside one image pair, so student and
teacher channel counts may differ there (no adapter); the memory terms project the student to the
teacher's width with CIRKD's head (conv-BN-ReLU-conv), trained with the student.

The embeddings are the "embed" point by default, the feature after the head's 3x3 conv block that
follows the ASPP, where CIRKD reads them (`point: neck` is the ASPP output, one block earlier)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels.compat.cirkd import StudentSegContrast

from .base import Distiller, check_point, match_size, register

IGNORE_INDEX = 255  # the trainer's void label


@register("cirkd")
class CIRKD(Distiller):
    ops = ("cross_image_kd", "pixel_kd", "memory_contrast_kd")  # the segkd_kernels ops it calls
    student_points = ("logits",)
    teacher_points = ("logits",)
    default_weights = {"cross_image": 1.0, "kd": 1.0, "memory_pixel": 0.1, "memory_region": 0.1}
    # pool: average-pool the embeddings by this factor first for the cross-image term (memory;
    # null = full resolution). The memory options are CIRKD's training-script defaults: queues of
    # 20000 pixel and 2000 region embeddings per class, banks of 4096 and 1024 entries over all
    # classes (each class contributes `size // num_classes + 1` slots), KD temperature 1 on the
    # bank similarities (the contrast temperature is `tau`); memory_seed seeds the draws (queue
    # initialisation, enqueued pixels, sampled slots) apart from the training stream.
    default_options = {"tau": 0.1, "kd_tau": 1.0, "pool": None, "point": "embed",
                       "memory_kd_tau": 1.0, "pixel_memory_size": 20000, "region_memory_size": 2000,
                       "pixel_contrast_size": 4096, "region_contrast_size": 1024, "memory_seed": 0}

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        o = self.options
        check_point(o["point"], student_channels, teacher_channels)
        self.memory = None
        if self.active("memory_pixel") or self.active("memory_region"):
            for name in ("pixel_memory_size", "region_memory_size", "pixel_contrast_size", "region_contrast_size"):
                if isinstance(o[name], bool) or not isinstance(o[name], int) or o[name] < 1:
                    raise ValueError(f"distill.options.{name}: expected a positive integer, got {o[name]!r}")
            point = o["point"]
            # pixels taken among the class's own pixels (CIRKD's code indexes the whole image; see
            # docs/conventions.md)
            self.memory = StudentSegContrast(
                num_classes, o["pixel_memory_size"], o["region_memory_size"],
                o["region_contrast_size"] // num_classes + 1, o["pixel_contrast_size"] // num_classes + 1,
                o["memory_kd_tau"], o["tau"], student_channels[point], teacher_channels[point], IGNORE_INDEX,
                class_pixels=True, generator=torch.Generator().manual_seed(int(o["memory_seed"])),
                backend=self.backend)
            # The generator's state travels with the queues in checkpoints, so a resumed run draws
            # what the uninterrupted one would have.
            self.register_buffer("memory_rng_state", self.memory.generator.get_state())
            self.register_load_state_dict_post_hook(CIRKD._restore_memory_rng)

    @staticmethod
    def _restore_memory_rng(module, _incompatible_keys):
        module.memory.generator.set_state(module.memory_rng_state.cpu())

    def forward(self, student, teacher, labels):
        point, pool = self.options["point"], self.options["pool"]
        fs = student[point]
        ft = match_size(teacher[point], fs)
        s = student["logits"]
        out = {}
        if self.memory is not None:
            # on the embeddings before any pooling, as CIRKD; the queues are updated first
            pixel, region = self.memory(fs, ft.detach(), labels)
            self.memory_rng_state.copy_(self.memory.generator.get_state())
            out["memory_pixel"] = self.weights["memory_pixel"] * pixel
            out["memory_region"] = self.weights["memory_region"] * region
        if pool:
            fs = F.avg_pool2d(fs, pool, ceil_mode=True)
            ft = F.avg_pool2d(ft, pool, ceil_mode=True)
        out["cross_image"] = self.weights["cross_image"] * sk.cross_image_kd(fs, ft, self.options["tau"],
                                                                             backend=self.backend)
        out["kd"] = self.weights["kd"] * sk.pixel_kd(s, match_size(teacher["logits"], s), self.options["kd_tau"],
                                                     backend=self.backend)
        return out
