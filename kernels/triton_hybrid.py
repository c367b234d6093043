"""Triton chunked-scan kernels for the hybrid layer: forward and exact backward.

Same function and conventions as `reference.hybrid_attention_reference` (SPEC §2). One program per
(batch, query head[, V block]) walks the sequence in chunks of C keys (default 64). For query chunk c
the keys split into

    NT "explicit" key tiles c-NT+1 .. c   window mask (0 <= i-j < w) and linear mask (i-j >= shift)
    tiles <= c-NT                         linear part only, read out of the fp32 state (S, z)

with NT = 1 + ceil((w-1)/C) rounded up to a power of two (2 for w <= C+1; `_explicit_tiles`), so the
window row max c_i is exact over the explicit tiles (no online rescaling) and ONE accumulator holds
gamma*P*V + alpha*A*V + alpha*phi_q*S. The normaliser is summed in fp32 with tl.sum, and the state
read-outs (phi_q.S forward, g.S^T backward) take fp32 operands (`mm_state`): S is never cast to
the input dtype, where fp16 would overflow at long T. shift = w in `hybrid`, 0 for `linear_only` and
`linear_covers_window`. Padded keys (key_valid False) take part in neither branch nor the state.

Backward (exact gradient of the reference, including through the row max c_i, gamma and alpha):
  - `_hybrid_bwd_dq_kernel`: forward scan; dq, dphi_q, and per row the window gradient dc_i,
    delta_i = dy_i.y_i / den_i and the per-row terms whose sums are dgamma and dalpha.
  - `_hybrid_bwd_dkv_kernel`: reverse scan with the state gradient (dS, dz); dk, dv, dphi_k.
  The gradient through c_i = s_{i,j*} goes to the argmax key j* saved by the forward (ties: the
  first key, where torch's amax would split it; the function has no derivative there anyway).
  No atomics: with GQA each query head writes its own fp32 dk/dv slice, summed over the group in
  torch, so results are deterministic.

State hand-off (`return_state=True`): the fp32 state (S [B,H,F,D], z [B,H,F]) after folding every
valid key j < Tk - (window - 1) (clamped to [0, Tk]), plus `initial_state`, whatever the mode (so the
cache stays valid when the component mode is switched at run time). That is exactly the state the
decode kernel (`triton_decode.py`) expects for the next query at position Tk, with the last
window-1 raw keys/values in its window buffer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import validation
from .triton_common import (
    LOG2E,
    autotune_configs,
    block_size,
    check_runnable,
    compute_dtype,
    device_guard,
    interpreting,
    load_rows,
    load_rows_t,
    mm,
    mm_state,
)

_TUNE_KEY = ["DK", "DV", "FD", "BV", "C", "NT", "HAS_WIN", "HAS_LIN", "IEEE"]


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _key_valid(VALID, valid_base, cols, Tk):
    ok = (cols >= 0) & (cols < Tk)
    return tl.load(VALID + valid_base + cols, mask=ok, other=0) != 0


@triton.jit
def _fold_tile(S, z, FK, V, VALID, fk_base, v_base, valid_base, t, end, offs_c, offs_f, offs_v,
               FD: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr):
    """S += phi_k^T v, z += sum phi_k over the valid keys of tile t below `end` (t < 0: no-op)."""
    cols = t * C + offs_c
    keep = _key_valid(VALID, valid_base, cols, end)
    fkT = load_rows_t(FK, fk_base, cols, keep, offs_f, FD, FD)  # [BF, C], 0 for dropped keys
    v = load_rows(V, v_base, cols, keep, offs_v, DV, DV)  # [C, BV]
    S += mm(fkT, v, IEEE)
    z += tl.sum(fkT.to(tl.float32), 1)
    return S, z


@triton.jit
def _window_scores(q, K, VALID, k_base, valid_base, t, rows, Tk, window, qk_scale, offs_c, offs_dk,
                   DK: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr):
    """log2-domain scores of the window part of tile t, -inf outside the window mask."""
    cols = t * C + offs_c
    valid = _key_valid(VALID, valid_base, cols, Tk)
    kT = load_rows_t(K, k_base, cols, valid, offs_dk, DK, DK)
    s = mm(q, kT, IEEE) * qk_scale
    diff = rows[:, None] - cols[None, :]
    keep = (diff >= 0) & (diff < window) & valid[None, :]
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _linear_scores(fq, FK, VALID, fk_base, valid_base, t, rows, Tk, shift, offs_c, offs_f,
                   FD: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr):
    """phi_q phi_k^T on the linear mask (i - j >= shift, valid keys) of tile t, 0 elsewhere."""
    cols = t * C + offs_c
    valid = _key_valid(VALID, valid_base, cols, Tk)
    fkT = load_rows_t(FK, fk_base, cols, valid, offs_f, FD, FD)
    a = mm(fq, fkT, IEEE)
    keep = (rows[:, None] - cols[None, :]) >= shift
    return tl.where(keep, a, 0.0)


@triton.jit
def _value_tile(V, VALID, v_base, valid_base, t, Tk, offs_c, offs_v, DV: tl.constexpr, C: tl.constexpr):
    cols = t * C + offs_c
    valid = _key_valid(VALID, valid_base, cols, Tk)
    return load_rows(V, v_base, cols, valid, offs_v, DV, DV)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=autotune_configs([{}], warps=(8,)), key=_TUNE_KEY)
@triton.jit
def _hybrid_fwd_kernel(
    Q, K, V, FQ, FK, VALID, GAMMA, ALPHA, S_IN, Z_IN,
    Y, M_OUT, IDX_OUT, DEN_OUT, LDEN_OUT, S_OUT, Z_OUT,
    Tq, Tk, H, HKV, window, shift, state_end, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, FD: tl.constexpr,
    BDK: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NT: tl.constexpr,
    HAS_WIN: tl.constexpr, HAS_LIN: tl.constexpr, FOLD_STATE: tl.constexpr, HAS_INIT: tl.constexpr,
    RETURN_STATE: tl.constexpr, IEEE: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    bh64 = bh.to(tl.int64)
    bk64 = (b * HKV + hk).to(tl.int64)
    q_base = bh64 * Tq * DK
    y_base = bh64 * Tq * DV
    fq_base = bh64 * Tq * FD
    fk_base = bh64 * Tk * FD
    k_base = bk64 * Tk * DK
    v_base = bk64 * Tk * DV
    valid_base = b.to(tl.int64) * Tk
    row_base = bh64 * Tq

    offs_c = tl.arange(0, C)
    offs_dk = tl.arange(0, BDK)
    offs_f = tl.arange(0, BF)
    offs_v = pid_v * BV + tl.arange(0, BV)
    state_mask = (offs_f[:, None] < FD) & (offs_v[None, :] < DV)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    alpha = tl.load(ALPHA + h).to(tl.float32)

    S = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        S += tl.load(S_IN + bh64 * FD * DV + offs_f[:, None] * DV + offs_v[None, :], mask=state_mask, other=0.0)
        z += tl.load(Z_IN + bh64 * FD + offs_f, mask=offs_f < FD, other=0.0)

    q_start = Tk - Tq  # queries are the last Tq key positions
    c_first = q_start // C
    n_chunks = tl.cdiv(Tk, C)
    if FOLD_STATE:  # keys before the first query chunk's explicit tiles
        for t in range(0, c_first - NT):
            S, z = _fold_tile(S, z, FK, V, VALID, fk_base, v_base, valid_base, t, Tk,
                              offs_c, offs_f, offs_v, FD, DV, C, IEEE)

    for c in range(c_first, n_chunks):
        if FOLD_STATE:  # the state lags NT tiles behind the query chunk
            S, z = _fold_tile(S, z, FK, V, VALID, fk_base, v_base, valid_base, c - NT, Tk,
                              offs_c, offs_f, offs_v, FD, DV, C, IEEE)
        rows = c * C + offs_c
        row_ok = (rows >= q_start) & (rows < Tk)
        qrow = rows - q_start
        acc = tl.zeros([C, BV], dtype=tl.float32)
        den_w = tl.zeros([C], dtype=tl.float32)
        den_l = tl.zeros([C], dtype=tl.float32)
        m_out = tl.zeros([C], dtype=tl.float32)
        idx = tl.full([C], -1, tl.int32)
        if HAS_LIN:
            fq = load_rows(FQ, fq_base, qrow, row_ok, offs_f, FD, FD)
            acc += alpha * mm_state(fq, S, IEEE)  # fp32: S is never narrowed to the input dtype
            den_l += tl.sum(fq.to(tl.float32) * z[None, :], 1)
        if HAS_WIN:
            q = load_rows(Q, q_base, qrow, row_ok, offs_dk, DK, DK)
            if NT == 2:  # both window tiles stay in registers: one pass
                s0 = _window_scores(q, K, VALID, k_base, valid_base, c - 1, rows, Tk, window, qk_scale,
                                    offs_c, offs_dk, DK, C, IEEE)
                s1 = _window_scores(q, K, VALID, k_base, valid_base, c, rows, Tk, window, qk_scale,
                                    offs_c, offs_dk, DK, C, IEEE)
                m0 = tl.max(s0, 1)
                m1 = tl.max(s1, 1)
                m = tl.maximum(m0, m1)
                idx = tl.where(m1 > m0, c * C + tl.argmax(s1, 1), (c - 1) * C + tl.argmax(s0, 1))
                idx = tl.where(m == float("-inf"), -1, idx)
                m_out = tl.where(m == float("-inf"), 0.0, m)
                # finish tile c-1 before touching tile c: shorter live ranges, fewer spills
                p0 = tl.exp2(s0 - m_out[:, None])
                den_w += tl.sum(p0, 1)
                w0 = gamma * p0
                if HAS_LIN:
                    a0 = _linear_scores(fq, FK, VALID, fk_base, valid_base, c - 1, rows, Tk, shift,
                                        offs_c, offs_f, FD, C, IEEE)
                    den_l += tl.sum(a0, 1)
                    w0 += alpha * a0
                v0 = _value_tile(V, VALID, v_base, valid_base, c - 1, Tk, offs_c, offs_v, DV, C)
                acc += mm(w0.to(v0.dtype), v0, IEEE)
                p1 = tl.exp2(s1 - m_out[:, None])
                den_w += tl.sum(p1, 1)
                w1 = gamma * p1
                if HAS_LIN:
                    a1 = _linear_scores(fq, FK, VALID, fk_base, valid_base, c, rows, Tk, shift,
                                        offs_c, offs_f, FD, C, IEEE)
                    den_l += tl.sum(a1, 1)
                    w1 += alpha * a1
                v1 = _value_tile(V, VALID, v_base, valid_base, c, Tk, offs_c, offs_v, DV, C)
                acc += mm(w1.to(v1.dtype), v1, IEEE)
            else:  # general NT: pass 1 finds the exact row max, pass 2 accumulates
                m = tl.full([C], float("-inf"), tl.float32)
                for tt in range(NT):
                    t = c - NT + 1 + tt
                    s = _window_scores(q, K, VALID, k_base, valid_base, t, rows, Tk, window, qk_scale,
                                       offs_c, offs_dk, DK, C, IEEE)
                    mt = tl.max(s, 1)
                    idx = tl.where(mt > m, t * C + tl.argmax(s, 1), idx)
                    m = tl.maximum(m, mt)
                m_out = tl.where(m == float("-inf"), 0.0, m)
                for tt in range(NT):
                    t = c - NT + 1 + tt
                    s = _window_scores(q, K, VALID, k_base, valid_base, t, rows, Tk, window, qk_scale,
                                       offs_c, offs_dk, DK, C, IEEE)
                    p = tl.exp2(s - m_out[:, None])
                    den_w += tl.sum(p, 1)
                    w = gamma * p
                    if HAS_LIN:
                        a = _linear_scores(fq, FK, VALID, fk_base, valid_base, t, rows, Tk, shift,
                                           offs_c, offs_f, FD, C, IEEE)
                        den_l += tl.sum(a, 1)
                        w += alpha * a
                    vt = _value_tile(V, VALID, v_base, valid_base, t, Tk, offs_c, offs_v, DV, C)
                    acc += mm(w.to(vt.dtype), vt, IEEE)
        else:  # linear_only
            for tt in range(NT):
                t = c - NT + 1 + tt
                a = _linear_scores(fq, FK, VALID, fk_base, valid_base, t, rows, Tk, shift,
                                   offs_c, offs_f, FD, C, IEEE)
                den_l += tl.sum(a, 1)
                vt = _value_tile(V, VALID, v_base, valid_base, t, Tk, offs_c, offs_v, DV, C)
                acc += mm((alpha * a).to(vt.dtype), vt, IEEE)

        den = gamma * den_w + alpha * den_l
        nonzero = den != 0.0
        y = acc / tl.where(nonzero, den, 1.0)[:, None]
        y = tl.where(nonzero[:, None], y, 0.0)
        y_ptrs = Y + y_base + qrow[:, None].to(tl.int64) * DV + offs_v[None, :]
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None] & (offs_v[None, :] < DV))
        stat_ok = row_ok & ((offs_c * 0 + pid_v) == 0)  # broadcast: the interpreter rejects scalar masks
        tl.store(M_OUT + row_base + qrow, m_out, mask=stat_ok)
        tl.store(IDX_OUT + row_base + qrow, idx, mask=stat_ok)
        tl.store(DEN_OUT + row_base + qrow, den, mask=stat_ok)
        tl.store(LDEN_OUT + row_base + qrow, alpha * den_l, mask=stat_ok)

    if RETURN_STATE:  # fold the remaining keys j < state_end for the decode hand-off
        for t in range(tl.maximum(n_chunks - NT, 0), tl.cdiv(state_end, C)):
            S, z = _fold_tile(S, z, FK, V, VALID, fk_base, v_base, valid_base, t, state_end,
                              offs_c, offs_f, offs_v, FD, DV, C, IEEE)
        tl.store(S_OUT + bh64 * FD * DV + offs_f[:, None] * DV + offs_v[None, :], S, mask=state_mask)
        tl.store(Z_OUT + bh64 * FD + offs_f, z, mask=(offs_f < FD) & ((offs_f * 0 + pid_v) == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# Notation per query row i: g_i = dy_i / den_i, delta_i = dy_i.y_i / den_i, and for a key j
# dp_ij = g_i.v_j - delta_i. Then, with p~ = exp(s - c) (no gamma) and a~ = phi_q.phi_k:
#   window:  ds_ij = gamma p~_ij dp_ij (+ dc_i at j = argmax), dc_i = -gamma sum_j p~_ij dp_ij
#   linear:  dphi_q_i = alpha (sum_j dp_ij phi_k_j + S g_i - delta_i z),  dphi_k_j = alpha sum_i dp_ij phi_q_i
#   dv_j = sum_i (gamma p~_ij + alpha a~_ij) g_i;  dgamma = sum_ij p~ dp;  dalpha = sum_i phi_q_i.dphi_q_i / alpha
_TUNE_KEY_BWD = ["DK", "DV", "FD", "C", "NT", "HAS_WIN", "HAS_LIN", "IEEE"]


@triton.jit
def _row_grad(DY, Y, DEN, y_base, row_base, qrow, row_ok, offs_dv, DV: tl.constexpr):
    """g = dy / den and delta = dy.y / den for a chunk of query rows (0 where den == 0)."""
    dy = load_rows(DY, y_base, qrow, row_ok, offs_dv, DV, DV).to(tl.float32)
    den = tl.load(DEN + row_base + qrow, mask=row_ok, other=0.0)
    inv = tl.where(den != 0.0, 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)
    y = load_rows(Y, y_base, qrow, row_ok, offs_dv, DV, DV).to(tl.float32)
    return dy * inv[:, None], tl.sum(dy * y, 1) * inv


@triton.autotune(configs=autotune_configs([{}], warps=(8,)), key=_TUNE_KEY_BWD)
@triton.jit
def _hybrid_bwd_dq_kernel(
    Q, K, V, FQ, FK, VALID, GAMMA, ALPHA, S_IN, Z_IN, Y, DY, M, IDX, DEN,
    DQ, DFQ, DC, DELTA, R_WIN, R_LIN,
    Tq, Tk, H, HKV, window, shift, qk_scale, scale,
    DK: tl.constexpr, DV: tl.constexpr, FD: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, C: tl.constexpr, NT: tl.constexpr,
    HAS_WIN: tl.constexpr, HAS_LIN: tl.constexpr, HAS_INIT: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    bh64 = bh.to(tl.int64)
    bk64 = (b * HKV + hk).to(tl.int64)
    q_base = bh64 * Tq * DK
    y_base = bh64 * Tq * DV
    fq_base = bh64 * Tq * FD
    fk_base = bh64 * Tk * FD
    k_base = bk64 * Tk * DK
    v_base = bk64 * Tk * DV
    valid_base = b.to(tl.int64) * Tk
    row_base = bh64 * Tq
    offs_c = tl.arange(0, C)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    offs_f = tl.arange(0, BF)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    alpha = tl.load(ALPHA + h).to(tl.float32)

    S = tl.zeros([BF, BDV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        S += tl.load(S_IN + bh64 * FD * DV + offs_f[:, None] * DV + offs_dv[None, :],
                     mask=(offs_f[:, None] < FD) & (offs_dv[None, :] < DV), other=0.0)
        z += tl.load(Z_IN + bh64 * FD + offs_f, mask=offs_f < FD, other=0.0)
    q_start = Tk - Tq
    c_first = q_start // C
    n_chunks = tl.cdiv(Tk, C)
    if HAS_LIN:
        for t in range(0, c_first - NT):
            S, z = _fold_tile(S, z, FK, V, VALID, fk_base, v_base, valid_base, t, Tk,
                              offs_c, offs_f, offs_dv, FD, DV, C, IEEE)

    for c in range(c_first, n_chunks):
        if HAS_LIN:
            S, z = _fold_tile(S, z, FK, V, VALID, fk_base, v_base, valid_base, c - NT, Tk,
                              offs_c, offs_f, offs_dv, FD, DV, C, IEEE)
        rows = c * C + offs_c
        row_ok = (rows >= q_start) & (rows < Tk)
        qrow = rows - q_start
        g, delta = _row_grad(DY, Y, DEN, y_base, row_base, qrow, row_ok, offs_dv, DV)
        gd = g.to(V.dtype.element_ty)
        dq_acc = tl.zeros([C, BDK], dtype=tl.float32)
        r_win = tl.zeros([C], dtype=tl.float32)
        dfq = tl.zeros([C, BF], dtype=tl.float32)
        if HAS_WIN:
            q = load_rows(Q, q_base, qrow, row_ok, offs_dk, DK, DK)
            m = tl.load(M + row_base + qrow, mask=row_ok, other=0.0)
        if HAS_LIN:
            fq = load_rows(FQ, fq_base, qrow, row_ok, offs_f, FD, FD)
            dfq += mm_state(g, tl.trans(S), IEEE) - delta[:, None] * z[None, :]  # fp32 g and S
        for tt in range(NT):
            t = c - NT + 1 + tt
            cols = t * C + offs_c
            valid = _key_valid(VALID, valid_base, cols, Tk)
            vT = load_rows_t(V, v_base, cols, valid, offs_dv, DV, DV)
            dp = mm(gd, vT, IEEE) - delta[:, None]
            diff = rows[:, None] - cols[None, :]
            if HAS_WIN:
                kT = load_rows_t(K, k_base, cols, valid, offs_dk, DK, DK)
                s = mm(q, kT, IEEE) * qk_scale
                keep = (diff >= 0) & (diff < window) & valid[None, :]
                p = tl.where(keep, tl.exp2(s - m[:, None]), 0.0)
                ds = p * dp
                r_win += tl.sum(ds, 1)
                dq_acc += mm(ds.to(kT.dtype), tl.trans(kT), IEEE)
            if HAS_LIN:
                fkT = load_rows_t(FK, fk_base, cols, valid, offs_f, FD, FD)
                dfq += mm(tl.where(diff >= shift, dp, 0.0).to(fkT.dtype), tl.trans(fkT), IEEE)
        if HAS_WIN:
            # c_i = s_{i, argmax}: its gradient dc_i goes to that one key
            dc = -gamma * r_win
            idx = tl.load(IDX + row_base + qrow, mask=row_ok, other=-1)
            k_star = load_rows(K, k_base, idx, row_ok & (idx >= 0), offs_dk, DK, DK).to(tl.float32)
            dq = scale * (gamma * dq_acc + dc[:, None] * k_star)
            tl.store(DQ + q_base + qrow[:, None].to(tl.int64) * DK + offs_dk[None, :],
                     dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_dk[None, :] < DK))
            tl.store(DC + row_base + qrow, dc, mask=row_ok)
            tl.store(R_WIN + row_base + qrow, r_win, mask=row_ok)
        if HAS_LIN:
            tl.store(R_LIN + row_base + qrow, tl.sum(fq.to(tl.float32) * dfq, 1), mask=row_ok)
            tl.store(DFQ + fq_base + qrow[:, None].to(tl.int64) * FD + offs_f[None, :],
                     (alpha * dfq).to(DFQ.dtype.element_ty), mask=row_ok[:, None] & (offs_f[None, :] < FD))
        tl.store(DELTA + row_base + qrow, delta, mask=row_ok)


@triton.autotune(configs=autotune_configs([{}], warps=(8,)), key=_TUNE_KEY_BWD)
@triton.jit
def _hybrid_bwd_dkv_kernel(
    Q, K, V, FQ, FK, VALID, GAMMA, ALPHA, Y, DY, M, IDX, DEN, DC, DELTA,
    DK_OUT, DV_OUT, DFK,
    Tq, Tk, H, HKV, window, shift, qk_scale, scale,
    DK: tl.constexpr, DV: tl.constexpr, FD: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, C: tl.constexpr, NT: tl.constexpr,
    HAS_WIN: tl.constexpr, HAS_LIN: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    bh64 = bh.to(tl.int64)
    bk64 = (b * HKV + hk).to(tl.int64)
    q_base = bh64 * Tq * DK
    y_base = bh64 * Tq * DV
    fq_base = bh64 * Tq * FD
    fk_base = bh64 * Tk * FD
    k_base = bk64 * Tk * DK
    v_base = bk64 * Tk * DV
    valid_base = b.to(tl.int64) * Tk
    row_base = bh64 * Tq
    offs_c = tl.arange(0, C)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    offs_f = tl.arange(0, BF)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    alpha = tl.load(ALPHA + h).to(tl.float32)
    q_start = Tk - Tq
    n_chunks = tl.cdiv(Tk, C)

    # reverse state: dS = alpha sum phi_q g^T, dz = -alpha sum delta phi_q over the query chunks
    # that read key tile t through the state (chunks >= t + NT)
    dS = tl.zeros([BF, BDV], dtype=tl.float32)
    dz = tl.zeros([BF], dtype=tl.float32)
    for t_rev in range(0, n_chunks):
        t = n_chunks - 1 - t_rev
        cols = t * C + offs_c
        valid = _key_valid(VALID, valid_base, cols, Tk)
        k_t = load_rows(K, k_base, cols, valid, offs_dk, DK, DK)
        v_t = load_rows(V, v_base, cols, valid, offs_dv, DV, DV)
        dk_acc = tl.zeros([C, BDK], dtype=tl.float32)
        dv_acc = tl.zeros([C, BDV], dtype=tl.float32)
        dfk_acc = tl.zeros([C, BF], dtype=tl.float32)
        if HAS_LIN:
            rows = (t + NT) * C + offs_c
            row_ok = (rows >= q_start) & (rows < Tk)
            qrow = rows - q_start
            g, delta = _row_grad(DY, Y, DEN, y_base, row_base, qrow, row_ok, offs_dv, DV)
            fq = load_rows(FQ, fq_base, qrow, row_ok, offs_f, FD, FD)
            dS += alpha * mm(tl.trans(fq), g.to(fq.dtype), IEEE)
            dz -= alpha * tl.sum(fq.to(tl.float32) * delta[:, None], 0)
            fk_t = load_rows(FK, fk_base, cols, valid, offs_f, FD, FD)
            dv_acc += mm(fk_t, dS.to(fk_t.dtype), IEEE)
            dfk_acc += mm(v_t, tl.trans(dS).to(v_t.dtype), IEEE) + dz[None, :]
        for cc in range(NT):  # query chunks that see tile t explicitly
            rows = (t + cc) * C + offs_c
            row_ok = (rows >= q_start) & (rows < Tk)
            qrow = rows - q_start
            g, delta = _row_grad(DY, Y, DEN, y_base, row_base, qrow, row_ok, offs_dv, DV)
            gd = g.to(v_t.dtype)
            dp = mm(gd, tl.trans(v_t), IEEE) - delta[:, None]
            diff = rows[:, None] - cols[None, :]
            w = tl.zeros([C, C], dtype=tl.float32)
            if HAS_WIN:
                q = load_rows(Q, q_base, qrow, row_ok, offs_dk, DK, DK)
                m = tl.load(M + row_base + qrow, mask=row_ok, other=0.0)
                idx = tl.load(IDX + row_base + qrow, mask=row_ok, other=-1)
                dc = tl.load(DC + row_base + qrow, mask=row_ok, other=0.0)
                s = mm(q, tl.trans(k_t), IEEE) * qk_scale
                keep = (diff >= 0) & (diff < window) & valid[None, :]
                p = tl.where(keep, gamma * tl.exp2(s - m[:, None]), 0.0)
                ds = p * dp + tl.where(cols[None, :] == idx[:, None], dc[:, None], 0.0)
                dk_acc += mm(tl.trans(ds).to(q.dtype), q, IEEE)
                w += p
            if HAS_LIN:
                fq = load_rows(FQ, fq_base, qrow, row_ok, offs_f, FD, FD)
                keep_l = diff >= shift
                w += alpha * tl.where(keep_l, mm(fq, tl.trans(fk_t), IEEE), 0.0)
                dfk_acc += alpha * mm(tl.trans(tl.where(keep_l, dp, 0.0)).to(fq.dtype), fq, IEEE)
            dv_acc += mm(tl.trans(w).to(gd.dtype), gd, IEEE)
        col_ok = (cols >= 0) & (cols < Tk)
        out_rows = cols[:, None].to(tl.int64)
        if HAS_WIN:
            tl.store(DK_OUT + bh64 * Tk * DK + out_rows * DK + offs_dk[None, :],
                     (scale * dk_acc).to(DK_OUT.dtype.element_ty), mask=col_ok[:, None] & (offs_dk[None, :] < DK))
        tl.store(DV_OUT + bh64 * Tk * DV + out_rows * DV + offs_dv[None, :],
                 dv_acc.to(DV_OUT.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))
        if HAS_LIN:
            dfk_acc = tl.where(valid[:, None], dfk_acc, 0.0)
            tl.store(DFK + fk_base + out_rows * FD + offs_f[None, :],
                     dfk_acc.to(DFK.dtype.element_ty), mask=col_ok[:, None] & (offs_f[None, :] < FD))


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Static shape/mode decisions shared by forward and backward."""

    B: int
    H: int
    Hkv: int
    Tq: int
    Tk: int
    DK: int
    DV: int
    FD: int
    window: int
    shift: int
    scale: float
    chunk: int
    nt: int
    has_win: bool
    has_lin: bool
    return_state: bool
    state_end: int
    ieee: bool

    @property
    def fold_state(self) -> bool:
        return self.has_lin or self.return_state


# Chunk of the backward kernels (None: the forward's). The backward only reads per-row stats (row max,
# argmax, den), so its blocking is free; 32 cuts register spills at D = F = 128 on sm_90 about
# 3x (ptxas) at the price of one more explicit tile (w = 64). Set by the benchmark's --bwd-chunk.
BACKWARD_CHUNK: int | None = None


def _explicit_tiles(window: int, chunk: int, has_win: bool, return_state: bool, shift: int) -> int:
    """NT, the key tiles a query chunk handles explicitly (its window, and linear keys too close for
    the state), as launched: the fewest that cover the window, 1 + ceil((w-1)/C), rounded up to a
    power of two. NT is a constexpr (and in the autotune key), so each value is one compile; the
    rounding makes a window schedule compile once per power of two instead of once per
    ceil(w/C) (SSD changes w mid-training). Any NT at least the minimum gives the same result: the
    window mask 0 <= i-j < w and the linear mask i-j >= shift are applied inside every explicit
    tile, and the state holds exactly the tiles older than those. The price is the extra tiles:
    none for w <= C+1 (the default w = C = 64) or w in (2C+1, 3C+1], one for w in (C+1, 2C+1], up
    to three for w in (3C+1, 6C+1]."""
    if not (has_win or return_state or shift > 0):
        return 1
    return triton.next_power_of_2(1 + math.ceil(max(window - 1, 0) / chunk))


def _make_plan(q, k, v, phi_q, *, window, scale, mode, linear_covers_window, chunk_size, return_state) -> _Plan:
    B, H, Tq, DK = q.shape
    Hkv, Tk, DV = k.shape[1], k.shape[2], v.shape[-1]
    ieee = q.dtype == torch.float32
    if ieee and not interpreting() and max(DK, DV, phi_q.shape[-1]) > 64:
        # fp32 operands at D = F = 128 overflow shared memory with 64-row tiles (KERNELS.md); the
        # chunk only changes the blocking, never the result, and fp32 is the accuracy path anyway
        chunk_size = min(chunk_size, 32)
    has_win = mode != "linear_only"
    has_lin = mode != "swa_only"
    shift = window if (mode == "hybrid" and not linear_covers_window) else 0
    nt = _explicit_tiles(window, chunk_size, has_win, return_state, shift)
    return _Plan(
        B=B, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, DK=DK, DV=DV, FD=phi_q.shape[-1], window=int(window),
        shift=int(shift), scale=float(scale), chunk=chunk_size, nt=nt, has_win=has_win, has_lin=has_lin,
        return_state=return_state, state_end=max(0, min(Tk, Tk - (window - 1))),
        ieee=ieee,
    )


def _v_block(plan: _Plan) -> int:
    bdv = block_size(plan.DV)
    # On the GPU, block V at 64 (32 for fp32 operands) so that S (F x BV fp32) and the accumulator
    # fit in registers with F = D = 128; the interpreter runs the whole V width at once.
    return bdv if interpreting() else min(bdv, 32 if plan.ieee else 64)


def _forward(plan: _Plan, q, k, v, phi_q, phi_k, valid, gamma, alpha, S0, z0):
    B, H, Tq = plan.B, plan.H, plan.Tq
    dev = q.device
    y = torch.empty(B, H, Tq, plan.DV, dtype=q.dtype, device=dev)
    m = torch.empty(B, H, Tq, dtype=torch.float32, device=dev)
    idx = torch.empty(B, H, Tq, dtype=torch.int32, device=dev)
    den = torch.empty(B, H, Tq, dtype=torch.float32, device=dev)
    lin_den = torch.empty(B, H, Tq, dtype=torch.float32, device=dev)
    if plan.return_state:
        S_out = torch.empty(B, H, plan.FD, plan.DV, dtype=torch.float32, device=dev)
        z_out = torch.empty(B, H, plan.FD, dtype=torch.float32, device=dev)
    else:
        S_out = z_out = torch.empty(1, dtype=torch.float32, device=dev)
    has_init = S0 is not None
    if not has_init:
        S0 = z0 = S_out
    bv = _v_block(plan)
    grid = (triton.cdiv(plan.DV, bv), B * H)
    with device_guard(dev):
        _hybrid_fwd_kernel[grid](
            q, k, v, phi_q, phi_k, valid, gamma, alpha, S0, z0,
            y, m, idx, den, lin_den, S_out, z_out,
            Tq, plan.Tk, H, plan.Hkv, plan.window, plan.shift, plan.state_end, plan.scale * LOG2E,
            DK=plan.DK, DV=plan.DV, FD=plan.FD, BDK=block_size(plan.DK), BF=block_size(plan.FD), BV=bv,
            C=plan.chunk, NT=plan.nt, HAS_WIN=plan.has_win, HAS_LIN=plan.has_lin,
            FOLD_STATE=plan.fold_state, HAS_INIT=has_init, RETURN_STATE=plan.return_state, IEEE=plan.ieee,
        )
    return y, m, idx, den, lin_den, S_out, z_out


def _backward(plan: _Plan, dy, q, k, v, phi_q, phi_k, gamma, alpha, valid, S0, z0, y, m, idx, den, *, needs):
    if BACKWARD_CHUNK is not None and BACKWARD_CHUNK != plan.chunk:
        nt = _explicit_tiles(plan.window, BACKWARD_CHUNK, plan.has_win, False, plan.shift)
        plan = dataclasses.replace(plan, chunk=BACKWARD_CHUNK, nt=nt, return_state=False)
    B, H, Hkv, Tq, Tk = plan.B, plan.H, plan.Hkv, plan.Tq, plan.Tk
    dev = q.device
    dy = dy.to(q.dtype).contiguous()
    rows = lambda: torch.empty(B, H, Tq, dtype=torch.float32, device=dev)  # noqa: E731
    dq, dphi_q = torch.empty_like(q), torch.empty_like(phi_q)
    dc, delta, r_win, r_lin = rows(), rows(), rows(), rows()
    has_init = S0 is not None
    meta = dict(
        DK=plan.DK, DV=plan.DV, FD=plan.FD, BDK=block_size(plan.DK), BDV=block_size(plan.DV),
        BF=block_size(plan.FD), C=plan.chunk, NT=plan.nt, HAS_WIN=plan.has_win, HAS_LIN=plan.has_lin,
        IEEE=plan.ieee,
    )
    dims = (Tq, Tk, H, Hkv, plan.window, plan.shift, plan.scale * LOG2E, plan.scale)
    with device_guard(dev):
        _hybrid_bwd_dq_kernel[(B * H,)](
            q, k, v, phi_q, phi_k, valid, gamma, alpha, S0 if has_init else den, z0 if has_init else den,
            y, dy, m, idx, den, dq, dphi_q, dc, delta, r_win, r_lin, *dims, HAS_INIT=has_init, **meta,
        )
    # GQA: every query head writes its own fp32 dk/dv slice (no atomics); summed over the group below
    groups = H // Hkv
    buf_dtype = torch.float32 if groups > 1 else k.dtype
    dk_buf = torch.empty(B, H, Tk, plan.DK, dtype=buf_dtype, device=dev)
    dv_buf = torch.empty(B, H, Tk, plan.DV, dtype=buf_dtype, device=dev)
    dphi_k = torch.empty_like(phi_k)
    with device_guard(dev):
        _hybrid_bwd_dkv_kernel[(B * H,)](
            q, k, v, phi_q, phi_k, valid, gamma, alpha, y, dy, m, idx, den, dc, delta,
            dk_buf, dv_buf, dphi_k, *dims, **meta,
        )
    if groups > 1:
        dk_buf = dk_buf.view(B, Hkv, groups, Tk, plan.DK).sum(2).to(k.dtype)
        dv_buf = dv_buf.view(B, Hkv, groups, Tk, plan.DV).sum(2).to(v.dtype)
    win, lin = plan.has_win, plan.has_lin
    grads = (
        dq if win else None,
        dk_buf if win else None,
        dv_buf,
        dphi_q if lin else None,
        dphi_k if lin else None,
        r_win.sum((0, 2)) if win else None,  # dgamma
        r_lin.sum((0, 2)) if lin else None,  # dalpha
    )
    return tuple(gr if need else None for gr, need in zip(grads, needs[:7]))


class _HybridAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, phi_q, phi_k, gamma, alpha, valid, S0, z0, plan):
        y, m, idx, den, lin_den, S_out, z_out = _forward(plan, q, k, v, phi_q, phi_k, valid, gamma, alpha, S0, z0)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, phi_q, phi_k, gamma, alpha, valid, S0, z0, y, m, idx, den)
        ctx.mark_non_differentiable(lin_den, den, S_out, z_out)
        return y, lin_den, den, S_out, z_out

    @staticmethod
    def backward(ctx, dy, _dlin_den, _dden, _dS, _dz):
        grads = _backward(ctx.plan, dy, *ctx.saved_tensors, needs=ctx.needs_input_grad)
        return (*grads, None, None, None, None)


def _check_triton_inputs(q, k, v, phi_q, phi_k, gamma, alpha, initial_state, chunk_size) -> torch.dtype:
    """What only this backend needs, on top of `validation.validate_inputs` (the shared contract):
    one device for every tensor the kernels read, CUDA (or the interpreter), a supported dtype, at
    least one query, a power-of-two chunk. Returns the compute dtype (q's)."""
    named = dict(q=q, k=k, v=v, phi_q=phi_q, phi_k=phi_k, gamma=gamma, alpha=alpha)  # (key_valid is moved)
    if initial_state is not None:
        named["initial_state[0]"], named["initial_state[1]"] = initial_state
    check_runnable(**named)
    dtype = compute_dtype(q)
    if q.shape[2] < 1:
        raise ValueError(f"q: expected at least one query, got shape {tuple(q.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")
    return dtype


def hybrid_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    *,
    window: int,
    scale: float,
    mode: str = "hybrid",
    linear_covers_window: bool = False,
    key_valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_stats: bool = False,
    chunk_size: int = 64,
    return_state: bool = False,
    _validated: bool = False,
):
    """Triton hybrid attention with the contract of `reference.hybrid_attention_reference`.

    k, v, phi_q, phi_k are computed in q's dtype (fp16, bf16 or fp32); accumulation, the state and
    the normaliser are fp32. y is differentiable w.r.t. q, k, v, phi_q, phi_k, gamma and alpha;
    initial_state and the extra outputs are not.

    Returns y [B,H,Tq,D]; with return_stats also (lin_den, den) [B,H,Tq] (fp32); with return_state
    also (S [B,H,F,D], z [B,H,F]) fp32 = initial_state + sums over the valid keys
    j < Tk - (window - 1), i.e. all but the last window-1 keys (the decode cache hand-off). Order:
    y, [lin_den, den], [(S, z)]; a single tensor when neither flag is set.

    Inputs are checked once: the shared `validation.validate_inputs` (shapes, dtypes, mode, window;
    one error naming the argument), then what only Triton needs. `dispatch.hybrid_attention`,
    which has already run the shared check, passes `_validated=True` to skip it here.
    """
    if not _validated:
        validation.validate_inputs(q, k, v, phi_q, phi_k, gamma, alpha, window=window, mode=mode,
                                 key_valid=key_valid, initial_state=initial_state)
    dtype = _check_triton_inputs(q, k, v, phi_q, phi_k, gamma, alpha, initial_state, chunk_size)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    plan = _make_plan(q, k, v, phi_q, window=window, scale=scale, mode=mode,
                      linear_covers_window=linear_covers_window, chunk_size=chunk_size,
                      return_state=return_state)
    k, v = k.to(dtype).contiguous(), v.to(dtype).contiguous()
    phi_q, phi_k = phi_q.to(dtype).contiguous(), phi_k.to(dtype).contiguous()
    if key_valid is None:
        valid = torch.ones(B, Tk, dtype=torch.int8, device=q.device)
    else:
        valid = key_valid.to(device=q.device, dtype=torch.int8).contiguous()
    gamma_f = gamma.reshape(H).float().contiguous() if gamma.dtype != torch.float32 else gamma.reshape(H).contiguous()
    alpha_f = alpha.reshape(H).float().contiguous() if alpha.dtype != torch.float32 else alpha.reshape(H).contiguous()
    if initial_state is not None:
        S0 = initial_state[0].detach().float().contiguous()
        z0 = initial_state[1].detach().float().contiguous()
    else:
        S0 = z0 = None
    y, lin_den, den, S_out, z_out = _HybridAttentionFn.apply(
        q.contiguous(), k, v, phi_q, phi_k, gamma_f, alpha_f, valid, S0, z0, plan
    )
    out: tuple = (y,)
    if return_stats:
        out += (lin_den, den)
    if return_state:
        out += ((S_out, z_out),)
    return out[0] if len(out) == 1 else out
