"""sk.memory_contrast_kd: anchor embeddings against a memory bank of teacher embeddings
(CIRKD's memory terms; docs/losses.md 4b)."""

import torch

from ..._backends import FLOAT_DTYPES, KERNEL_DTYPES, select_backend
from ..._validation import check_positive, check_same_device, check_same_shape, check_teacher_dtype, check_tensor
from . import reference

IMPLEMENTED = {"reference": FLOAT_DTYPES, "cuda": KERNEL_DTYPES}
try:
    from .triton import memory_contrast_kd_triton

    IMPLEMENTED["triton"] = FLOAT_DTYPES
except ImportError:  # triton missing: _backends reports why
    memory_contrast_kd_triton = None
from .cuda import memory_contrast_kd_cuda


def memory_contrast_kd(student_embed: torch.Tensor, teacher_embed: torch.Tensor, memory: torch.Tensor,
                       tau: float = 0.1, kd_tau: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """kd_tau^2 / M * sum over the M anchor rows of KL(softmax(t_m . B / (tau kd_tau)) ||
    softmax(s_m . B / (tau kd_tau))), s_m and t_m scaled to unit length, B the (Q, C) memory bank
    (used as given, no gradient). student_embed, teacher_embed: (M, C) anchor embeddings (the
    student's after its projection to the teacher's width). Teacher and memory dtypes follow the
    teacher rule of every loss (an fp64 one needs an fp64 student)."""
    check_tensor("student_embed", student_embed, rank=2)
    check_tensor("teacher_embed", teacher_embed, rank=2)
    check_tensor("memory", memory, rank=2)
    check_same_shape("student_embed", student_embed, "teacher_embed", teacher_embed)
    if memory.shape[1] != student_embed.shape[1]:
        raise ValueError(f"memory: expected {student_embed.shape[1]} columns like student_embed "
                         f"{tuple(student_embed.shape)}, got shape {tuple(memory.shape)}")
    check_same_device(student_embed=student_embed, teacher_embed=teacher_embed, memory=memory)
    check_teacher_dtype("student_embed", student_embed, "teacher_embed", teacher_embed)
    check_teacher_dtype("student_embed", student_embed, "memory", memory)
    check_positive("tau", tau)
    check_positive("kd_tau", kd_tau)
    name = select_backend("memory_contrast_kd", backend, IMPLEMENTED, student_embed)
    if name == "reference":
        return reference.memory_contrast_kd(student_embed, teacher_embed, memory, float(tau), float(kd_tau))
    # The kernels take unit rows, normalised here in fp32 (fp64 for fp64) so the student norm's
    # gradient stays in autograd. They stay in that dtype whatever the input dtype: rounding unit
    # rows to fp16 / bf16 moves logits of scale 1 / tau by about 1e-2 (bf16), far beyond the error
    # the reference makes from the same half-precision inputs.
    a = reference.unit_rows(student_embed)
    b = reference.unit_rows(teacher_embed.detach()).to(a.dtype)
    bank = memory.detach().to(a.dtype)
    if name == "cuda":
        loss = memory_contrast_kd_cuda(a, b, bank, float(tau), float(kd_tau))[0]
    else:
        loss = memory_contrast_kd_triton(a, b, bank, float(tau), float(kd_tau))[0]
    return loss.to(student_embed.dtype)
