"""Pairwise similarity distillation (SKD pair-wise, PFS; docs/losses.md 3) in plain PyTorch.

Uses the exact Gram identity, so no P x P matrix is ever built (A: P x C_s, B: P x C_t per image):
    sum_{i,j} (a_i.a_j - b_i.b_j)^2 = ||A^T A||_F^2 - 2 ||A^T B||_F^2 + ||B^T B||_F^2
Cost O(P * C^2) and memory O(P * C). The three terms nearly cancel when student ~ teacher, so the
Gram matrices and their combination are computed in fp64.

precision (docs/losses.md 3) says how the Gram entries are rounded; the modes differ in nothing else:
  "exact"  unit features in fp64, Gram entries accumulated in fp64 (every backend, the default)
  "fast"   unit features rounded to fp32, Gram entries summed in fp32 over chunks of FAST_CHUNK
           pixels (each chunk sum one fp32 dot product of length <= FAST_CHUNK), the chunk sums
           added in fp64. The kernels' fp32 tensor-core path (3xTF32 products) stays within the same
           error bound. fp64 inputs compute in fp64 in both modes.
The combination of the three Frobenius norms is fp64 in both modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype

NORM_EPS = 1e-12  # as F.normalize: a_i = s_i / max(||s_i||, eps)
PRECISIONS = ("exact", "fast")
FAST_CHUNK = 64  # pixels per fp32 partial sum of precision="fast"


def normalize_pixels(x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """Per-pixel L2 normalisation over the channel axis; the norm is a constant if detach_norm."""
    norm = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    if detach_norm:
        norm = norm.detach()
    return x / norm


def pool_features(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    """pool x pool max-pooling with ceil mode (CIRKD's CriterionStructuralKD uses pool=2)."""
    if pool is None or pool == 1:
        return x
    return F.max_pool2d(x, kernel_size=pool, stride=pool, ceil_mode=True)


def _gram_fast(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x y^T per image ((N, C_x, P) x (N, C_y, P), fp64 values) as precision="fast" rounds it: fp32
    operands, an fp32 sum per chunk of FAST_CHUNK pixels, chunk sums added in fp64. Chunks go through
    in groups, so the extra memory stays O(C_x C_y) per chunk of a group, not per pixel."""
    n, cx, p = x.shape
    pad = -p % FAST_CHUNK
    xf = F.pad(x.float(), (0, pad)).unflatten(2, (-1, FAST_CHUNK)).transpose(1, 2)  # (N, chunks, C_x, K)
    yf = F.pad(y.float(), (0, pad)).unflatten(2, (-1, FAST_CHUNK)).transpose(1, 2)
    g = x.new_zeros(n, cx, y.shape[1], dtype=torch.float64)
    group = 64
    for c0 in range(0, xf.shape[1], group):
        chunk_sums = xf[:, c0:c0 + group] @ yf[:, c0:c0 + group].transpose(-1, -2)  # fp32, length FAST_CHUNK
        g = g + chunk_sums.double().sum(1)
    return g


def pairwise_kd(student: torch.Tensor, teacher: torch.Tensor, pool: int | None = None,
                detach_norm: bool = False, precision: str = "exact") -> torch.Tensor:
    """1 / (N * P^2) * sum_n sum_{i,j} (a_i.a_j - b_i.b_j)^2 over normalised pixel features."""
    dtype = compute_dtype(student)
    s = pool_features(student.to(dtype), pool)
    t = pool_features(teacher.detach().to(dtype), pool)
    n, p = s.shape[0], s.shape[2] * s.shape[3]
    # unit features in fp64 as well: fp32 ones would carry a relative rounding per entry that the
    # cancelling combination magnifies like an fp32 Gram
    a = normalize_pixels(s.double(), detach_norm).flatten(2)  # (N, C_s, P) = A^T per image
    b = normalize_pixels(t.double(), detach_norm).flatten(2)  # (N, C_t, P)
    if precision == "fast" and dtype != torch.float64:
        aa, ab, bb = _gram_fast(a, a), _gram_fast(a, b), _gram_fast(b, b)
    else:
        aa = a @ a.transpose(1, 2)  # A^T A: (N, C_s, C_s)
        ab = a @ b.transpose(1, 2)  # A^T B: (N, C_s, C_t)
        bb = b @ b.transpose(1, 2)  # B^T B: (N, C_t, C_t)
    total = aa.square().sum() - 2.0 * ab.square().sum() + bb.square().sum()
    return (total / (n * p * p)).to(student.dtype)


# ---- helpers of the kernels' tiled Gram layout (tiles of Z = [A | B], student channels padded to
# whole tiles; the upper tiles (i <= j) in row-major order): shared by the triton and cuda backends

_WEIGHTS: dict = {}


def combine_upper_tiles(g: torch.Tensor, ta: int, tb: int) -> torch.Tensor:
    """||G_aa||^2 - 2 ||G_ab||^2 + ||G_bb||^2 summed over the images, fp64, from the upper tiles
    g (N, n_up, TILE, TILE): an off-diagonal tile of G_aa or G_bb stands for its mirror image too."""
    key = (ta, tb, str(g.device))
    if key not in _WEIGHTS:  # built by device ops, not from a Python list: no host-to-device copy
        i, j = torch.triu_indices(ta + tb, ta + tb, device=g.device)
        same = torch.where(i == j, 1.0, 2.0).to(torch.float64)
        _WEIGHTS[key] = torch.where((i < ta) != (j < ta), -2.0, same)
    # torch's sums are pairwise, in fp64: the near-cancelling combination keeps its accuracy
    return (g.square().sum((-2, -1)) * _WEIGHTS[key]).sum()


def upper_tiles_to_blocks(g: torch.Tensor, ta: int, tb: int, cs: int, ct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_aa (N, C_s, C_s), G_ab (N, C_s, C_t)) from the upper tiles g (N, n_up, TILE, TILE)."""
    n, _, tile, _ = g.shape
    t = ta + tb
    iu = torch.triu_indices(t, t, device=g.device)
    full = g.new_zeros(n, t, t, tile, tile)
    full[:, iu[1], iu[0]] = g.transpose(-1, -2)  # mirror images below the diagonal
    full[:, iu[0], iu[1]] = g
    full = full.transpose(2, 3).reshape(n, t * tile, t * tile)
    return full[:, :cs, :cs].clone(), full[:, :cs, ta * tile:ta * tile + ct].clone()  # no aliasing outputs
