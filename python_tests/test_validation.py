"""Input rules shared by the losses: one-line ValueErrors naming the argument for non-negative
pixel weights, pool sizes that fit the map, bool flags, and the teacher's dtype."""

from __future__ import annotations

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels.ops.pixel_kd import api as pixel_api
from segkd_kernels.testing import make_tensor


def _raises(fn, name: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert message.startswith(f"{name}:") and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# pixel_kd weights
# ----------------------------------------------------------------------------------------------

def _logits(shape=(2, 4, 3, 5)):
    return make_tensor(shape, seed=1), make_tensor(shape, seed=2)


def test_pixel_kd_refuses_negative_weight():
    s, t = _logits()
    w = make_tensor((2, 3, 5), seed=3).abs()
    assert sk.pixel_kd(s, t, weight=w) >= 0
    w[1, 2, 3] = -0.5
    _raises(lambda: sk.pixel_kd(s, t, weight=w), "weight")
    _raises(lambda: sk.pixel_kd(s, t, weight=w, backend="reference"), "weight")
    # zero weights are fine: the loss is 0, not an error
    assert sk.pixel_kd(s, t, weight=torch.zeros_like(w)) == 0
    # ignored pixels may hold anything, a negative weight too
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[1, 2, 3] = True
    assert sk.pixel_kd(s, t, weight=w, ignore_mask=mask) >= 0
    unchecked = pixel_api._nonnegative_weight(w, mask, host_check=False)
    assert torch.equal(unchecked, w)
    assert torch.isfinite(pixel_api.reference.pixel_kd(s, t, 1.0, unchecked, mask))


def test_pixel_kd_negative_weight_without_host_check_gives_nan():
    """Where reading the weights on the host would wait for the device (CUDA tensors) or cannot
    happen (a compiled graph), a negative weight turns the loss into NaN instead of a negative value."""
    s, t = _logits()
    w = make_tensor((2, 3, 5), seed=3).abs()
    same = pixel_api._nonnegative_weight(w, host_check=False)
    assert torch.equal(same, w)
    w[0, 1, 1] = -1.0
    poisoned = pixel_api._nonnegative_weight(w, host_check=False)
    assert torch.isnan(poisoned[0, 1, 1]) and torch.isfinite(poisoned).sum() == w.numel() - 1
    assert torch.isnan(sk.pixel_kd(s, t, weight=poisoned, backend="reference"))


def test_pixel_kd_negative_weight_under_compile_gives_nan():
    s, t = _logits()
    w = make_tensor((2, 3, 5), seed=3).abs()
    fn = torch.compile(lambda a, b, c: sk.pixel_kd(a, b, weight=c, backend="reference"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(s, t, w), sk.pixel_kd(s, t, weight=w, backend="reference"))
    w[1, 0, 0] = -2.0
    assert torch.isnan(fn(s, t, w))


# ----------------------------------------------------------------------------------------------
# pairwise_kd pool
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", [100, 9])
def test_pairwise_pool_larger_than_the_map(pool):
    s, t = make_tensor((2, 3, 8, 8), seed=1), make_tensor((2, 5, 8, 8), seed=2)
    assert "8x8" in _raises(lambda: sk.pairwise_kd(s, t, pool=pool), "pool")


def test_pairwise_pool_leaving_one_pixel():
    s, t = make_tensor((2, 3, 8, 8), seed=1), make_tensor((2, 5, 8, 8), seed=2)
    _raises(lambda: sk.pairwise_kd(s, t, pool=8), "pool")
    # 7 leaves 2 x 2 pixels (ceil mode): a real loss
    assert sk.pairwise_kd(s, t, pool=7) > 0
    one = make_tensor((2, 3, 1, 1), seed=1)
    assert sk.pairwise_kd(one, one.clone()) == 0  # unpooled 1x1: accepted, exactly 0
    assert sk.pairwise_kd(make_tensor((2, 3, 1, 2), seed=1), make_tensor((2, 3, 1, 2), seed=2)) > 0


def test_pairwise_pool_fits_a_wide_map():
    s, t = make_tensor((1, 3, 2, 16), seed=1), make_tensor((1, 3, 2, 16), seed=2)
    assert sk.pairwise_kd(s, t, pool=2) > 0  # 1 x 8 pooled pixels
    _raises(lambda: sk.pairwise_kd(s, t, pool=3), "pool")  # taller than the map


# ----------------------------------------------------------------------------------------------
# bool flags
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", 1, 0, None, "False"])
def test_flags_must_be_bool(value):
    s, t = make_tensor((1, 2, 8, 8), seed=1), make_tensor((1, 2, 8, 8), seed=2)
    _raises(lambda: sk.ssim_kd(s, t, window_size=3, normalize=value), "normalize")
    _raises(lambda: sk.pairwise_kd(s, t, detach_norm=value), "detach_norm")


# ----------------------------------------------------------------------------------------------
# teacher dtype: any floating dtype the computation keeps; an fp64 teacher needs an fp64 student
# ----------------------------------------------------------------------------------------------

SHAPE = (2, 3, 8, 8)

LOSSES = {
    "channel_wise_kd": (lambda s, t, **kw: sk.channel_wise_kd(s, t, **kw), "teacher"),
    "pixel_kd": (lambda s, t, **kw: sk.pixel_kd(s, t, **kw), "teacher_logits"),
    "knowledge_gap": (lambda s, t, **kw: sk.knowledge_gap(s, t), "teacher_logits"),
    "pfs_pixel_kd": (lambda s, t, **kw: sk.pfs_pixel_kd(s, t, **kw), "teacher_logits"),
    "pairwise_kd": (lambda s, t, **kw: sk.pairwise_kd(s, t, **kw), "teacher_feat"),
    "cross_image_kd": (lambda s, t, **kw: sk.cross_image_kd(s, t, **kw), "teacher_feat"),
    "ssim_kd": (lambda s, t, **kw: sk.ssim_kd(s, t, window_size=5, **kw), "teacher_feat"),
    "attnfd_loss": (lambda s, t, **kw: sk.attnfd_loss(s, t, **kw), "teacher_refined"),
}


@pytest.mark.parametrize("op", sorted(LOSSES))
def test_fp64_teacher_needs_fp64_student(op):
    fn, teacher_name = LOSSES[op]
    s = make_tensor(SHAPE, seed=1)
    t = make_tensor(SHAPE, seed=2, dtype=torch.float64)
    for student in (s, s.half(), s.bfloat16()):
        message = _raises(lambda: fn(student, t), teacher_name)
        assert "float64" in message
    fn(s.double(), t)  # fp64 with fp64: fine


@pytest.mark.parametrize("op", sorted(LOSSES))
def test_lower_precision_teacher_is_read_exactly(op):
    """A bf16 (autocast) teacher with an fp32 student is the same as that teacher given in fp32;
    an fp32 teacher with a bf16 student is accepted too (computed in fp32, the result in bf16)."""
    fn, _ = LOSSES[op]
    s = make_tensor(SHAPE, seed=1)
    t16 = make_tensor(SHAPE, seed=2).bfloat16()
    kw = {} if op == "knowledge_gap" else {"backend": "reference"}
    torch.testing.assert_close(fn(s, t16, **kw), fn(s, t16.float(), **kw), rtol=0, atol=0)
    out = fn(s.bfloat16(), t16.float(), **kw)
    assert out.dtype == torch.bfloat16
