"""Input checks shared by every public function. Each error names the argument and what was expected."""

from __future__ import annotations

import math

import torch


def check_tensor(name: str, x, *, rank: int | None = None) -> None:
    """A non-empty floating-point tensor, of the given rank if one is given."""
    # one test for the common case (every call of every public function runs this)
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (rank is None or x.dim() == rank) and x.numel():
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-d tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} like {first_name}, got {t.device}")


def check_same_dims(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, dims: tuple[int, ...]) -> None:
    """a and b agree on the given dims (e.g. N, H, W of features whose channel counts may differ)."""
    if any(a.shape[d] != b.shape[d] for d in dims):
        which = ", ".join(str(d) for d in dims)
        raise ValueError(
            f"{name_b}: expected the sizes of {name_a} in dims ({which}), "
            f"got {tuple(b.shape)} vs {tuple(a.shape)}"
        )


def check_teacher_dtype(student_name: str, student: torch.Tensor, teacher_name: str, teacher: torch.Tensor) -> None:
    """The teacher's dtype rule, the same for every loss.

    A teacher may come in any floating dtype: it is read as given and converted to the dtype the
    loss is computed in, fp32 (fp64 for an fp64 student), so an autocast teacher (fp16 / bf16)
    with an fp32 student, or an fp32 teacher with a bf16 student, loses nothing. The one lossy
    case is refused: an fp64 teacher with a student that is not fp64 would be rounded to fp32
    without a word, and fp64 math was most likely expected; cast one of them."""
    if teacher.dtype == torch.float64 and student.dtype != torch.float64:
        raise ValueError(
            f"{teacher_name}: float64 needs a float64 {student_name} (got {student.dtype}; the loss is "
            f"computed in float32 and would round the teacher): cast {teacher_name} or {student_name}"
        )


def check_bool(name: str, value) -> None:
    """A flag must be a bool: 'yes', 0 or None are refused rather than read by their truth value."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; fp32, fp16 and bf16 are computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
