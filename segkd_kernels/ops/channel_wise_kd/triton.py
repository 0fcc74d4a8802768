"""channel_wise_kd in Triton (docs/losses.md 1): softmax over the P = H*W positions of every (n, c) row.

Per row, KL = sum p_t (t - s)/tau - lse_t + lse_s, with the log-sum-exps kept by parts (max, then
log of the sum of exp(x - max)): with logits of 1e4, max + log(sum) rounded to fp32 would lose the
log(sum) to 1e-3 and every probability with it.

- Row fits in one block (P <= _MAX_TILE): one program per row holds it in registers and writes the
  row's statistics and its KL times tau^2 / (N*C) (the loss is one sum), and, when the student
  needs a gradient, ds as well (Liger-style): s and t are read once, ds written once; the backward
  only scales ds by grad_output.
- Longer rows, student gradient needed: one persistent launch (_cwd_stream_kernel) over work
  items (row, chunk): statistics items reduce a chunk to (max, sum-exp) pairs, the last one of a
  row combines them, gradient items then recompute the chunk's softmaxes and write ds and the
  chunk's part of the KL. Rows go in groups sized to a quarter of the L2 and a group's gradient
  items follow its statistics items one group later, so s and t come from DRAM once and their
  second read is an L2 hit: 3 tensor passes, the inherent floor (docs/performance.md). The
  backward only scales ds by grad_output.
- Longer rows, no gradient (or the fallback when the op is called without one and a gradient is
  asked for later): one program per (row, split), several splits per row so that there are enough
  programs for the GPU even when N*C is small (8 x 19 rows of 10^6 positions). A split streams its
  part in blocks with online max / sum-exp of s/tau and t/tau and a rescaled accumulator of
  exp(t/tau - m_t) (t - s)/tau, and saves five numbers; one small program combines the splits
  (rows x splits numbers) into the row statistics and the loss. The backward recomputes the
  softmaxes from the saved row statistics, one program per (row, block), and writes ds scaled by
  grad_output.

Accumulation is fp32 (fp64 for fp64 inputs). Inputs are read through their strides when the H, W
axes flatten to one (contiguous NCHW: stride 1; channels_last: stride C), so neither layout is copied.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._saved_grad import scale_saved_grad
from .._triton_common import (FP_FUSION, acc_dtype, acc_torch_dtype, cdiv, device_sms_l2, flat_pixel_strides,
                              fp32_split, next_power_of_2)

# Start of the streaming running maxima: the lowest finite fp32, so that every finite element is
# >= it (exp(x - max) = 1 at the max: a split with any element above -inf has a sum >= 1) and a
# block of -inf never makes the rescale exp(-inf - -inf) = NaN. (fp64 logits below it, far outside any
# logit range, would count as -inf.)
_NEG = -3.4028234663852886e38

# Largest row held in registers by one program (fp32: 16 warps x 32 lanes x 16 values per tensor).
_MAX_TILE = 8192
# Block of the streaming (long-row) kernels, and how many programs the forward aims for.
_BLOCK = 2048
_TARGET_PROGRAMS = 1024
# The persistent long-row kernel: 8 warps per program, _BLOCK positions per step (8 fp32 per lane),
# 16 KiB of s and t per work item (1 step fp32, 2 steps bf16/fp16), one program per resident slot
# (4 per SM: 256 threads at 64 registers; more programs would only wait for the counter to run
# out, since the work is handed out by tickets), a row group of at most a quarter of the L2 (the group read by the
# statistics items, the next group and the gradient writes of the first stay in L2 together).
# _GROUP_BYTES overrides that budget (None: a quarter of the device's L2).
_STREAM_WARPS = 8
_STREAM_CTAS_PER_SM = 4
_STREAM_BLOCK_K = 256
_GROUP_BYTES = None


@triton.jit
def _cwd_fwd_kernel(s_ptr, t_ptr, ds_ptr, stats_ptr, kl_ptr, C, P, chunk, splits, rows,
                    s_sn, s_sc, s_sp, t_sn, t_sc, t_sp, inv_tau_hi, inv_tau_lo, grad_scale_hi, grad_scale_lo,
                    kl_scale_hi, kl_scale_lo, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, NEG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n = row // C
    c = row % C
    s_row = s_ptr + n * s_sn + c * s_sc
    t_row = t_ptr + n * t_sn + c * t_sc
    # fp32 kernel arguments carry inv_tau as hi + lo so that fp64 inputs keep ~48 bits of it
    inv_tau = tl.cast(inv_tau_hi, ACC) + tl.cast(inv_tau_lo, ACC)
    lanes = tl.arange(0, BLOCK)
    if ONE_TILE:
        inside = lanes < P
        offs = lanes.to(tl.int64)
        xs = tl.load(s_row + offs * s_sp, mask=inside, other=0.0).to(ACC) * inv_tau
        xt = tl.load(t_row + offs * t_sp, mask=inside, other=0.0).to(ACC) * inv_tau
        # padding lanes hold -inf, as torch's amax and softmax see only the real elements: the max
        # is -inf only when every real element is, and then exp(x - max) = exp(-inf - -inf) is NaN
        # in every lane, the reference's NaN softmax; otherwise padding gives exp(-inf) = 0
        xs = tl.where(inside, xs, float("-inf"))
        xt = tl.where(inside, xt, float("-inf"))
        m_s = tl.max(xs, axis=0)
        m_t = tl.max(xt, axis=0)
        e_s = tl.exp(xs - m_s)
        e_t = tl.exp(xt - m_t)
        l_s = tl.sum(e_s, axis=0)
        l_t = tl.sum(e_t, axis=0)
        acc = tl.sum(tl.where(inside, e_t * (xt - xs), 0.0), axis=0)
        if WRITE_GRAD:
            grad_scale = tl.cast(grad_scale_hi, ACC) + tl.cast(grad_scale_lo, ACC)
            ds = grad_scale * (e_s * (1.0 / l_s) - e_t * (1.0 / l_t))
            tl.store(ds_ptr + row * P + offs, ds.to(ds_ptr.dtype.element_ty), mask=inside)
    else:
        # running maxima start at NEG (finite) and padding lanes hold -inf (exp(-inf - max) = 0)
        m_s = tl.full([], NEG, ACC)
        m_t = tl.full([], NEG, ACC)
        l_s = tl.zeros([], ACC)
        l_t = tl.zeros([], ACC)
        acc = tl.zeros([], ACC)
        base = split * chunk
        for start in range(0, chunk, BLOCK):
            offs = base + start + lanes.to(tl.int64)
            inside = offs < P
            xs = tl.load(s_row + offs * s_sp, mask=inside, other=0.0).to(ACC) * inv_tau
            xt = tl.load(t_row + offs * t_sp, mask=inside, other=0.0).to(ACC) * inv_tau
            xs = tl.where(inside, xs, float("-inf"))
            xt = tl.where(inside, xt, float("-inf"))
            # one rescale per block (scalar running max), one exp per element and tensor
            new_m_s = tl.maximum(m_s, tl.max(xs, axis=0))
            new_m_t = tl.maximum(m_t, tl.max(xt, axis=0))
            alpha_t = tl.exp(m_t - new_m_t)
            e_t = tl.exp(xt - new_m_t)
            l_s = l_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(xs - new_m_s), axis=0)
            l_t = l_t * alpha_t + tl.sum(e_t, axis=0)
            acc = acc * alpha_t + tl.sum(tl.where(inside, e_t * (xt - xs), 0.0), axis=0)
            m_s = new_m_s
            m_t = new_m_t
        # a sum of 0 means every element of the split is -inf: save its max as -inf (one select per
        # split), so that the combine ignores it beside finite splits (l = 0) and gives the row NaN,
        # exp(-inf - -inf), as the reference's softmax does when every split of the row is -inf
        m_s = tl.where(l_s == 0.0, float("-inf"), m_s)
        m_t = tl.where(l_t == 0.0, float("-inf"), m_t)
    # (max, sum) pairs, not m + log(l): with logits of 1e4, m + log(l) in fp32 would round log(l)
    # to 1e-3 and every probability with it
    if ONE_TILE:
        # the row is complete: its final statistics (max, log sum-exp of s, then t) and its KL
        # times tau^2 / (N*C), so that the loss is one sum
        log_l_s = tl.log(l_s)
        log_l_t = tl.log(l_t)
        tl.store(stats_ptr + row, m_s)
        tl.store(stats_ptr + rows + row, log_l_s)
        tl.store(stats_ptr + 2 * rows + row, m_t)
        tl.store(stats_ptr + 3 * rows + row, log_l_t)
        kl = acc / l_t + (m_s - m_t) + (log_l_s - log_l_t)
        tl.store(kl_ptr + row, kl * (tl.cast(kl_scale_hi, ACC) + tl.cast(kl_scale_lo, ACC)))
    else:
        slot = row * splits + split
        plane = rows * splits
        tl.store(stats_ptr + slot, m_s)
        tl.store(stats_ptr + plane + slot, l_s)
        tl.store(stats_ptr + 2 * plane + slot, m_t)
        tl.store(stats_ptr + 3 * plane + slot, l_t)
        tl.store(stats_ptr + 4 * plane + slot, acc / l_t)


@triton.jit
def _cwd_combine_kernel(stats_ptr, lse_ptr, loss_ptr, rows, splits, scale_hi, scale_lo,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """One program combines the splits of every row (max, sum-exp pairs rescaled to the row max)
    into the row statistics and writes the loss: the whole epilogue in one launch, the loss summed
    in a fixed order."""
    plane = rows * splits
    total = tl.zeros([BLOCK_R], ACC)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_rows = r < rows
        m_s = tl.full([BLOCK_R], float("-inf"), ACC)
        m_t = tl.full([BLOCK_R], float("-inf"), ACC)
        for s0 in range(0, splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            ok = in_rows[:, None] & (sp < splits)[None, :]
            slot = r[:, None].to(tl.int64) * splits + sp[None, :]
            m_s = tl.maximum(m_s, tl.max(tl.load(stats_ptr + slot, mask=ok, other=float("-inf")), axis=1))
            m_t = tl.maximum(m_t, tl.max(tl.load(stats_ptr + 2 * plane + slot, mask=ok, other=float("-inf")), axis=1))
        # rows past the end: a finite max and a sum of 1, so that their (discarded) lanes compute no
        # inf - inf or log(0)
        m_s_sub = tl.where(in_rows, m_s, 0.0)
        m_t_sub = tl.where(in_rows, m_t, 0.0)
        l_s = tl.zeros([BLOCK_R], ACC)
        l_t = tl.zeros([BLOCK_R], ACC)
        a = tl.zeros([BLOCK_R], ACC)
        for s0 in range(0, splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            ok = in_rows[:, None] & (sp < splits)[None, :]
            slot = r[:, None].to(tl.int64) * splits + sp[None, :]
            # masked slots: l = 0 and a max of -inf, so they add exactly 0 (the row maxima start at
            # -inf as torch's amax would, so a row of -inf logits gives NaN as the reference does)
            m_s_part = tl.load(stats_ptr + slot, mask=ok, other=float("-inf"))
            l_s_part = tl.load(stats_ptr + plane + slot, mask=ok, other=0.0)
            m_t_part = tl.load(stats_ptr + 2 * plane + slot, mask=ok, other=float("-inf"))
            l_t_part = tl.load(stats_ptr + 3 * plane + slot, mask=ok, other=0.0)
            a_part = tl.load(stats_ptr + 4 * plane + slot, mask=ok, other=0.0)
            l_s += tl.sum(l_s_part * tl.exp(m_s_part - m_s_sub[:, None]), axis=1)
            l_t_rescaled = l_t_part * tl.exp(m_t_part - m_t_sub[:, None])
            l_t += tl.sum(l_t_rescaled, axis=1)
            a += tl.sum(l_t_rescaled * a_part, axis=1)
        l_s = tl.where(in_rows, l_s, 1.0)
        l_t = tl.where(in_rows, l_t, 1.0)
        log_l_s = tl.log(l_s)
        log_l_t = tl.log(l_t)
        # KL = sum p_t (t - s)/tau - lse_t + lse_s, the two lse differenced by parts (max, then log-sum)
        kl = a / l_t + (m_s_sub - m_t_sub) + (log_l_s - log_l_t)
        total += tl.where(in_rows, kl, 0.0)
        tl.store(lse_ptr + r, m_s, mask=in_rows)
        tl.store(lse_ptr + rows + r, log_l_s, mask=in_rows)
        tl.store(lse_ptr + 2 * rows + r, m_t, mask=in_rows)
        tl.store(lse_ptr + 3 * rows + r, log_l_t, mask=in_rows)
    loss = tl.sum(total, axis=0) * (tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC))
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _cwd_bwd_kernel(s_ptr, t_ptr, lse_ptr, grad_ptr, ds_ptr, C, P, rows,
                    s_sn, s_sc, s_sp, t_sn, t_sc, t_sp, inv_tau_hi, inv_tau_lo, coef_hi, coef_lo,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < P
    n = row // C
    c = row % C
    inv_tau = tl.cast(inv_tau_hi, ACC) + tl.cast(inv_tau_lo, ACC)
    coef = (tl.cast(coef_hi, ACC) + tl.cast(coef_lo, ACC)) * tl.load(grad_ptr).to(ACC)
    # per row: max and log of the rescaled sum, for s and t; x - max first (exact near the max)
    m_s = tl.load(lse_ptr + row)
    log_l_s = tl.load(lse_ptr + rows + row)
    m_t = tl.load(lse_ptr + 2 * rows + row)
    log_l_t = tl.load(lse_ptr + 3 * rows + row)
    xs = tl.load(s_ptr + n * s_sn + c * s_sc + offs * s_sp, mask=inside, other=0.0).to(ACC) * inv_tau
    xt = tl.load(t_ptr + n * t_sn + c * t_sc + offs * t_sp, mask=inside, other=0.0).to(ACC) * inv_tau
    ds = coef * (tl.exp((xs - m_s) - log_l_s) - tl.exp((xt - m_t) - log_l_t))
    tl.store(ds_ptr + row * P + offs, ds.to(ds_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _lane_softmax_update(x, m, l):
    """Per-lane online (max, sum of exp(x - max)) with one exp per element: exp(-|x - m|) is the
    new element's term when x <= m and the rescale of the old sum when x > m. NaN x gives NaN l
    (x > m is false, exp(NaN) is NaN); -inf x adds exp(-inf) = 0."""
    up = x > m
    d = tl.exp(tl.where(up, m - x, x - m))
    return tl.where(up, x, m), tl.where(up, l * d + 1.0, l + d)


@triton.jit
def _softmax_pair_combine(ms1, ls1, mt1, lt1, ms2, ls2, mt2, lt2):
    # (max, sum) pairs of s and t merged in one reduction: one shared-memory round trip, not four
    ms = tl.maximum(ms1, ms2)
    mt = tl.maximum(mt1, mt2)
    return ms, ls1 * tl.exp(ms1 - ms) + ls2 * tl.exp(ms2 - ms), mt, lt1 * tl.exp(mt1 - mt) + lt2 * tl.exp(mt2 - mt)


@triton.jit
def _cwd_stream_kernel(s_ptr, t_ptr, ds_ptr, part_ptr, lse_ptr, kl_ptr, sync_ptr, C, P, rows, K, group_rows,
                       n_groups, s_sn, s_sc, s_sp, t_sn, t_sc, t_sp, inv_tau_hi, inv_tau_lo, grad_scale_hi,
                       grad_scale_lo, kl_scale_hi, kl_scale_lo, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                       BLOCK_K: tl.constexpr, ACC: tl.constexpr, NEG: tl.constexpr):
    """Long rows, loss and gradient in one persistent launch (s and t read from DRAM once).

    Work items are (row, chunk of BLOCK * STEPS positions), of two kinds: a statistics item reduces
    its chunk to (max, sum-exp) of s/tau and t/tau; a gradient item recomputes the softmaxes of its
    chunk from the finished row statistics and writes ds and its part of the row's KL. Rows are
    taken in groups of group_rows, and the items in the order
        S(0), S(1), D(0), S(2), D(1), ..., S(G-1), D(G-2), D(G-1)
    (S: statistics items of a group, D: its gradient items), handed out by an atomic ticket
    counter. A group's inputs are re-read by its D items one group after its S items read them:
    the host sizes a group to a fraction of the L2, so the second read is an L2 hit.

    The last statistics item of a row to finish (atomic arrival count) combines the row's K
    partial pairs and publishes the row (count K + 1); a gradient item waits for that. Every
    item it waits for holds a lower ticket, so it was taken by a running program that never
    waits on it: no deadlock at any grid size, and the interpreter (programs one after another)
    runs the whole sequence in program 0.
    """
    CHUNK: tl.constexpr = BLOCK * STEPS
    inv_tau = tl.cast(inv_tau_hi, ACC) + tl.cast(inv_tau_lo, ACC)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    per_block = group_rows * K
    total = 2 * n_groups * per_block
    last_block = 2 * n_groups - 1
    ticket = tl.atomic_add(sync_ptr, 1)
    while ticket < total:
        b = ticket // per_block
        j = ticket % per_block
        is_stats = (b == 0) | ((b % 2 == 1) & (b < last_block))
        g = tl.where(is_stats, (b + 1) // 2, tl.where(b == last_block, n_groups - 1, b // 2 - 1))
        row = g * group_rows + j // K
        chunk = j % K
        if row < rows:
            row64 = row.to(tl.int64)
            n = row64 // C
            c = row64 % C
            s_row = s_ptr + n * s_sn + c * s_sc
            t_row = t_ptr + n * t_sn + c * t_sc
            base = chunk.to(tl.int64) * CHUNK
            count_ptr = sync_ptr + 1 + row64
            if is_stats:
                # per-lane running statistics, reduced once per item (no cross-warp step per block)
                m_s = tl.full([BLOCK], NEG, ACC)
                m_t = tl.full([BLOCK], NEG, ACC)
                l_s = tl.zeros([BLOCK], ACC)
                l_t = tl.zeros([BLOCK], ACC)
                for step in tl.static_range(STEPS):
                    offs = base + step * BLOCK + lanes
                    inside = offs < P
                    xs = tl.load(s_row + offs * s_sp, mask=inside, other=0.0).to(ACC) * inv_tau
                    xt = tl.load(t_row + offs * t_sp, mask=inside, other=0.0).to(ACC) * inv_tau
                    m_s, l_s = _lane_softmax_update(tl.where(inside, xs, float("-inf")), m_s, l_s)
                    m_t, l_t = _lane_softmax_update(tl.where(inside, xt, float("-inf")), m_t, l_t)
                m_s, l_s, m_t, l_t = tl.reduce((m_s, l_s, m_t, l_t), 0, _softmax_pair_combine)
                plane = rows * K
                slot = row64 * K + chunk
                tl.store(part_ptr + slot, m_s)
                tl.store(part_ptr + plane + slot, l_s)
                tl.store(part_ptr + 2 * plane + slot, m_t)
                tl.store(part_ptr + 3 * plane + slot, l_t)
                tl.debug_barrier()
                arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
                if arrived == K - 1:
                    # the row's last chunk: combine its K pairs (read past L1: other SMs wrote them)
                    cm_s = tl.full([BLOCK_K], NEG, ACC)
                    cm_t = tl.full([BLOCK_K], NEG, ACC)
                    cl_s = tl.zeros([BLOCK_K], ACC)
                    cl_t = tl.zeros([BLOCK_K], ACC)
                    for k0 in range(0, K, BLOCK_K):
                        k = k0 + tl.arange(0, BLOCK_K)
                        ok = k < K
                        at = row64 * K + k
                        pm_s = tl.load(part_ptr + at, mask=ok, other=NEG, cache_modifier=".cg")
                        pl_s = tl.load(part_ptr + plane + at, mask=ok, other=0.0, cache_modifier=".cg")
                        pm_t = tl.load(part_ptr + 2 * plane + at, mask=ok, other=NEG, cache_modifier=".cg")
                        pl_t = tl.load(part_ptr + 3 * plane + at, mask=ok, other=0.0, cache_modifier=".cg")
                        cm_s, cl_s, cm_t, cl_t = _softmax_pair_combine(cm_s, cl_s, cm_t, cl_t, pm_s, pl_s, pm_t, pl_t)
                    cm_s, cl_s, cm_t, cl_t = tl.reduce((cm_s, cl_s, cm_t, cl_t), 0, _softmax_pair_combine)
                    # a sum of 0: every element of the row is -inf; a max of -inf then gives the
                    # row exp(-inf - -inf) = NaN, the reference's softmax of such a row
                    cm_s = tl.where(cl_s == 0.0, float("-inf"), cm_s)
                    cm_t = tl.where(cl_t == 0.0, float("-inf"), cm_t)
                    tl.store(lse_ptr + row64, cm_s)
                    tl.store(lse_ptr + rows + row64, tl.log(cl_s))
                    tl.store(lse_ptr + 2 * rows + row64, cm_t)
                    tl.store(lse_ptr + 3 * rows + row64, tl.log(cl_t))
                    tl.debug_barrier()
                    tl.atomic_add(count_ptr, 1, sem="release")
            else:
                while tl.atomic_add(count_ptr, 0, sem="acquire") < K + 1:
                    pass
                m_s = tl.load(lse_ptr + row64, cache_modifier=".cg")
                log_l_s = tl.load(lse_ptr + rows + row64, cache_modifier=".cg")
                m_t = tl.load(lse_ptr + 2 * rows + row64, cache_modifier=".cg")
                log_l_t = tl.load(lse_ptr + 3 * rows + row64, cache_modifier=".cg")
                grad_scale = tl.cast(grad_scale_hi, ACC) + tl.cast(grad_scale_lo, ACC)
                acc = tl.zeros([BLOCK], ACC)
                for step in tl.static_range(STEPS):
                    offs = base + step * BLOCK + lanes
                    inside = offs < P
                    xs = tl.load(s_row + offs * s_sp, mask=inside, other=0.0).to(ACC) * inv_tau
                    xt = tl.load(t_row + offs * t_sp, mask=inside, other=0.0).to(ACC) * inv_tau
                    e_t = tl.exp(xt - m_t)
                    ds = grad_scale * (tl.exp((xs - m_s) - log_l_s) - tl.exp((xt - m_t) - log_l_t))
                    tl.store(ds_ptr + row64 * P + offs, ds.to(ds_ptr.dtype.element_ty), mask=inside)
                    acc += tl.where(inside, e_t * (xt - xs), 0.0)
                # this chunk's part of the row's KL = sum p_t (t - s)/tau - lse_t + lse_s; the
                # lse difference (by parts) once per row
                kl = tl.sum(acc, axis=0) * tl.exp(-log_l_t)
                kl += tl.where(chunk == 0, (m_s - m_t) + (log_l_s - log_l_t), 0.0)
                tl.store(kl_ptr + row64 * K + chunk, kl * (tl.cast(kl_scale_hi, ACC) + tl.cast(kl_scale_lo, ACC)))
        ticket = tl.atomic_add(sync_ptr, 1)


def _tile(p: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the one-tile forward: about 16 values per lane and tensor."""
    block = max(16, next_power_of_2(p))
    return block, min(16, max(1, block // 512))


def _plan(rows: int, p: int) -> tuple[int, int]:
    """(chunk, splits) of the streaming forward: at least _TARGET_PROGRAMS programs where the rows
    are long enough, each chunk a whole number of blocks."""
    splits = max(1, min(cdiv(p, _BLOCK), cdiv(_TARGET_PROGRAMS, rows)))
    chunk = cdiv(cdiv(p, splits), _BLOCK) * _BLOCK
    return chunk, cdiv(p, chunk)


def _stream_plan(rows: int, p: int, elsize: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(steps, chunks per row, group rows, groups, programs) of the persistent long-row kernel."""
    steps = max(1, 4 // elsize)
    k = cdiv(p, _BLOCK * steps)
    sms, l2 = device_sms_l2(device)
    budget = l2 // 4 if _GROUP_BYTES is None else _GROUP_BYTES
    group_rows = max(1, min(rows, budget // (2 * p * elsize)))
    programs = min(sms * _STREAM_CTAS_PER_SM, rows * k)
    return steps, k, group_rows, cdiv(rows, group_rows), programs


def _fuses_grad(p: int, needs_grad: bool) -> bool:
    # every row length: one tile in registers, or the persistent streaming kernel
    return needs_grad


# Forward launch plans keyed on everything they depend on (shapes, strides, dtype, device, tau,
# whether the gradient is fused, and the module's tuning knobs): a repeated call skips the layout
# tests, the plan arithmetic and the fp32 splits of tau, most of the wrapper's host work besides
# the launch. Bounded: a run with ever new shapes clears it now and then.
_PLANS: dict = {}
_MAX_PLANS = 256


def _fwd_plan(student, teacher, tau, needs_grad):
    """(mode, s needs a copy, t needs a copy, row count, fused, buffer shapes, launch grid, launch
    arguments after the tensors, constexprs, and for the split mode the combine launch's)."""
    n, c, h, w = student.shape
    rows, p = n * c, h * w
    acc_torch = acc_torch_dtype(student.dtype)
    s, s_strides = flat_pixel_strides(student)
    t, t_strides = flat_pixel_strides(teacher)
    copies = (s is not student, t is not teacher)
    fused = _fuses_grad(p, needs_grad)
    one_tile = p <= _MAX_TILE
    inv_tau, scale_g, scale_l = fp32_split(1.0 / tau), fp32_split(tau / rows), fp32_split(tau * tau / rows)
    if fused and not one_tile:
        steps, k, group_rows, n_groups, programs = _stream_plan(rows, p, student.element_size(), student.device)
        return ("stream", *copies, rows, fused, acc_torch, (k,), (programs,),
                (c, p, rows, k, group_rows, n_groups, *s_strides, *t_strides, *inv_tau, *scale_g, *scale_l),
                dict(BLOCK=_BLOCK, STEPS=steps, BLOCK_K=min(_STREAM_BLOCK_K, next_power_of_2(k)),
                     ACC=acc_dtype(acc_torch), NEG=_NEG, num_warps=_STREAM_WARPS, **FP_FUSION), None)
    if one_tile:
        block, warps = _tile(p)
        chunk, splits = block, 1
    else:
        block, warps = _BLOCK, 8
        chunk, splits = _plan(rows, p)
    fwd = ((rows, splits), (c, p, chunk, splits, rows, *s_strides, *t_strides, *inv_tau, *scale_g, *scale_l),
           dict(BLOCK=block, ONE_TILE=one_tile, WRITE_GRAD=fused, ACC=acc_dtype(acc_torch), NEG=_NEG,
                num_warps=warps, **FP_FUSION))
    if one_tile:
        return ("one", *copies, rows, fused, acc_torch, (4, rows), *fwd, None)
    block_s = min(64, next_power_of_2(splits))
    combine = ((rows, splits, *scale_l),
               dict(BLOCK_R=max(1, 1024 // block_s), BLOCK_S=block_s, ACC=acc_dtype(acc_torch), num_warps=4,
                    **FP_FUSION))
    return ("split", *copies, rows, fused, acc_torch, (5, rows, splits), *fwd, combine)


@torch.library.custom_op("segkd::channel_wise_kd_triton", mutates_args=())
def channel_wise_kd_triton(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                           needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ds, lse): loss 0-dim in the student's dtype; ds = d loss / d student when the forward
    computed it (needs_grad and a one-tile row), else an empty tensor; lse (4, N*C): per row the max
    and the log of the rescaled sum-exp of s/tau, then of t/tau, in the compute dtype (the
    log-sum-exps by parts), for the recomputing backward."""
    teacher = teacher.detach()
    device = student.device
    key = (student.shape, student.stride(), teacher.stride(), student.dtype, device, tau, needs_grad,
           _MAX_TILE, _BLOCK, _TARGET_PROGRAMS, _GROUP_BYTES, _STREAM_WARPS, _STREAM_CTAS_PER_SM, _STREAM_BLOCK_K)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _fwd_plan(student, teacher, tau, needs_grad)
    mode, s_copy, t_copy, rows, fused, acc_torch, shape, grid, args, consts, combine = plan
    # a layout whose H, W do not flatten to one strided axis is read from a contiguous copy
    s = student.contiguous() if s_copy else student
    t = teacher.contiguous() if t_copy else teacher
    ds = torch.empty(student.shape if fused else (0,), dtype=student.dtype, device=device)
    if mode == "stream":
        # long rows with a gradient: one persistent launch reads s and t once from DRAM (the
        # gradient items re-read their group from L2) and writes ds and per-chunk KL parts
        k = shape[0]
        parts = torch.empty(4, rows, k, dtype=acc_torch, device=device)
        lse = torch.empty(4, rows, dtype=acc_torch, device=device)
        kl = torch.empty(rows, k, dtype=acc_torch, device=device)
        sync = torch.zeros(1 + rows, dtype=torch.int32, device=device)
        _cwd_stream_kernel[grid](s, t, ds, parts, lse, kl, sync, *args, **consts)
        return kl.sum().to(student.dtype), ds, lse
    stats = torch.empty(shape, dtype=acc_torch, device=device)
    # the split mode writes no per-row KL: stats stands in
    kl = torch.empty(rows, dtype=acc_torch, device=device) if mode == "one" else stats
    # without WRITE_GRAD the ds pointer is never used: any non-empty tensor stands in
    _cwd_fwd_kernel[grid](s, t, ds if fused else stats, stats, kl, *args, **consts)
    if mode == "one":
        return kl.sum().to(student.dtype), ds, stats
    # combine the splits of every row in one launch (rows x splits numbers)
    lse = torch.empty(4, rows, dtype=acc_torch, device=device)
    loss = torch.empty((), dtype=student.dtype, device=device)
    c_args, c_consts = combine
    _cwd_combine_kernel[(1,)](stats, lse, loss, *c_args, **c_consts)
    return loss, ds, lse


@torch.library.custom_op("segkd::channel_wise_kd_backward_triton", mutates_args=())
def channel_wise_kd_backward_triton(student: torch.Tensor, teacher: torch.Tensor, lse: torch.Tensor,
                                    grad: torch.Tensor, tau: float) -> torch.Tensor:
    """d loss / d student = grad * tau / (N*C) * (softmax(s/tau) - softmax(t/tau)), recomputed from
    the saved row log-sum-exps."""
    n, c, h, w = student.shape
    rows, p = n * c, h * w
    s, s_strides = flat_pixel_strides(student)
    t, t_strides = flat_pixel_strides(teacher)
    ds = torch.empty((n, c, h, w), dtype=student.dtype, device=student.device)
    block = min(_BLOCK, max(16, next_power_of_2(p)))
    _cwd_bwd_kernel[(rows, cdiv(p, block))](
        s, t, lse.contiguous(), grad.reshape(()).contiguous(), ds, c, p, rows, *s_strides, *t_strides,
        *fp32_split(1.0 / tau), *fp32_split(tau / rows), BLOCK=block, ACC=acc_dtype(lse.dtype), num_warps=4, **FP_FUSION)
    return ds




@channel_wise_kd_triton.register_fake
def _(student, teacher, tau, needs_grad):
    n, c, h, w = student.shape
    fused = _fuses_grad(h * w, needs_grad)
    ds = student.new_empty((n, c, h, w) if fused else (0,))
    return student.new_empty(()), ds, student.new_empty((4, n * c), dtype=acc_torch_dtype(student.dtype))


@channel_wise_kd_backward_triton.register_fake
def _(student, teacher, lse, grad, tau):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, tau, _needs_grad = inputs
    _loss, ds, lse = output
    ctx.tau = tau
    ctx.fused = ds.numel() > 0
    ctx.mark_non_differentiable(ds, lse)
    # The fused path keeps only ds; the other keeps the inputs and the row statistics.
    ctx.save_for_backward(*((ds,) if ctx.fused else (student, teacher, lse)))


def _backward(ctx, grad_loss, _grad_ds, _grad_lse):
    if grad_loss is None:
        return None, None, None, None
    if ctx.fused:
        (ds,) = ctx.saved_tensors
        return scale_saved_grad(ds, grad_loss), None, None, None
    student, teacher, lse = ctx.saved_tensors
    return channel_wise_kd_backward_triton(student, teacher.detach(), lse, grad_loss, ctx.tau), None, None, None


channel_wise_kd_triton.register_autograd(_backward, setup_context=_setup_context)


def channel_wise_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """The loss through the custom op; the gradient is computed in the forward only when needed."""
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _ds, _lse = channel_wise_kd_triton(student, teacher.detach(), float(tau), needs_grad)
    return loss


__all__ = ["channel_wise_kd", "channel_wise_kd_triton", "channel_wise_kd_backward_triton"]
