"""lad: label-assisted distillation (docs/losses.md 7 and 8; Qiu et al. 2024, official code
skyshoumeng/Label_Assisted_Distillation).

Teacher stage (`stage: teacher`, `method: lad`): the teacher takes the image plus a fourth channel that
encodes the label map, and trains on two independently noised encodings of each image (dual path):
    L = sum_k [CE(out_k) + 0.4 CE(aux_k)] + r(step) * 5 * (CWD(out1 || sg out2) + CWD(out2 || sg out1)),  tau 4,
with r the consistency ramp-up (1 when `consistency_rampup` is 0). As in the official code the teacher
may start from a trained plain teacher (`warm_start`) and share the student's architecture
(`same_arch`).
Student stage: the teacher (eval) gets the deterministic class code plus small noise; the student
(3 channels) is trained with CE + 3 x CWD(student logits || teacher logits), tau 4.

The label channel's amplitude, `label_scale`, is in units of the normalised image's standard
deviation. The official code multiplies the codes (std about 1) by 100, but its images are only
mean-subtracted 0..255 values (std about 58, the ImageNet pixel std): its label channel is about
1.7 image stds, hence the default 1.7 here, where images are divided by their std. Copying the 100
onto std-normalised images makes the label channel 100x the image, which the first convolution
cannot balance (the teacher then ignores either the image or the label).
"""

from __future__ import annotations

import math

import torch

import segkd_kernels as sk

from .base import Distiller, match_size, register

# The official x100 on images with pixel std ~58 (ImageNet's 0.226 * 255): the label channel in image stds.
DEFAULT_LABEL_SCALE = 1.7
# What checkpoints written before `label_scale` existed were trained with (the official constant).
LEGACY_LABEL_SCALE = 100.0


def label_channel(labels: torch.Tensor, num_classes: int, *, train: bool, ignore_index: int = 255,
                  train_noise: float = 0.03, eval_noise: float = 0.02, scale: float = DEFAULT_LABEL_SCALE,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 1, H, W) label encoding. Codes: classes 0..K-1, ignore counted as class K (K+1 codes).

    train: one N(0,1) scalar per image and per code, plus train_noise * N(0,1) per pixel;
    eval:  the code (k - (K+1)/2) / ((K+1)/2 - 1), plus eval_noise * N(0,1) per pixel. Then x scale
    (the amplitude in units of the normalised image's std, see the module docstring).
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


def with_label(images: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: float, *,
               zero_label: bool = False) -> torch.Tensor:
    """The LAD teacher's evaluation input: image + eval label code, or + zeros (`zero_label`: what the
    teacher predicts from the image alone, the check that it reads the label)."""
    if zero_label:
        code = torch.zeros_like(images[:, :1])
    else:
        code = label_channel(labels, num_classes, train=False, scale=scale).to(images.dtype)
    return torch.cat([images, code], 1)


def rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2), t = step / length clipped to 1 (the sigmoid-shaped ramp of Laine & Aila's
    temporal ensembling): the consistency term starts near 0.7% and reaches full weight at `length`."""
    if length <= 0:
        return 1.0
    t = min(1.0, max(0.0, step / length))
    return math.exp(-5.0 * (1.0 - t) ** 2)


@register("lad")
class LAD(Distiller):
    ops = ("channel_wise_kd",)  # the segkd_kernels ops it calls
    student_points = ("logits",)
    teacher_points = ("logits",)
    default_weights = {"cwd": 3.0}
    # label_scale: the label channel in image stds (see the module docstring);
    # consistency_rampup: iterations over which the dual-path term's weight ramps up (0: constant);
    # warm_start: a plain (3-channel) teacher checkpoint the label-assisted teacher starts from;
    # same_arch: the teacher stage builds the student's architecture (the official setting).
    default_options = {"tau": 4.0, "teacher_cwd": 5.0, "teacher_aux": 0.4, "label_scale": DEFAULT_LABEL_SCALE,
                       "consistency_rampup": 0, "warm_start": None, "same_arch": False}
    teacher_in_channels = 4

    def __init__(self, student_channels, teacher_channels, num_classes, **kw):
        super().__init__(student_channels, teacher_channels, num_classes, **kw)
        check_options(self.options)

    def teacher_input(self, images, labels):
        return with_label(images, labels, self.num_classes, self.options["label_scale"])

    def forward(self, student, teacher, labels):
        s = student["logits"]
        return {"cwd": self.weights["cwd"] * sk.channel_wise_kd(s, match_size(teacher["logits"], s),
                                                                 self.options["tau"], backend=self.backend)}

    @staticmethod
    def teacher_losses(model, images, labels, num_classes: int, task_loss, *, tau: float = 4.0,
                       cwd_weight: float = 5.0, aux_weight: float = 0.4, backend: str = "auto",
                       label_scale: float = DEFAULT_LABEL_SCALE, step: int = 0, rampup_iters: int = 0) -> dict:
        """The dual-path teacher objective. Both paths go through one forward (batch 2N), which keeps
        DDP to one forward per backward; BN then sees both noisings of each image in one batch."""
        n = images.shape[0]
        c1 = label_channel(labels, num_classes, train=True, scale=label_scale)
        c2 = label_channel(labels, num_classes, train=True, scale=label_scale)
        x = torch.cat([torch.cat([images, c1.to(images.dtype)], 1), torch.cat([images, c2.to(images.dtype)], 1)])
        out = model(x)
        both = torch.cat([labels, labels])
        losses = {"ce": task_loss(out["logits"], both)}
        if "aux" in out and aux_weight > 0:
            losses["aux"] = aux_weight * task_loss(out["aux"], both)
        # task_loss means over 2N images; the recipe sums the two paths.
        losses = {k: 2 * v for k, v in losses.items()}
        o1, o2 = out["logits"][:n], out["logits"][n:]
        w = cwd_weight * rampup(step, rampup_iters)
        losses["dual_cwd"] = w * (sk.channel_wise_kd(o1, o2.detach(), tau, backend=backend)
                                  + sk.channel_wise_kd(o2, o1.detach(), tau, backend=backend))
        return losses


def check_options(o: dict) -> None:
    """One-line errors for LAD's own options (the trainer calls it before any work starts)."""
    s = o.get("label_scale", DEFAULT_LABEL_SCALE)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
        raise ValueError(f"distill.options.label_scale: expected a positive number, got {s!r}")
    r = o.get("consistency_rampup", 0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"distill.options.consistency_rampup: expected an iteration count >= 0, got {r!r}")
    ws = o.get("warm_start")
    if ws is not None and not isinstance(ws, str):
        raise ValueError(f"distill.options.warm_start: expected a checkpoint path or null, got {ws!r}")
    if not isinstance(o.get("same_arch", False), bool):
        raise ValueError(f"distill.options.same_arch: expected true or false, got {o.get('same_arch')!r}")


def warm_start_state(model_state: dict, init_state: dict) -> dict:
    """`init_state` (a plain 3-channel model's weights) fitted to the 4-channel LAD teacher: every
    entry copied, the first convolution's label-channel weights set to zero, so the teacher starts as
    exactly the plain teacher and learns to read the label from there."""
    out = {}
    for k, v in model_state.items():
        if k not in init_state:
            if k.startswith("aux_head."):  # a plain teacher trained without the auxiliary head: fresh one
                out[k] = v
                continue
            raise ValueError(f"distill.options.warm_start: the checkpoint has no {k!r}")
        w = init_state[k]
        if w.shape != v.shape:
            if w.dim() == 4 and v.dim() == 4 and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:] \
                    and w.shape[1] + 1 == v.shape[1]:
                w = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
            else:
                raise ValueError(f"distill.options.warm_start: {k!r} has shape {tuple(w.shape)}, the teacher "
                                 f"needs {tuple(v.shape)}")
        out[k] = w
    extra = sorted(set(init_state) - set(model_state))
    if extra:
        raise ValueError(f"distill.options.warm_start: the checkpoint has entries the teacher lacks: {extra[:3]}")
    return out


def recorded_label_scale(config: dict | None) -> float:
    """The label_scale a LAD teacher checkpoint was trained with (from its recorded config); teachers
    written before the option existed used the official x100."""
    opts = ((config or {}).get("distill") or {}).get("options") or {}
    return float(opts.get("label_scale", LEGACY_LABEL_SCALE))
