"""attnfd: attention-guided feature distillation (docs/losses.md 6 and 8; Mansourian et al. 2024, official
code AmirMansurian/AttnFD), set up as the official code trains it:

- points: layer4 before its final ReLU, the ASPP projection before its dropout, and the decoder's
  output (DeepLabV3+: the student and teacher must both be DeepLabV3+ for the decoder point; a
  configured point that a model lacks is skipped with a warning);
- at each point CBAM_s + connector (1x1 conv + BN, He-normal init) on the student, CBAM_t (random,
  frozen) on the teacher, loss = sum over points of ||A_s/||A_s|| - A_t/||A_t||||^2 / N, lambda 2;
- two phases: for the first `connector_epochs` epochs only the connectors learn (the student is
  frozen), afterwards the connectors are frozen and the student learns;
- the student CBAMs' channel MLPs stay at their initial weights (upstream's optimiser only holds
  convolutions and BatchNorms); their spatial conv and BN learn with the student (here at the head's
  learning rate, being distiller parameters; upstream trains the layer4 one at the backbone's);
- `teacher_mode: train` runs the teacher in training mode (batch statistics, dropout) as upstream
  does; `eval` uses its running statistics;
- `ce_batch_average`: upstream divides the (pixel-mean) cross-entropy by the batch size as well;
  the trainer does the same here, so lambda 2 weighs the two terms as the paper does.
"""

from __future__ import annotations

import math
import warnings

from torch import nn

import segkd_kernels as sk

from .base import Distiller, match_size, register

TEACHER_MODES = ("train", "eval")


@register("attnfd")
class AttnFD(Distiller):
    ops = ("attnfd_loss", "spatial_pool", "channel_pool", "cbam_gate")  # the segkd_kernels ops it calls
    student_points = ()
    teacher_points = ()
    default_weights = {"attnfd": 2.0}
    default_options = {"points": ["layer4_pre", "aspp", "decoder"], "reduction": 16, "kernel_size": 7,
                       "connector_epochs": 1.0, "freeze_student_mlp": True, "teacher_mode": "train",
                       "ce_batch_average": True}

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        o = self.options
        if o["teacher_mode"] not in TEACHER_MODES:
            raise ValueError(f"distill.options.teacher_mode: expected one of {', '.join(TEACHER_MODES)}, "
                             f"got {o['teacher_mode']!r}")
        ce = o["connector_epochs"]
        if isinstance(ce, bool) or not isinstance(ce, (int, float)) or ce < 0:
            raise ValueError(f"distill.options.connector_epochs: expected a number of epochs >= 0, got {ce!r}")
        points = list(o["points"])
        self.points = [p for p in points if p in student_channels and p in teacher_channels]
        missing = [p for p in points if p not in self.points]
        if missing:
            # e.g. "decoder" on a DeepLabV3 (not V3+) model: distilling fewer points than configured
            # changes the method, so say so rather than drop it silently
            warnings.warn(f"attnfd: feature point(s) {missing} are not in both models and are skipped (student "
                          f"has {sorted(student_channels)}, teacher {sorted(teacher_channels)}); the decoder point "
                          f"needs DeepLabV3+ student and teacher", stacklevel=2)
        if not self.points:
            raise ValueError(f"distill.options.points: none of {points} is a feature point of both models")
        self.blocks = nn.ModuleDict({
            p: sk.nn.AttnFD(student_channels[p], teacher_channels[p], o["reduction"], o["kernel_size"],
                            backend=self.backend)
            for p in self.points})
        for block in self.blocks.values():
            conv = block.connector[0]
            # upstream's connector init: N(0, 2 / (k * k * out_channels))
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1]
                                                               * conv.out_channels)))
            if o["freeze_student_mlp"]:
                block.student_cbam.mlp.requires_grad_(False)

    @property
    def teacher_train_mode(self) -> bool:
        return self.options["teacher_mode"] == "train"

    def task_scale(self, batch_size: int) -> float:
        return 1.0 / batch_size if self.options["ce_batch_average"] else 1.0

    def connector_steps(self, steps_per_epoch: int) -> int:
        return int(round(self.options["connector_epochs"] * steps_per_epoch))

    def frozen_parameters(self, step: int, steps_per_epoch: int, model: nn.Module):
        """Connectors alone for the first `connector_epochs` epochs, then everything but them."""
        connectors = [p for b in self.blocks.values() for p in b.connector.parameters()]
        if step < self.connector_steps(steps_per_epoch):
            ids = {id(p) for p in connectors}
            return [*model.parameters(), *(p for p in self.parameters() if id(p) not in ids)]
        return connectors

    def forward(self, student, teacher, labels):
        total = 0.0
        for p in self.points:
            fs = student[p]
            total = total + self.blocks[p](fs, match_size(teacher[p], fs))
        return {"attnfd": self.weights["attnfd"] * total}
