"""End to end: one distillation training step per method, reference losses against fused losses.

DeepLabV3-R101 teacher -> DeepLabV3-R18 student (output stride 8) on 512x1024 crops, batch 8, bf16
autocast, SGD: the Cityscapes recipe of the papers. For every method the step is timed with the
losses on the reference backend and on `auto` (the fused kernels), next to the same step with the
cross-entropy alone (`step:none`), so the losses' share of a step is
(step - step:none) / step. Rows: op `step:<method>`, provider `reference` / `fused` / `ce-only`,
mode `full`, peak memory of the whole step.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from .harness import format_number, is_oom, measure, oom_row


def _setup(method: str | None, backend: str, device: str, quick: bool):
    from ..train.distill import build_distiller, get_method  # noqa: PLC0415
    from ..train.models import build_model  # noqa: PLC0415

    n, h, w, classes = (2, 64, 64, 8) if quick else (8, 512, 1024, 19)
    width = 0.125 if quick else 1.0
    in_channels = get_method(method).teacher_in_channels if method else 3
    arch = "deeplabv3"
    teacher = build_model(arch, "resnet101", classes, width=width, in_channels=in_channels).to(device).eval()
    student = build_model(arch, "resnet18", classes, width=width).to(device).train()
    distiller = None
    if method:
        try:
            distiller = build_distiller(method, student.feature_channels, teacher.feature_channels, classes,
                                        backend=backend)
        except ValueError:  # a method that needs a decoder point distils DeepLabV3+ models
            arch = "deeplabv3plus"
            teacher = build_model(arch, "resnet101", classes, width=width, in_channels=in_channels).to(device).eval()
            student = build_model(arch, "resnet18", classes, width=width).to(device).train()
            distiller = build_distiller(method, student.feature_channels, teacher.feature_channels, classes,
                                        backend=backend)
        distiller = distiller.to(device).train()
    params = list(student.parameters()) + (list(distiller.parameters()) if distiller else [])
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(n, 3, h, w, device=device)
    labels = torch.randint(0, classes, (n, h, w), device=device)
    labels[:, :8] = 255  # some ignored pixels, as real crops have
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with amp:
            out = student(images)
            logits = F.interpolate(out["logits"], size=(h, w), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
            if distiller is not None:
                with torch.no_grad():
                    teacher_out = teacher(distiller.teacher_input(images, labels))
                loss = loss + sum(distiller(out, teacher_out, labels).values())
        loss.backward()
        optimizer.step()

    return step, f"{n}x3x{h}x{w}"


def run_e2e(device: str, timer, env, writer, quick: bool, methods=None, log=print) -> list[str]:
    from ..train.distill import methods as all_methods  # noqa: PLC0415

    notes = []
    plan = [(None, "reference", "ce-only")] + [(m, b, p) for m in (methods or all_methods())
                                               for b, p in (("reference", "reference"), ("auto", "fused"))]
    for method, backend, provider in plan:
        row = dict(env, op=f"step:{method or 'none'}", dtype="bfloat16", mode="full", provider=provider)
        step = None
        try:
            step, row["shape"] = _setup(method, backend, device, quick)
            row.update(measure(step, device, timer))
        except RuntimeError as err:
            if not is_oom(err):
                raise
            row.update(oom_row())
            notes.append(f"e2e {method}: out of memory with {provider} losses")
        finally:
            step = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        writer.write(row)
        log(f"step {method or 'none':<8}{provider:<10}{format_number(row['ms_p50']):>12} ms  "
            f"peak {format_number(row['peak_mem_mb'])} MiB")
    return notes
