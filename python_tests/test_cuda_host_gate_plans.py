"""The cbam_gate backward of csrc/channel_pool.cu on the host execution layer, at each of its plans:
one pass over g and x with dM_c partials per pixel tile and dM_s partials per channel slice, the
slices chosen by the SM count (forced here through the device attribute the launcher queries),
aligned rows (4 pixels per access) and unaligned ones (element by element)."""

from __future__ import annotations

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels._backends import host_execution, host_library
from segkd_kernels.testing import assert_close, make_tensor

HOST, HOST_REASON = host_library()
pytestmark = pytest.mark.skipif(HOST is None, reason=HOST_REASON)

TILE = 128  # pixels per block (csrc/channel_pool.cu kGateTile)
WARPS = 8   # channels in flight per block (kGateWarps)


def _plan(n, c, plane, sms):
    """The launcher's plan (plan_gate), restated: (pixel tiles, channel slices)."""
    tiles = -(-plane // TILE)
    slices = max(1, min(-(-4 * 8 * sms // (tiles * n)), -(-c // WARPS)))
    per = -(-c // slices)
    return tiles, -(-c // per)


def _sum_bound(terms: torch.Tensor, dim) -> torch.Tensor:
    """fp32 products and a sum of k of them in any order: |error| <= (k + 2) eps32 sum |terms|."""
    k = 1
    for d in (dim if isinstance(dim, tuple) else (dim,)):
        k *= terms.shape[d]
    return (k + 2) * torch.finfo(torch.float32).eps * terms.abs().sum(dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(16, 32), (13, 21)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("sms", [1, 40])
def test_cbam_gate_backward_plans(dtype, hw, sms):
    n, c = 2, 37
    plane = hw[0] * hw[1]
    x = make_tensor((n, c, *hw), dtype=dtype, seed=21, requires_grad=True)
    mc = make_tensor((n, c), seed=22, requires_grad=True)
    ms = make_tensor((n, 1, *hw), seed=23, requires_grad=True)
    up = make_tensor((n, c, *hw), dtype=dtype, seed=24)
    tiles, slices = _plan(n, c, plane, sms)
    with host_execution():
        HOST.host_reset()
        HOST.host_set_attribute("multiprocessor_count", sms)
        out = sk.cbam_gate(x, mc, ms, backend="cuda")
        before = HOST.host_stats()["launches"]
        dx, dmc, dms = torch.autograd.grad(out, (x, mc, ms), up)
        launches = HOST.host_stats()["launches"] - before
        HOST.host_reset()
    # the one pass, then one combine per axis that has partials
    assert launches == 1 + (tiles > 1) + (slices > 1), (tiles, slices)
    if sms == 40:
        assert slices > 1  # the plan under test: several channel slices
    g, xv = up.double(), x.detach().double()
    mcd, msd = mc.detach().double()[..., None, None], ms.detach().double()
    assert_close(dx, (g * mcd * msd).to(dtype))
    want_mc = (g * xv * msd).sum((2, 3))
    assert ((dmc.double() - want_mc).abs() <= _sum_bound(g * xv * msd, (2, 3))).all()
    want_ms = (g * xv * mcd).sum(1, keepdim=True)
    assert ((dms.double() - want_ms).abs() <= _sum_bound(g * xv * mcd, 1).unsqueeze(1)).all()


def test_cbam_gate_backward_partials_are_deterministic():
    x = make_tensor((2, 37, 13, 21), seed=31, requires_grad=True)
    mc = make_tensor((2, 37), seed=32, requires_grad=True)
    ms = make_tensor((2, 1, 13, 21), seed=33, requires_grad=True)
    got = []
    with host_execution():
        for seed in (1, 2):
            HOST.host_reset()
            HOST.host_set_attribute("multiprocessor_count", 40)
            HOST.host_set_seed(seed)
            got.append(torch.autograd.grad(sk.cbam_gate(x, mc, ms, backend="cuda").sum(), (x, mc, ms)))
        HOST.host_reset()
    for a, b in zip(*got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_cbam_gate_strided_gate_views(gate_dtype):
    """Gates sliced out of one larger tensor (non-contiguous views, fp32 or not) are read as the
    values they show, not as their storage: forward and all three gradients as the reference."""
    n, c, h, w = 2, 5, 7, 9
    x = make_tensor((n, c, h, w), seed=41, requires_grad=True)
    both = torch.sigmoid(make_tensor((n, c + 1, h, w), seed=42)).to(gate_dtype).requires_grad_(True)
    up = make_tensor((n, c, h, w), seed=43)

    def run(backend):
        mc, ms = both[:, :c, 0, 0], both[:, c]  # (N, C) and (N, H, W), both strided
        assert not mc.is_contiguous() and not ms.is_contiguous()
        out = sk.cbam_gate(x, mc, ms, backend=backend)
        return (out, *torch.autograd.grad(out, (x, both), up))

    want = run("reference")
    with host_execution():
        got = run("cuda")
    # the kernels compute in fp32 whatever the gates' dtype (so does the reference): fp32 tolerances
    for g_, w_ in zip(got, want):
        assert g_.dtype == w_.dtype
        assert_close(g_, w_, dtype=torch.float32)
