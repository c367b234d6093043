"""Fused Triton decode step for the hybrid layer: one new token per sequence.

The cache is `kernels.decode.DecodeCache` (re-exported here; one definition of the layout), per
layer, for window w and the next token at absolute position T:

    k_win, v_win  [B, Hkv, w-1, D]   ring of the last w-1 raw keys/values (after RoPE): position p
                                      lives in slot p % (w-1)
    valid         [B, w-1] bool       slot holds a real key (False: padding or never filled)
    phi_k_win     [B, H, w-1, F]      optional ring of phi_k (same slots); needed by modes whose
                                      linear branch also reads the window (linear_only,
                                      linear_covers_window), and saves recomputing phi_k of the
                                      evicted key
    S [B, H, F, D], z [B, H, F]       fp32 state over every valid key j <= T - w (all but the last
                                      w-1), exactly what `hybrid_attention_triton(...,
                                      return_state=True)` returns after a prefill of T tokens
    position      [1] int64 (device)  T, advanced in place by each step

One step (`hybrid_decode_triton`, the contract of `kernels.decode.hybrid_decode_torch`), one
program per (batch, query head):
  1. attend: window = the w-1 ring slots + the new key (exact max, fp32), linear read-out of
     (S, z) (+ the window and the new key for linear_only / linear_covers_window); y = N / D;
  2. fold the token at T-w+1 (ring slot T % (w-1), the new token itself when w = 1), which leaves
     the window for the next query, into (S, z) in place, whatever the mode, so the cache stays
     valid when the component mode is switched at run time;
  3. (torch, after the kernel) write the new k/v/valid[/phi_k] into that slot, position += 1.
Steps 1-2 read the ring before step 3 overwrites a slot, so no program races with another. A step
writes one slot and the state; nothing shifts, nothing is allocated but y, and the position lives
on the device, so a step can be captured in a CUDA graph (tests/test_triton_gpu.py).

Callers: the kernel tests and benchmarks keep one `DecodeCache` from step to step
(`DecodeCache.from_prefill` / `empty`). transformers' generate() passes the `HybridCache` layer's
own ring and fp32 state (`HybridCacheLayer.decode_cache()`, from `HybridMixer._ring_decode` in
hf_hybrid_attn/layers.py), so the step advances the cache itself. That cache keeps no phi_k ring:
the layer maps the evicted key each step (`phi_k_evict`), or, in the modes whose linear branch
covers the window, the ring's w-1 keys into a phi_k ring for that step only.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .decode import DecodeCache, check_position
from .reference import KERNEL_MODES
from .triton_common import LOG2E, block_size, check_runnable, compute_dtype, device_guard

__all__ = ["DecodeCache", "hybrid_decode_triton"]


@triton.jit
def _hybrid_decode_kernel(
    Q, KN, VN, FQ, FKN, NVALID, KW, VW, WVALID, FKW, FKE, S, Z, GAMMA, ALPHA, POS, Y,
    H, HKV, window, qk_scale, POS_STRIDE,
    W1: tl.constexpr, BW: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, FD: tl.constexpr,
    BDK: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr,
    HAS_WIN: tl.constexpr, HAS_LIN: tl.constexpr, LIN_WINDOW: tl.constexpr, HAS_FKW: tl.constexpr,
    FOLD: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    bh64 = bh.to(tl.int64)
    bk64 = (b * HKV + hk).to(tl.int64)
    offs_w = tl.arange(0, BW)
    offs_dk = tl.arange(0, BDK)
    offs_f = tl.arange(0, BF)
    dk_ok = offs_dk < DK
    f_ok = offs_f < FD
    gamma = tl.load(GAMMA + h).to(tl.float32)
    alpha = tl.load(ALPHA + h).to(tl.float32)
    pos = tl.load(POS + b * POS_STRIDE)  # one position for the batch (stride 0), or one per row

    w_valid = tl.load(WVALID + b.to(tl.int64) * W1 + offs_w, mask=offs_w < W1, other=0) != 0
    new_valid = tl.load(NVALID + b) != 0
    fq = tl.load(FQ + bh64 * FD + offs_f, mask=f_ok, other=0.0).to(tl.float32)

    # window softmax over the ring slots + the new key: exact max, fp32
    p_w = tl.zeros([BW], dtype=tl.float32)
    p_n = gamma * 0.0
    den = gamma * 0.0
    if HAS_WIN:
        q = tl.load(Q + bh64 * DK + offs_dk, mask=dk_ok, other=0.0).to(tl.float32)
        kw = tl.load(KW + bk64 * W1 * DK + offs_w[:, None] * DK + offs_dk[None, :],
                     mask=w_valid[:, None] & dk_ok[None, :], other=0.0).to(tl.float32)
        kn = tl.load(KN + bk64 * DK + offs_dk, mask=dk_ok, other=0.0).to(tl.float32)
        s_w = tl.where(w_valid, tl.sum(q[None, :] * kw, 1) * qk_scale, float("-inf"))
        s_n = tl.where(new_valid, tl.sum(q * kn, 0) * qk_scale, float("-inf"))
        m = tl.maximum(tl.max(s_w, 0), s_n)
        m = tl.where(m == float("-inf"), 0.0, m)
        p_w = tl.exp2(s_w - m)
        p_n = tl.exp2(s_n - m)
        den += gamma * (tl.sum(p_w, 0) + p_n)
    z = tl.load(Z + bh64 * FD + offs_f, mask=f_ok, other=0.0)
    a_w = tl.zeros([BW], dtype=tl.float32)
    a_n = gamma * 0.0
    if HAS_LIN:
        den_lin = tl.sum(fq * z, 0)
        if LIN_WINDOW:  # the linear branch also covers the window and the new key
            fkw = tl.load(FKW + bh64 * W1 * FD + offs_w[:, None] * FD + offs_f[None, :],
                          mask=w_valid[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            fkn = tl.load(FKN + bh64 * FD + offs_f, mask=f_ok, other=0.0).to(tl.float32)
            a_w = tl.sum(fq[None, :] * fkw, 1)
            a_n = tl.where(new_valid, tl.sum(fq * fkn, 0), 0.0)
            den_lin += tl.sum(a_w, 0) + a_n
        den += alpha * den_lin
    inv = tl.where(den != 0.0, 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)

    # the token leaving the window: ring slot pos % W1, or the new token itself when w == 1
    if W1 > 0:
        slot = pos % W1
        ev_valid = tl.load(WVALID + b.to(tl.int64) * W1 + slot) != 0
        if HAS_FKW:
            fk_ev = tl.load(FKW + bh64 * W1 * FD + slot * FD + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        else:
            fk_ev = tl.load(FKE + bh64 * FD + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    else:
        slot = pos * 0
        ev_valid = new_valid
        fk_ev = tl.load(FKN + bh64 * FD + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    fk_ev = tl.where(ev_valid, fk_ev, 0.0)

    for vb in tl.static_range(0, (DV + BV - 1) // BV):  # V blocks: the state never sits whole in registers
        offs_v = vb * BV + tl.arange(0, BV)
        v_ok = offs_v < DV
        vw = tl.load(VW + bk64 * W1 * DV + offs_w[:, None] * DV + offs_v[None, :],
                     mask=w_valid[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        vn = tl.load(VN + bk64 * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        vn = tl.where(new_valid, vn, 0.0)
        acc = gamma * (tl.sum(p_w[:, None] * vw, 0) + p_n * vn)
        s_ptrs = S + bh64 * FD * DV + offs_f[:, None] * DV + offs_v[None, :]
        s_mask = f_ok[:, None] & v_ok[None, :]
        S_blk = tl.load(s_ptrs, mask=s_mask, other=0.0)
        if HAS_LIN:
            lin = tl.sum(fq[:, None] * S_blk, 0)
            if LIN_WINDOW:
                lin += tl.sum(a_w[:, None] * vw, 0) + a_n * vn
            acc += alpha * lin
        tl.store(Y + bh64 * DV + offs_v, (acc * inv).to(Y.dtype.element_ty), mask=v_ok)
        if FOLD:
            if W1 > 0:
                v_ev = tl.load(VW + bk64 * W1 * DV + slot * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
            else:
                v_ev = vn
            tl.store(s_ptrs, S_blk + fk_ev[:, None] * v_ev[None, :], mask=s_mask)
    if FOLD:
        tl.store(Z + bh64 * FD + offs_f, z + fk_ev, mask=f_ok)


def _check(q, k, v, phi_q, phi_k, gamma, alpha, cache: DecodeCache, mode, linear_covers_window, phi_k_evict,
           key_valid, update_cache):
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode must be one of {KERNEL_MODES}, got {mode!r}")
    B, H, Tq, D = q.shape
    if Tq != 1:
        raise ValueError(f"q must be [B, H, 1, D] (one new token), got {tuple(q.shape)}")
    Hkv = cache.k_win.shape[1]
    if tuple(k.shape) != (B, Hkv, 1, cache.k_win.shape[-1]) or tuple(v.shape) != (B, Hkv, 1, cache.v_win.shape[-1]):
        raise ValueError(f"k and v must be [B, Hkv, 1, D] = [{B}, {Hkv}, 1, D], got {tuple(k.shape)}, {tuple(v.shape)}")
    Fd = cache.S.shape[2]
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k)):
        if tuple(x.shape) != (B, H, 1, Fd):
            raise ValueError(f"{name} must be [B, H, 1, F] = [{B}, {H}, 1, {Fd}], got {tuple(x.shape)}")
    for name, x in (("gamma", gamma), ("alpha", alpha)):
        if x.numel() != H:
            raise ValueError(f"{name} must have one value per query head ({H}), got shape {tuple(x.shape)}")
    if tuple(cache.S.shape) != (B, H, Fd, v.shape[-1]) or cache.S.dtype != torch.float32:
        raise ValueError(f"cache.S must be fp32 [B, H, F, D], got {cache.S.dtype} {tuple(cache.S.shape)}")
    lin_window = mode == "linear_only" or (mode == "hybrid" and linear_covers_window)
    if cache.window > 1 and cache.phi_k_win is None:
        if lin_window:
            raise ValueError(f"mode {mode!r} (linear_covers_window={linear_covers_window}) reads phi_k of the "
                             "window: build the cache with phi_k (DecodeCache.from_prefill(..., phi_k=...))")
        if update_cache and phi_k_evict is None:
            raise ValueError("phi_k_evict [B, H, 1, F] (phi_k of cache.evicted_keys()) is required when the "
                             "cache keeps no phi_k ring")
    if phi_k_evict is not None and tuple(phi_k_evict.shape) != (B, H, 1, Fd):
        raise ValueError(f"phi_k_evict must be [B, H, 1, F] = [{B}, {H}, 1, {Fd}], got {tuple(phi_k_evict.shape)}")
    if key_valid is not None and key_valid.numel() != B:
        raise ValueError(f"key_valid must be [B] or [B, 1] for the new token, got {tuple(key_valid.shape)}")
    check_position(cache, B)
    for f in dataclasses.fields(cache):  # the kernel indexes them with their contiguous strides
        t = getattr(cache, f.name)
        if t is not None and not t.is_contiguous():
            raise ValueError(f"cache.{f.name}: the Triton decode step needs contiguous cache tensors (it writes "
                             "them in place); got strides " + str(t.stride()))
    return lin_window


def hybrid_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    gamma: torch.Tensor,
    alpha: torch.Tensor,
    cache: DecodeCache,
    *,
    scale: float,
    mode: str = "hybrid",
    linear_covers_window: bool = False,
    phi_k_evict: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    update_cache: bool = True,
    softmax_sinks: int = 0,
    sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decode step; equals row T of the uncached forward over all T+1 keys.

    q [B,H,1,D], k/v [B,Hkv,1,D] of the new token (after RoPE), phi_q/phi_k [B,H,1,F] of it,
    phi_k_evict [B,H,1,F]: phi_k of `cache.evicted_keys()` (only without a phi_k ring),
    key_valid [B] bool for the new token (default all valid). With update_cache (default) the
    cache is advanced in place: the evicted token is folded into (S, z), the new one takes its ring
    slot, position += 1. Returns y [B, H, 1, D] in q's dtype. No autograd (inference only).
    softmax_sinks > 0 (with `sinks`, as in `kernels.decode.hybrid_decode_torch`): this kernel does
    not implement the sinks yet, so the PyTorch step runs instead (one warning)."""
    if softmax_sinks or sinks is not None:
        from .decode import hybrid_decode_torch
        from .dispatch import warn_triton_softmax_sinks

        warn_triton_softmax_sinks("decode kernel")
        return hybrid_decode_torch(q, k, v, phi_q, phi_k, gamma, alpha, cache, scale=scale, mode=mode,
                                   linear_covers_window=linear_covers_window, phi_k_evict=phi_k_evict,
                                   key_valid=key_valid, update_cache=update_cache, softmax_sinks=softmax_sinks,
                                   sinks=sinks)
    lin_window = _check(q, k, v, phi_q, phi_k, gamma, alpha, cache, mode, linear_covers_window, phi_k_evict,
                        key_valid, update_cache)
    tensors = dict(q=q, k=k, v=v, phi_q=phi_q, phi_k=phi_k, gamma=gamma, alpha=alpha, phi_k_evict=phi_k_evict,
                   **{f"cache.{f.name}": getattr(cache, f.name) for f in dataclasses.fields(cache)})
    check_runnable(**{name: t for name, t in tensors.items() if t is not None})
    dtype = compute_dtype(q)
    B, H, _, DK = q.shape
    Hkv, W1, DV = cache.k_win.shape[1], cache.k_win.shape[2], cache.v_win.shape[-1]
    Fd = cache.S.shape[2]
    dev = q.device
    new_valid = (torch.ones(B, dtype=torch.int8, device=dev) if key_valid is None
                 else key_valid.reshape(B).to(device=dev, dtype=torch.int8))
    y = torch.empty(B, H, 1, DV, dtype=dtype, device=dev)
    fkw = cache.phi_k_win
    fke = phi_k_evict.to(dtype).contiguous() if phi_k_evict is not None else phi_k
    with torch.no_grad(), device_guard(dev):
        _hybrid_decode_kernel[(B * H,)](
            q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous(), phi_q.to(dtype).contiguous(),
            phi_k.to(dtype).contiguous(), new_valid, cache.k_win, cache.v_win, cache.valid,
            fkw if fkw is not None else fke, fke, cache.S, cache.z,
            gamma.reshape(H).float().contiguous(), alpha.reshape(H).float().contiguous(), cache.position, y,
            H, Hkv, cache.window, scale * LOG2E, 0 if cache.position.numel() == 1 else 1,
            W1=W1, BW=block_size(W1, minimum=2), DK=DK, DV=DV, FD=Fd, BDK=block_size(DK, 2),
            BV=min(block_size(DV, 2), 64), BF=block_size(Fd, 2),
            HAS_WIN=mode != "linear_only", HAS_LIN=mode != "swa_only", LIN_WINDOW=lin_window,
            HAS_FKW=fkw is not None, FOLD=update_cache,
            num_warps=4,
        )
        if update_cache:
            if W1 > 0:
                cache.write_slot(cache.evict_slot(), k, v, new_valid.bool(), phi_k)
            cache.position.add_(1)
    return y
