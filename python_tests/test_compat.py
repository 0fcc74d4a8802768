"""segkd_kernels.compat: each adapter against a re-derivation, in plain PyTorch, of the upstream class
it replaces (CIRKD's losses/, mmrazor's ChannelWiseDivergence, AttnFD's Distiller), on the same
inputs: same values and student gradients, on every backend that can run here."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segkd_kernels as sk
from segkd_kernels.compat import attnfd, cirkd, mmrazor
from segkd_kernels.testing import assert_close

_AVAILABLE = sk.available_backends()
BACKENDS = [b for b in ("reference", "triton") if _AVAILABLE[b]]


def _t(shape, seed, scale=1.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.requires_grad_(grad)


def _check(ours, theirs, x):
    assert_close(ours, theirs)
    assert_close(torch.autograd.grad(ours, x, retain_graph=True)[0], torch.autograd.grad(theirs, x, retain_graph=True)[0])


# ---- CIRKD ------------------------------------------------------------------------------------------

def upstream_kd(pred, soft, temperature):
    c = soft.shape[1]
    p_s = F.log_softmax(pred.permute(0, 2, 3, 1).reshape(-1, c) / temperature, dim=1)
    p_t = F.softmax(soft.permute(0, 2, 3, 1).reshape(-1, c) / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [None, 4.0])
def test_criterion_kd(backend, temperature):
    s, t = _t((2, 5, 3, 7), 0, 2.0, grad=True), _t((2, 5, 3, 7), 1, 2.0)
    kw = {} if temperature is None else {"temperature": temperature}
    ours = cirkd.CriterionKD(**kw, backend=backend)(s, t)
    _check(ours, upstream_kd(s, t, temperature or 1), s)


def upstream_cwd(conv, preds_s, preds_t, norm_type, temperature):
    n, c, h, w = preds_s.shape
    if preds_s.shape[1] != preds_t.shape[1]:
        preds_s = conv(preds_s)
    if norm_type == "channel":
        norm = lambda x: x.reshape(x.shape[0], x.shape[1], -1).softmax(dim=-1)  # noqa: E731
    else:
        norm = lambda x: x.softmax(dim=1)  # noqa: E731
    norm_s = norm(preds_s / temperature).log()
    norm_t = norm(preds_t.detach() / temperature)
    loss = nn.KLDivLoss(reduction="sum")(norm_s, norm_t)
    loss = loss / (n * c) if norm_type == "channel" else loss / (n * h * w)
    return loss * temperature**2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type,c_s,c_t", [("channel", 6, 6), ("channel", 4, 6), ("spatial", 5, 5),
                                               ("spatial", 3, 5)])
def test_criterion_cwd(backend, norm_type, c_s, c_t):
    torch.manual_seed(0)
    crit = cirkd.CriterionCWD(c_s, c_t, norm_type=norm_type, divergence="kl", temperature=4.0,
                              backend=backend).double()
    s, t = _t((2, c_s, 5, 3), 2, 3.0, grad=True), _t((2, c_t, 5, 3), 3, 3.0)
    _check(crit(s, t), upstream_cwd(crit.conv, s, t, norm_type, 4.0), s)


def test_criterion_cwd_defaults_and_forms_without_a_fused_kernel():
    crit = cirkd.CriterionCWD(8, 16, norm_type="channel", divergence="kl")
    assert crit.temperature == 1.0 and tuple(crit.conv.weight.shape) == (16, 8, 1, 1)
    assert set(crit.state_dict()) == {"conv.weight"}
    with pytest.raises(ValueError, match="norm_type, divergence: \\('none', 'mse'\\) has no fused form"):
        cirkd.CriterionCWD(8, 16)


def upstream_structural(feat_s, feat_t):
    pool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
    fs, ft = F.normalize(pool(feat_s), p=2, dim=1), F.normalize(pool(feat_t), p=2, dim=1)

    def sim(x):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return torch.bmm(x.transpose(1, 2), x)

    return ((sim(fs) - sim(ft)) ** 2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_criterion_structural_kd(backend):
    s, t = _t((2, 4, 7, 6), 4, grad=True), _t((2, 9, 7, 6), 5)
    _check(cirkd.CriterionStructuralKD(backend=backend)(s, t), upstream_structural(s, t), s)


def upstream_cross_image(feat_s, feat_t, temperature):
    b, _, h, w = feat_s.shape
    if h >= 256 and w >= 256:
        pool = nn.AvgPool2d(kernel_size=(4, 4), stride=(4, 4), padding=0, ceil_mode=True)
        feat_s, feat_t = pool(feat_s), pool(feat_t)
    feat_s, feat_t = F.normalize(feat_s, p=2, dim=1), F.normalize(feat_t, p=2, dim=1)

    def sim(a, c):
        return a.reshape(a.shape[0], -1).T @ c.reshape(c.shape[0], -1)

    total = 0.0
    for i in range(b):
        for j in range(b):
            p_s = F.log_softmax(sim(feat_s[i], feat_s[j]) / temperature, dim=1)
            p_t = F.softmax(sim(feat_t[i], feat_t[j]) / temperature, dim=1)
            total = total + F.kl_div(p_s, p_t, reduction="batchmean")
    return total / (b * b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_criterion_minibatch_cross_image_pair(backend):
    s, t = _t((3, 4, 5, 7), 6, grad=True), _t((3, 6, 5, 7), 7)
    _check(cirkd.CriterionMiniBatchCrossImagePair(0.1, backend=backend)(s, t), upstream_cross_image(s, t, 0.1), s)


def test_criterion_minibatch_cross_image_pair_pools_from_256():
    # fp32 inputs (a 4096 x 4096 similarity matrix per pair in the re-derivation); the adapter pools
    # them first and runs on the reference in fp32, the re-derivation in fp32 too: rows of 4096 fp32
    # terms agree to about 1e-6 relative
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 3, 256, 257, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 256, 257, generator=g)
    ours = cirkd.CriterionMiniBatchCrossImagePair(0.1, backend="reference")(s, t)
    theirs = upstream_cross_image(s, t, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    g_ours, g_theirs = (torch.autograd.grad(x, s)[0] for x in (ours, theirs))
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-4 * g_theirs.abs().max().item())


class UpstreamMemory:
    """CIRKD's StudentSegContrast step, re-derived: the queues are plain tensors updated in place, the
    random draws come from the global generator in CIRKD's order (per image and class a permutation
    of the class's pixel count; then the pixel and the region slot permutations)."""

    def __init__(self, seg_queue, pix_queue, sizes):
        self.seg, self.pix = seg_queue.clone(), pix_queue.clone()
        self.seg_ptr = [0] * seg_queue.shape[0]
        self.pix_ptr = [0] * pix_queue.shape[0]
        self.sizes = sizes

    def step(self, s_proj, t_feats, labels, ignore, ct, kd_t):
        t_feats = F.normalize(t_feats, p=2, dim=1)
        s_feats = F.normalize(s_proj, p=2, dim=1)
        labels = F.interpolate(labels.unsqueeze(1).float(), s_feats.shape[2:], mode="nearest").squeeze(1).long()
        # enqueue
        n, c = t_feats.shape[:2]
        for b in range(n):
            feat, lab = t_feats[b].reshape(c, -1), labels[b].reshape(-1)
            for lb in [int(x) for x in torch.unique(lab) if x != ignore]:
                idxs = (lab == lb).nonzero()
                self.seg[lb, self.seg_ptr[lb]] = F.normalize(feat[:, idxs].mean(dim=1).squeeze(1), p=2, dim=0)
                self.seg_ptr[lb] = (self.seg_ptr[lb] + 1) % self.seg.shape[1]
                perm = torch.randperm(idxs.shape[0])
                k = min(idxs.shape[0], 16)
                x = feat[:, perm[:k]].T
                if self.pix_ptr[lb] + k >= self.pix.shape[1]:
                    self.pix[lb, -k:] = F.normalize(x, p=2, dim=1)
                    self.pix_ptr[lb] = 0
                else:
                    self.pix[lb, self.pix_ptr[lb]:self.pix_ptr[lb] + k] = F.normalize(x, p=2, dim=1)
                    self.pix_ptr[lb] = (self.pix_ptr[lb] + k) % self.pix.shape[1]
        valid = labels.reshape(-1) != ignore
        s_rows = s_feats.permute(0, 2, 3, 1).reshape(-1, s_feats.shape[1])[valid]
        t_rows = t_feats.permute(0, 2, 3, 1).reshape(-1, c)[valid]

        def sample(q, size):
            index = torch.randperm(q.shape[1])[:size]
            return torch.cat([q[k, index] for k in range(q.shape[0])])

        def sim_kd(bank):
            p_s = F.log_softmax(torch.mm(s_rows, bank.T) / ct / kd_t, dim=1)
            p_t = F.softmax(torch.mm(t_rows, bank.T) / ct / kd_t, dim=1)
            return F.kl_div(p_s, p_t, reduction="batchmean") * kd_t**2

        pixel_bank = sample(self.pix, self.sizes[0])
        region_bank = sample(self.seg, self.sizes[1])
        return sim_kd(pixel_bank), sim_kd(region_bank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_seg_contrast_matches_cirkd_over_steps(backend):
    k, c_s, c_t, ignore = 4, 5, 6, 255
    torch.manual_seed(0)
    # small queues (pixel 20 slots, region 3) so the pointers wrap within the three steps
    crit = cirkd.StudentSegContrast(k, 20, 3, 2, 7, 2.0, 0.1, c_s, c_t, ignore, backend=backend).double()
    upstream = UpstreamMemory(crit.teacher_segment_queue, crit.teacher_pixel_queue, (7, 2))
    for step in range(3):
        s = _t((2, c_s, 4, 5), 10 + step, grad=True)
        t = _t((2, c_t, 4, 5), 20 + step)
        g = torch.Generator().manual_seed(30 + step)
        labels = torch.randint(0, k, (2, 8, 10), generator=g)
        labels[0, :2] = ignore
        torch.manual_seed(step)
        ours = crit(s, t, labels)
        s_proj = crit.project_head(s)  # same weights; BatchNorm in training mode: same batch statistics
        torch.manual_seed(step)
        theirs = upstream.step(s_proj, t, labels, ignore, 0.1, 2.0)
        for o, th in zip(ours, theirs):
            _check(o, th, s)
        assert_close(crit.teacher_pixel_queue, upstream.pix)
        assert_close(crit.teacher_segment_queue, upstream.seg)
        assert crit.pixel_queue_ptr.tolist() == upstream.pix_ptr
        assert crit.segment_queue_ptr.tolist() == upstream.seg_ptr


def test_student_seg_contrast_state_dict_names_and_all_ignored():
    crit = cirkd.StudentSegContrast(3, 10, 4, 2, 2, 1.0, 0.1, 5, 6, 255)
    assert set(crit.state_dict()) >= {"teacher_segment_queue", "segment_queue_ptr", "teacher_pixel_queue",
                                      "pixel_queue_ptr", "project_head.0.weight", "project_head.1.weight",
                                      "project_head.3.weight"}
    s = torch.randn(2, 5, 3, 3, requires_grad=True)
    pix, reg = crit(s, torch.randn(2, 6, 3, 3), torch.full((2, 3, 3), 255))
    assert pix.item() == 0 and reg.item() == 0
    pix.backward()
    assert s.grad is not None


def test_student_seg_contrast_class_pixels_draws_from_the_class():
    """With class_pixels=True every enqueued pixel embedding is one of the class's own pixels."""
    crit = cirkd.StudentSegContrast(2, 50, 2, 2, 2, 1.0, 0.1, 3, 4, 255, class_pixels=True).double()
    t = _t((1, 4, 4, 4), 40)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 2:] = 1  # class 1: the bottom half only
    crit(_t((1, 3, 4, 4), 41), t, labels)
    unit = F.normalize(t, dim=1)[0].reshape(4, -1).T
    bottom = unit[8:]
    got = crit.teacher_pixel_queue[1, :8]
    assert torch.cdist(got, bottom).min(dim=1).values.max() < 1e-12


# ---- mmrazor ----------------------------------------------------------------------------------------

def upstream_mmrazor_cwd(preds_s, preds_t, tau, loss_weight):
    n, c, h, w = preds_s.shape
    p_t = F.softmax(preds_t.reshape(-1, h * w) / tau, dim=1)
    loss = torch.sum(p_t * F.log_softmax(preds_t.reshape(-1, h * w) / tau, dim=1)
                     - p_t * F.log_softmax(preds_s.reshape(-1, h * w) / tau, dim=1)) * tau**2
    return loss_weight * loss / (c * n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"tau": 4.0, "loss_weight": 3.0}])
def test_mmrazor_channel_wise_divergence(backend, kw):
    s, t = _t((2, 5, 4, 6), 50, 2.0, grad=True), _t((2, 5, 4, 6), 51, 2.0)
    ours = mmrazor.ChannelWiseDivergence(**kw, backend=backend)(s, t)
    _check(ours, upstream_mmrazor_cwd(s, t, kw.get("tau", 1.0), kw.get("loss_weight", 1.0)), s)


# ---- AttnFD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_attnfd_loss(backend):
    s = [_t((2, 6, 5, 4), 60, grad=True), _t((2, 3, 2, 3), 61, grad=True)]
    t = [_t((2, 6, 5, 4), 62), _t((2, 3, 2, 3), 63)]
    ours = attnfd.AttnFDLoss(backend=backend)(s, t)
    theirs = 0
    for a_s, a_t in zip(s, t):
        theirs = theirs + (a_s / torch.norm(a_s, p=2) - a_t / torch.norm(a_t, p=2)).pow(2).sum() / a_t.shape[0]
    theirs = theirs * 2
    assert_close(ours, theirs)
    for x, gx in zip(s, torch.autograd.grad(theirs, s)):
        assert_close(torch.autograd.grad(ours, x, retain_graph=True)[0], gx)


def test_attnfd_connector_draws_the_same_weights():
    def upstream(t_channel, s_channel):
        mods = [nn.Conv2d(s_channel, t_channel, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(t_channel)]
        for m in mods:
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            else:
                m.weight.data.fill_(1)
                m.bias.data.zero_()
        return nn.Sequential(*mods)

    torch.manual_seed(5)
    ours = attnfd.build_feature_connector(12, 7)
    torch.manual_seed(5)
    theirs = upstream(12, 7)
    for (name, a), (name_b, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert name == name_b
        assert torch.equal(a, b), name


# ---- StudentSegContrast under torch.distributed -----------------------------------------------------

def _gather_worker(rank, world, port, result_file):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        crit = _gather_case_module()
        t, labels = _gather_case_inputs()
        half = t.shape[0] // world
        rows = slice(rank * half, (rank + 1) * half)
        crit._dequeue_and_enqueue(t[rows], labels[rows])
        torch.save({k: v for k, v in crit.state_dict().items() if "queue" in k}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _gather_case_module():
    return cirkd.StudentSegContrast(3, 40, 4, 2, 2, 1.0, 0.1, 2, 5, 255, class_pixels=True,
                                    generator=torch.Generator().manual_seed(0))


def _gather_case_inputs():
    g = torch.Generator().manual_seed(70)
    t = F.normalize(torch.randn(4, 5, 3, 4, generator=g), dim=1)
    labels = torch.randint(0, 3, (4, 3, 4), generator=g)
    labels[1, 0] = 255
    return t, labels


def test_student_seg_contrast_gathers_every_rank_before_enqueueing(tmp_path):
    """Two gloo processes, each holding half of the batch, end with the queues of one process that
    enqueued the whole batch (as CIRKD's all_gather)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path / "q")), nprocs=2, join=True)
    single = _gather_case_module()
    single._dequeue_and_enqueue(*_gather_case_inputs())
    expected = {k: v for k, v in single.state_dict().items() if "queue" in k}
    for rank in (0, 1):
        got = torch.load(f"{tmp_path / 'q'}.{rank}")
        assert set(got) == set(expected)
        for k in expected:
            assert torch.equal(got[k], expected[k]), (rank, k)
