"""The losses written the way public toolboxes write them: the `eager` baseline of the benchmarks.

These are what users run today (CIRKD, mmrazor / TorchDistiller, AttnFD and CBAM code), kept
faithful to those codes' shape of computation (permute copies, P x P matrices, per-pair loops,
materialised gated maps), with the normalisations of docs/losses.md so that every provider computes
the same number. They are baselines, not oracles: the tests compare backends with
`ops/<op>/reference.py`, never with these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_wise_kd(s, t, tau=4.0):
    """mmrazor / CIRKD ChannelWiseDivergence."""
    n, c, h, w = s.shape
    p_t = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    log_p_t = F.log_softmax(t.reshape(-1, h * w) / tau, dim=1)
    log_p_s = F.log_softmax(s.reshape(-1, h * w) / tau, dim=1)
    return torch.sum(p_t * log_p_t - p_t * log_p_s) * tau**2 / (n * c)


def _pixel_rows(s, t, tau):
    """(log softmax(s / tau), softmax(t / tau)) over (N*H*W, K) rows, permuted as the toolboxes do."""
    k = s.shape[1]
    s_rows = s.permute(0, 2, 3, 1).contiguous().view(-1, k)
    t_rows = t.permute(0, 2, 3, 1).contiguous().view(-1, k)
    return F.log_softmax(s_rows / tau, dim=1), F.softmax(t_rows / tau, dim=1)


def pixel_kd(s, t, tau=1.0):
    """CIRKD CriterionKD: permute to (N*H*W, K) rows, batchmean KL, times tau^2."""
    log_p_s, p_t = _pixel_rows(s, t, tau)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * tau**2


def pfs_pixel_kd(s, t, tau=1.0):
    """Gap-weighted pixel KD as a research repo writes it: per-pixel KL twice, weights from the first."""
    log_p_s, p_t = _pixel_rows(s, t, tau)
    kl = F.kl_div(log_p_s, p_t, reduction="none").sum(1)
    gap = kl.detach()
    weight = gap / gap.mean().clamp_min(1e-12)
    return (weight * kl).mean() * tau**2


def _pair_wise_sim_map(feat):
    n, c, h, w = feat.shape
    feat = feat.reshape(n, c, -1)
    return torch.bmm(feat.transpose(1, 2), feat)


def pairwise_kd(s, t):
    """CIRKD CriterionStructuralKD at full resolution (no pooling): P x P similarity maps."""
    s = F.normalize(s, p=2, dim=1)
    t = F.normalize(t, p=2, dim=1)
    return ((_pair_wise_sim_map(s) - _pair_wise_sim_map(t.detach())) ** 2).mean()


def cross_image_kd(s, t, tau=0.1):
    """CIRKD's mini-batch pixel-to-pixel loop: one P x P similarity per ordered image pair."""
    n, _, h, w = s.shape
    a = F.normalize(s, p=2, dim=1).flatten(2)        # (N, C_s, P)
    b = F.normalize(t, p=2, dim=1).flatten(2).detach()
    loss = s.new_zeros(())
    for i in range(n):
        for j in range(n):
            sim_s = a[i].t() @ a[j] / tau
            sim_t = b[i].t() @ b[j] / tau
            loss = loss + F.kl_div(F.log_softmax(sim_s, dim=1), F.softmax(sim_t, dim=1), reduction="batchmean")
    return loss / n**2


def _gaussian_window(window_size, sigma, device, dtype):
    x = torch.arange(window_size, device=device, dtype=dtype) - (window_size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_kd(s, t, window_size=11, sigma=1.5, data_range=1.0):
    """kornia-style ssim_loss on min-max normalised features: five depthwise 2-D convolutions."""
    def minmax(x):
        lo = x.amin(dim=(2, 3), keepdim=True).detach()
        hi = x.amax(dim=(2, 3), keepdim=True).detach()
        return (x - lo) / (hi - lo).clamp_min(1e-12)

    x, y = minmax(s), minmax(t.detach())
    c = x.shape[1]
    g = _gaussian_window(window_size, sigma, x.device, x.dtype)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window_size, window_size)
    pad = window_size // 2

    def filt(z):
        return F.conv2d(F.pad(z, [pad] * 4, mode="reflect"), kernel, groups=c)

    return ssim_dissimilarity(filt, x, y, data_range)


def ssim_dissimilarity(filt, x, y, data_range):
    """mean of clamp((1 - SSIM) / 2, 0, 1) with local statistics from the window filter filt."""
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2) + 1e-12)
    return torch.clamp((1 - ssim_map) / 2, 0, 1).mean()


def attnfd_loss(s, t):
    """AttnFD code: Frobenius-normalise the whole refined maps, squared difference, / N."""
    n = s.shape[0]
    return ((s / s.norm() - t.detach() / t.detach().norm()) ** 2).sum() / n


def spatial_pool(x):
    """CBAM channel-gate pooling as CBAM code writes it."""
    n, c = x.shape[:2]
    return F.adaptive_avg_pool2d(x, 1).view(n, c), F.adaptive_max_pool2d(x, 1).view(n, c)


def channel_pool(x, gate):
    """CBAM spatial-gate pooling: materialise the gated map, then max and mean over channels."""
    gated = x * gate[:, :, None, None]
    return torch.cat([gated.max(dim=1, keepdim=True)[0], gated.mean(dim=1, keepdim=True)], dim=1)


def cbam_gate(x, channel_gate, spatial_gate):
    """CBAM code: F' = M_c * F materialised, then M_s * F'."""
    refined = x * channel_gate[:, :, None, None]
    return spatial_gate * refined
