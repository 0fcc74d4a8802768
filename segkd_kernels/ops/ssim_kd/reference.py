"""SSIM feature distillation (SSIM-KD, docs/losses.md 5) in plain PyTorch: kornia's ssim_loss semantics.

The five local statistics (mu_x, mu_y, E[x^2], E[y^2], E[xy]) come from one depthwise separable
Gaussian filter applied to the five maps stacked along the batch axis. Always fp32 or fp64:
E[x^2] - mu^2 cancels catastrophically in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype

RANGE_EPS = 1e-12  # min-max rescaling: a map whose max - min is not above this becomes 0
MAP_EPS = 1e-12  # added to the SSIM denominator, as kornia does


def gaussian_taps(window_size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """1-d Gaussian centred on the middle tap, normalised to sum 1."""
    x = torch.arange(window_size, dtype=dtype, device=device) - (window_size - 1) / 2
    taps = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def gaussian_filter(x: torch.Tensor, taps: torch.Tensor, padding: str) -> torch.Tensor:
    """Depthwise separable Gaussian of every (b, c) map of x (B, C, H, W).

    reflect / zeros: output H x W (x padded by window // 2 on each side; reflect does not repeat
    the edge pixel, as F.pad); valid: output (H - window + 1) x (W - window + 1)."""
    b, c, h, w = x.shape
    k = taps.numel()
    x = x.reshape(b * c, 1, h, w)
    if padding != "valid":
        r = k // 2
        x = F.pad(x, (r, r, r, r), mode="reflect" if padding == "reflect" else "constant")
    x = F.conv2d(x, taps.view(1, 1, 1, k))  # along W
    x = F.conv2d(x, taps.view(1, 1, k, 1))  # along H
    return x.reshape(b, c, x.shape[2], x.shape[3])


def minmax_rescale(x: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) rescale to [0, 1]; min and max are constants in the gradient.

    A map whose range is at most RANGE_EPS (a constant map, e.g. a dead ReLU channel) becomes 0
    with a zero gradient; dividing by the clamped range instead would scale its gradient by 1e12
    (inf in fp16). A map holding a NaN has a NaN min and max (amin / amax propagate NaN), so its
    range is NaN and the whole rescaled map is NaN: the flat-map test is `not span <= eps`, never
    `span > eps`, which a NaN range would fail and so turn into a finite map of zeros. An Inf in
    a map gives an infinite range: its finite pixels rescale to 0, the Inf ones to NaN."""
    lo = x.amin(dim=(2, 3), keepdim=True).detach()
    hi = x.amax(dim=(2, 3), keepdim=True).detach()
    span = hi - lo
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(span <= RANGE_EPS, zero, (x - lo) / span.clamp_min(RANGE_EPS))


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float,
             padding: str) -> torch.Tensor:
    taps = gaussian_taps(window_size, sigma, x.dtype, x.device)
    n = x.shape[0]
    stats = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y]), taps, padding)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(n)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / (den + MAP_EPS)


def ssim_kd(student: torch.Tensor, teacher: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
            data_range: float = 1.0, padding: str = "reflect", normalize: bool = True) -> torch.Tensor:
    """mean over N*C*H'*W' of clamp((1 - SSIM map) / 2, 0, 1)."""
    dtype = compute_dtype(student)
    x = student.to(dtype)
    y = teacher.detach().to(dtype)
    if normalize:
        x, y = minmax_rescale(x), minmax_rescale(y)
    m = ssim_map(x, y, window_size, sigma, data_range, padding)
    return torch.clamp((1.0 - m) / 2.0, 0.0, 1.0).mean().to(student.dtype)
