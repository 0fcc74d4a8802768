"""lad: label-assisted distillation (docs/losses.md 7 and 8).

Teacher stage (`stage: teacher`, `method: lad`): the teacher takes the image plus a fourth channel that
encodes the label map, and trains on two independently noised encodings of each image (dual path):
    L = sum_k [CE(out_k) + 0.4 CE(aux_k)] + 5 * (CWD(out1 || sg out2) + CWD(out2 || sg out1)),  tau 4.
Student stage: the teacher (eval) gets the deterministic class code plus small noise; the student
(3 channels) is trained with CE + 3 x CWD(student logits || teacher logits), tau 4.
"""

from __future__ import annotations

import torch

import segkd_kernels as sk

from .base import Distiller, match_size, register


def label_channel(labels: torch.Tensor, num_classes: int, *, train: bool, ignore_index: int = 255,
                  train_noise: float = 0.03, eval_noise: float = 0.02, scale: float = 100.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 1, H, W) label encoding. Codes: classes 0..K-1, ignore counted as class K (K+1 codes).

    train: one N(0,1) scalar per image and per code, plus train_noise * N(0,1) per pixel;
    eval:  the code (k - (K+1)/2) / ((K+1)/2 - 1), plus eval_noise * N(0,1) per pixel. Then x scale.
    """
    k = labels.clone()
    k[labels == ignore_index] = num_classes
    k = k.clamp_(0, num_classes)  # labels are checked elsewhere; this only keeps the gather in range
    n = labels.shape[0]
    kw = dict(device=labels.device, dtype=torch.float32, generator=generator)
    if train:
        table = torch.randn(n, num_classes + 1, **kw)
        code = torch.gather(table, 1, k.reshape(n, -1)).reshape(labels.shape)
        noise = train_noise
    else:
        half = (num_classes + 1) / 2
        code = (k.float() - half) / (half - 1 if half != 1 else 1.0)
        noise = eval_noise
    code = code + noise * torch.randn(labels.shape, **kw)
    return (code * scale)[:, None]


@register("lad")
class LAD(Distiller):
    ops = ("channel_wise_kd",)  # the segkd_kernels ops it calls
    student_points = ("logits",)
    teacher_points = ("logits",)
    default_weights = {"cwd": 3.0}
    default_options = {"tau": 4.0, "teacher_cwd": 5.0, "teacher_aux": 0.4}
    teacher_in_channels = 4

    def teacher_input(self, images, labels):
        code = label_channel(labels, self.num_classes, train=False)
        return torch.cat([images, code.to(images.dtype)], dim=1)

    def forward(self, student, teacher, labels):
        s = student["logits"]
        return {"cwd": self.weights["cwd"] * sk.channel_wise_kd(s, match_size(teacher["logits"], s),
                                                                 self.options["tau"], backend=self.backend)}

    @staticmethod
    def teacher_losses(model, images, labels, num_classes: int, task_loss, *, tau: float = 4.0,
                       cwd_weight: float = 5.0, aux_weight: float = 0.4, backend: str = "auto") -> dict:
        """The dual-path teacher objective. Both paths go through one forward (batch 2N), which keeps
        DDP to one forward per backward; BN then sees both noisings of each image in one batch."""
        n = images.shape[0]
        c1 = label_channel(labels, num_classes, train=True)
        c2 = label_channel(labels, num_classes, train=True)
        x = torch.cat([torch.cat([images, c1.to(images.dtype)], 1), torch.cat([images, c2.to(images.dtype)], 1)])
        out = model(x)
        both = torch.cat([labels, labels])
        losses = {"ce": task_loss(out["logits"], both)}
        if "aux" in out and aux_weight > 0:
            losses["aux"] = aux_weight * task_loss(out["aux"], both)
        # task_loss means over 2N images; the recipe sums the two paths.
        losses = {k: 2 * v for k, v in losses.items()}
        o1, o2 = out["logits"][:n], out["logits"][n:]
        losses["dual_cwd"] = cwd_weight * (sk.channel_wise_kd(o1, o2.detach(), tau, backend=backend)
                                           + sk.channel_wise_kd(o2, o1.detach(), tau, backend=backend))
        return losses
