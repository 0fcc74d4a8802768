"""torch.nn modules over the functional losses: they hold hyper-parameters and learned adapters.

Every loss module is differentiable in the student only and takes `backend` like the functions.
"""

from __future__ import annotations

import torch
from torch import nn

from ._backends import BACKENDS
from ._validation import check_bool, check_choice, check_positive
from .ops.attnfd_loss import attnfd_loss
from .ops.cbam_gate import cbam_gate
from .ops.channel_pool import channel_pool
from .ops.channel_wise_kd import channel_wise_kd
from .ops.cross_image_kd import cross_image_kd
from .ops.pairwise_kd import pairwise_kd
from .ops.pairwise_kd.api import check_pool, check_precision
from .ops.pixel_kd import pfs_pixel_kd, pixel_kd
from .ops.spatial_pool import spatial_pool
from .ops.ssim_kd import ssim_kd
from .ops.ssim_kd.api import check_options as check_ssim_options

__all__ = ["ChannelWiseKD", "PixelKD", "PFSPixelKD", "PairwiseKD", "CrossImageKD", "SSIMKD", "CBAM", "AttnFD"]


def _checked_backend(backend: str) -> str:
    """Modules check their backend name when built; whether it can run is decided per call."""
    check_choice("backend", backend, ("auto", *BACKENDS))
    return backend


def _check_positive_int(name: str, value, *, odd: bool = False) -> None:
    """Sizes must be ints (not bool, not float: 8.0 channels would fail later inside nn.Linear)."""
    kind = "an odd positive int" if odd else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
        raise ValueError(f"{name}: expected {kind}, got {value!r}")


class ChannelWiseKD(nn.Module):
    """Channel-wise distillation (docs/losses.md 1)."""

    def __init__(self, tau: float = 4.0, *, backend: str = "auto"):
        super().__init__()
        check_positive("tau", tau)
        self.tau, self.backend = tau, _checked_backend(backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return channel_wise_kd(student, teacher, self.tau, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class PixelKD(nn.Module):
    """Pixel-wise KD over the class axis (docs/losses.md 2)."""

    def __init__(self, tau: float = 1.0, *, backend: str = "auto"):
        super().__init__()
        check_positive("tau", tau)
        self.tau, self.backend = tau, _checked_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                weight: torch.Tensor | None = None, ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
        return pixel_kd(student_logits, teacher_logits, self.tau, weight=weight, ignore_mask=ignore_mask,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class PFSPixelKD(nn.Module):
    """Knowledge-gap weighted pixel KD (docs/losses.md 2b)."""

    def __init__(self, tau: float = 1.0, *, backend: str = "auto"):
        super().__init__()
        check_positive("tau", tau)
        self.tau, self.backend = tau, _checked_backend(backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
        return pfs_pixel_kd(student_logits, teacher_logits, self.tau, ignore_mask=ignore_mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class PairwiseKD(nn.Module):
    """Pairwise pixel-similarity distillation (docs/losses.md 3)."""

    def __init__(self, pool: int | None = None, detach_norm: bool = False, *, precision: str = "exact",
                 backend: str = "auto"):
        super().__init__()
        check_pool(pool)
        check_bool("detach_norm", detach_norm)
        check_precision(precision)
        self.pool, self.detach_norm, self.precision = pool, detach_norm, precision
        self.backend = _checked_backend(backend)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return pairwise_kd(student_feat, teacher_feat, pool=self.pool, detach_norm=self.detach_norm,
                           precision=self.precision, backend=self.backend)

    def extra_repr(self) -> str:
        return f"pool={self.pool}, detach_norm={self.detach_norm}, precision={self.precision!r}"


class CrossImageKD(nn.Module):
    """Cross-image pixel-to-pixel distillation (docs/losses.md 4)."""

    def __init__(self, tau: float = 0.1, *, backend: str = "auto"):
        super().__init__()
        check_positive("tau", tau)
        self.tau, self.backend = tau, _checked_backend(backend)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return cross_image_kd(student_feat, teacher_feat, self.tau, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class SSIMKD(nn.Module):
    """SSIM feature distillation (docs/losses.md 5)."""

    def __init__(self, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
                 padding: str = "reflect", normalize: bool = True, *, backend: str = "auto"):
        super().__init__()
        check_ssim_options(window_size, sigma, data_range, padding)
        check_bool("normalize", normalize)
        self.window_size, self.sigma, self.data_range = window_size, sigma, data_range
        self.padding, self.normalize, self.backend = padding, normalize, _checked_backend(backend)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return ssim_kd(student_feat, teacher_feat, window_size=self.window_size, sigma=self.sigma,
                       data_range=self.data_range, padding=self.padding, normalize=self.normalize,
                       backend=self.backend)

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, sigma={self.sigma}, data_range={self.data_range}, "
                f"padding={self.padding!r}, normalize={self.normalize}")


class CBAM(nn.Module):
    """Convolutional block attention (docs/losses.md 6): CBAM(F) = M_s * (M_c * F).

    M_c = sigmoid(MLP(avgpool F) + MLP(maxpool F)), shared MLP C -> C // r -> C;
    M_s = sigmoid(BN(conv_k([max_C, mean_C] of M_c * F))), 2 -> 1 channels, no bias.
    The hidden width is max(1, C // r): for C < r (tiny models) C // r would be 0, a layer with no
    units whose gate ignores the input, so one unit is kept. The BatchNorm has momentum 0.01 (eps
    1e-5) as in the CBAM of AttnFD's official code (PyTorch's default is 0.1); its running
    statistics therefore move ten times slower, which matters for eval-mode outputs of short runs.
    The poolings and the final product run on the fused ops (sk.spatial_pool, sk.channel_pool,
    sk.cbam_gate) with the module's backend, so M_c * F is never materialised.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, *, backend: str = "auto"):
        super().__init__()
        _check_positive_int("channels", channels)
        _check_positive_int("reduction", reduction)
        _check_positive_int("kernel_size", kernel_size, odd=True)
        hidden = max(1, channels // reduction)
        self.channels, self.reduction, self.kernel_size = channels, reduction, kernel_size
        self.backend = _checked_backend(backend)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """M_c, shape (N, C)."""
        avg, mx = spatial_pool(x, backend=self.backend)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def spatial_gate(self, x: torch.Tensor, m_c: torch.Tensor) -> torch.Tensor:
        """M_s, shape (N, 1, H, W), from x and the channel gate."""
        return torch.sigmoid(self.bn(self.conv(channel_pool(x, m_c, backend=self.backend))))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, kernel_size={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected (N, {self.channels}, H, W), got {tuple(x.shape)}")
        m_c = self.channel_gate(x)
        m_s = self.spatial_gate(x, m_c)
        return cbam_gate(x, m_c, m_s, backend=self.backend)


class AttnFD(nn.Module):
    """AttnFD at one distillation point (docs/losses.md 6): CBAM_s + connector + CBAM_t + loss.

    A_t = CBAM_t(F_t) (not trained: its parameters are frozen and no gradient reaches it),
    A_s = Connector(CBAM_s(F_s)), Connector = 1x1 conv C_s -> C_t (no bias) + BN.
    Returns attnfd_loss(A_s, A_t); the method's lambda (2) is the caller's weight.
    """

    def __init__(self, student_channels: int, teacher_channels: int, reduction: int = 16,
                 kernel_size: int = 7, *, backend: str = "auto"):
        super().__init__()
        _check_positive_int("student_channels", student_channels)
        _check_positive_int("teacher_channels", teacher_channels)
        self.backend = _checked_backend(backend)
        self.student_cbam = CBAM(student_channels, reduction, kernel_size, backend=backend)
        self.teacher_cbam = CBAM(teacher_channels, reduction, kernel_size, backend=backend)
        self.teacher_cbam.requires_grad_(False)
        self.connector = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_channels),
        )

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_refined = self.teacher_cbam(teacher_feat.detach())
        student_refined = self.connector(self.student_cbam(student_feat))
        return attnfd_loss(student_refined, teacher_refined, backend=self.backend)
