"""The mappings of docs/conventions.md hold: each toolbox's loss, written here from its formula in
a few lines of PyTorch, equals (or has the gradient of) the segkd_kernels expression the page gives."""

import pytest
import torch
import torch.nn.functional as F

import segkd_kernels as sk

N, K, H, W = 3, 5, 6, 7


def logits(seed):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(N, K, H, W, generator=g, dtype=torch.float64)).requires_grad_(True)


def grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_torchdistiller_kd_is_pixel_kd_over_k_tau_squared(tau):
    s, t = logits(0), logits(1)
    # nn.KLDivLoss()'s default reduction: the elementwise mean over N*K*H*W, no tau^2
    theirs = F.kl_div(F.log_softmax(s / tau, dim=1), F.softmax(t / tau, dim=1), reduction="sum") / s.numel()
    ours = sk.pixel_kd(s, t, tau, backend="reference") / (K * tau**2)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad(ours, s), grad(theirs, s))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_torchdistiller_spatial_cwd_is_pixel_kd(tau):
    s, t = logits(2), logits(3)
    # softmax over the channels at each pixel, KL summed / (N*H*W), times tau^2
    theirs = F.kl_div(F.softmax(s / tau, dim=1).log(), F.softmax(t / tau, dim=1), reduction="sum") / (N * H * W) * tau**2
    torch.testing.assert_close(sk.pixel_kd(s, t, tau, backend="reference"), theirs)


def test_skd_pixel_wise_has_n_times_the_pixel_kd_gradient():
    s, t = logits(4), logits(5)
    # cross-entropy form summed over every pixel of the batch, divided by H*W only
    theirs = (-F.softmax(t, dim=1) * F.log_softmax(s, dim=1)).sum() / (H * W)
    ours = N * sk.pixel_kd(s, t, 1.0, backend="reference")
    torch.testing.assert_close(grad(ours, s), grad(theirs, s))
    p_t = F.softmax(t, dim=1)
    entropy = -(p_t * F.log_softmax(t, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(theirs - ours, N * entropy)


def test_skd_pair_wise_after_pool_is_pairwise_with_detached_norm():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 8, 12, 10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 16, 12, 10, generator=g, dtype=torch.float64)
    scale = 0.5
    kh, kw = int(12 * scale), int(10 * scale)

    def sim(x):  # norm detached, plus 1e-8, as the SKD code
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8).detach()
        x = x.flatten(2)
        return x.transpose(1, 2) @ x

    ps, pt = (F.max_pool2d(x, (kh, kw), (kh, kw), ceil_mode=True) for x in (s, t))
    p = ps.shape[2] * ps.shape[3]
    theirs = ((sim(pt) - sim(ps)) ** 2).sum() / p**2 / 2
    ours = sk.pairwise_kd(ps, pt, detach_norm=True, backend="reference")
    # the 1e-8 on the norm moves the result by about 1e-8 relative for unit-scale features
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # ... and each gradient entry by about 1e-8 of the gradient's scale (small entries are sums
    # that cancel, so the bound is absolute at the scale of the largest)
    g_ours, g_theirs = grad(ours, s), grad(theirs, s)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-6 * g_theirs.abs().max().item())


def test_mmrazor_cwd_with_weight_and_tau_one():
    s, t = logits(7), logits(8)
    tau, weight = 1.0, 5.0
    p_t = F.softmax(t.flatten(2) / tau, dim=2)
    theirs = weight * (p_t * F.log_softmax(t.flatten(2) / tau, dim=2)
                       - p_t * F.log_softmax(s.flatten(2) / tau, dim=2)).sum() * tau**2 / (N * K)
    torch.testing.assert_close(weight * sk.channel_wise_kd(s, t, tau, backend="reference"), theirs)


def test_ssim_loss_is_half_of_one_minus_mean_ssim_with_valid_padding():
    """pytorch-msssim's form: valid padding, no rescaling, mean of the SSIM map."""
    g = torch.Generator().manual_seed(9)
    x = torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    coords = torch.arange(11, dtype=torch.float64) - 5
    taps = torch.exp(-coords**2 / (2 * 1.5**2))
    taps = taps / taps.sum()
    win = (taps[:, None] * taps[None, :]).expand(3, 1, 11, 11)

    def filt(z):
        return F.conv2d(z, win, groups=3)

    mu_x, mu_y = filt(x), filt(y)
    var_x, var_y, cov = filt(x * x) - mu_x**2, filt(y * y) - mu_y**2, filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))).mean()
    ours = sk.ssim_kd(x, y, padding="valid", normalize=False, backend="reference")
    torch.testing.assert_close(1 - 2 * ours, ssim)


@pytest.mark.filterwarnings("ignore:reduction")  # torch's note on the 'mean' default: that default is the point
def test_torchdistiller_kd_module_form_has_no_tau_squared():
    """The same convention through nn.KLDivLoss() itself (its default reduction is the mean over every
    element): the loss is pixel KD divided by K * tau^2, so it shrinks as tau grows where pixel KD
    does not."""
    s, t = logits(10), logits(11)
    for tau in (1.0, 2.0, 4.0):
        theirs = torch.nn.KLDivLoss()(F.log_softmax(s / tau, dim=1), F.softmax(t / tau, dim=1))
        torch.testing.assert_close(theirs, sk.pixel_kd(s, t, tau, backend="reference") / (K * tau**2))


def test_skd_pixel_wise_grows_with_the_batch_where_pixel_kd_does_not():
    """Stacking the same batch twice doubles SKD's pixel-wise value (it divides by H*W, not by N*H*W);
    pixel KD, a mean over pixels, is unchanged."""
    s, t = logits(12), logits(13)

    def skd(s, t):
        return (-F.softmax(t, dim=1) * F.log_softmax(s, dim=1)).sum() / (s.shape[2] * s.shape[3])

    s2, t2 = torch.cat([s, s]), torch.cat([t, t])
    torch.testing.assert_close(skd(s2, t2), 2 * skd(s, t))
    torch.testing.assert_close(sk.pixel_kd(s2, t2, 1.0, backend="reference"), sk.pixel_kd(s, t, 1.0, backend="reference"))


def _cirkd_cross_image(fs, ft, tau):
    """CIRKD's mini-batch cross-image loss as its current code computes it, pooling rule included:
    4x4 average pooling (ceil mode) when H and W are both at least 256, then per ordered image pair a
    batchmean KL between the row softmaxes of the P x P similarity matrices, averaged over pairs."""
    n, _, h, w = fs.shape
    if h >= 256 and w >= 256:
        fs, ft = (F.avg_pool2d(x, 4, 4, ceil_mode=True) for x in (fs, ft))
    fs, ft = F.normalize(fs, dim=1).flatten(2), F.normalize(ft, dim=1).flatten(2)
    total = 0.0
    for i in range(n):
        for j in range(n):
            log_ps = F.log_softmax(fs[i].T @ fs[j] / tau, dim=1)
            p_t = F.softmax(ft[i].T @ ft[j] / tau, dim=1)
            total = total + F.kl_div(log_ps, p_t, reduction="batchmean")
    return total / (n * n)


@pytest.mark.parametrize("hw", [(256, 256), (260, 257)])
def test_cirkd_cross_image_pools_4x4_from_256(hw):
    g = torch.Generator().manual_seed(14)
    s = torch.randn(2, 3, *hw, generator=g)
    t = torch.randn(2, 4, *hw, generator=g)
    pooled = [F.avg_pool2d(x.double(), 4, 4, ceil_mode=True) for x in (s, t)]
    theirs = _cirkd_cross_image(s, t, 0.1).double()
    # fp32 rows of P = 4096 terms against the fp64 reference form: rounding near 1e-7 relative
    torch.testing.assert_close(sk.cross_image_kd(*pooled, 0.1, backend="reference"), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hw", [(255, 8), (8, 300)])
def test_cirkd_cross_image_does_not_pool_when_one_side_is_below_256(hw):
    g = torch.Generator().manual_seed(15)
    s = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, *hw, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sk.cross_image_kd(s, t, 0.1, backend="reference"), _cirkd_cross_image(s, t, 0.1))
