"""Chunked PyTorch implementation of the hybrid layer: O(T * (C + w)) memory, never T x T.

Same function and conventions as `reference.hybrid_attention_reference`; this is the CPU path
and the fallback on any device. Gradients come from autograd.

Window branch: queries are cut into tiles of C (min(chunk, 16) without autograd, where the scores
are masked and exponentiated in place; min(chunk, 32) with it); tile b attends to the C + w - 1
keys [bC - w + 1, bC + C), taken as an `unfold` view, under the static band mask
r <= s <= r + w - 1. The row max over that band is exact, so there is no online rescaling.

Linear branch: L(i) = { j <= i - shift } with shift = w (hybrid) or 0 (linear_only, or
linear_covers_window). Delaying keys and values by `shift` turns it into an inclusive causal
linear attention, computed as a scan over query blocks: each block reads the running state of
the keys before its reach, adds an intra-block masked product, then folds its keys in.

Softmax sinks (`softmax_sinks` = n > 0, SPEC §2): the sink keys leave the linear branch (their
validity is cleared there, so neither the intra-block terms nor the running state hold them), and
the sinks that lie outside a query's band (j <= i - w, plus those before key 0, `prefix_sinks`)
join its window softmax as at most n + S extra keys per query, in the same exact row max: O(T * n)
extra work, never T x T.

A few queries at the end of many keys (Tq <= chunk < Tk: a cached decode step) take a direct
path (`_few_queries`) that touches only the keys each query can reach, instead of padding the
queries to Tk and throwing all but the last Tq rows away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import KERNEL_MODES, check_softmax_sinks, expand_kv_heads, softmax_sink_mask


def _first_true(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, count] of the first `count` True entries of each row of `mask` [B, T] (in order;
    0 where a row has fewer) and whether each is one: O(T), no sort."""
    B, T = mask.shape
    rank = mask.long().cumsum(1) - 1
    take = mask & (rank < count)
    out = torch.zeros(B, count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(1, torch.where(take, rank, torch.full_like(rank, count)),
                 torch.arange(T, device=mask.device).expand(B, T).contiguous())
    found = torch.arange(count, device=mask.device)[None] < take.long().sum(1, keepdim=True)
    return out[:, :count] * found, found


def _sink_keys(k, v, is_sink, softmax_sinks, prefix_sinks, window):
    """The extra softmax keys of the sinks: (k [B,Hkv,E,D], v [B,Hkv,E,Dv], pos [B,E], valid [B,E]),
    the prefix sinks first (pos = -window: every query i >= 0 sees them), then the sinks among the
    keys (pos = their index). A query i takes an extra key where valid and pos <= i - window, so a
    sink inside its band is counted there only."""
    idx, found = _first_true(is_sink, min(softmax_sinks, k.shape[2]))
    gk = idx[:, None, :, None]
    ek = k.gather(2, gk.expand(-1, k.shape[1], -1, k.shape[-1]))
    ev = v.gather(2, gk.expand(-1, v.shape[1], -1, v.shape[-1]))
    pos, valid = idx, found
    if prefix_sinks is not None:
        pk, pv, pvalid = prefix_sinks
        ek, ev = torch.cat([pk.to(k.dtype), ek], 2), torch.cat([pv.to(v.dtype), ev], 2)
        pos = torch.cat([torch.full_like(pvalid, -window, dtype=torch.long), pos], 1)
        valid = torch.cat([pvalid.bool(), valid], 1)
    return ek, ev, pos, valid


#: query tile of the window branch on the torch path: its scores are [tile, tile + w - 1] per tile,
#: so a tile below the scan chunk wastes fewer masked scores. Any tile gives the same function.
#: Measured on the dev machine (AMD EPYC, H = 9, Hkv = 3, D = 64, w = 64, T = 2048, chunk 64): the
#: window branch without autograd 58 -> 33 ms on 1 thread (tile 16, in place), the whole hybrid
#: op 123 -> 82 ms on random contiguous inputs, 97 -> 86 ms on the strided q/k/v of a SmolLM2-shaped
#: model (about 3% of its forward); with autograd, forward + backward 146 -> 113 ms (tile 32).
WINDOW_TILE_INFERENCE = 16
WINDOW_TILE_AUTOGRAD = 32


def _window_branch(q, k, v, key_valid, window, scale, chunk, extra=None):
    """Returns unnormalised numerator [B,H,T,D] and denominator [B,H,T] of the window softmax
    (without gamma), queries aligned with keys (T == Tk). `extra`: the sinks' extra keys
    (`_sink_keys`), in the same softmax. Queries go in tiles of min(chunk, WINDOW_TILE_*)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad and extra is None:
        return _window_branch_inference(q, k, v, key_valid, window, scale, min(chunk, WINDOW_TILE_INFERENCE))
    chunk = min(chunk, WINDOW_TILE_AUTOGRAD)
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    kb, vb, vbl, band, n, L, pad_end = _window_tiles(k, v, key_valid, window, chunk, T)
    # the g query heads of a KV group become rows of one block matmul against their shared keys:
    # the keys are never expanded per query head
    qb = F.pad(q, (0, 0, 0, pad_end)).view(B, Hkv, g, n, chunk, D).transpose(2, 3)  # [B,Hkv,n,g,C,D]
    s = scale * torch.matmul(qb.reshape(B, Hkv, n, g * chunk, D), kb)  # [B,Hkv,n,g*C,L]
    mask = band[None, None, None, None] & vbl[:, None, :, None, None, :]  # [B,1,n,1,C,L]
    s = s.view(B, Hkv, n, g, chunk, L).masked_fill(~mask, float("-inf"))
    if extra is not None:  # the sinks outside the band: E more keys per query, one row max
        ek, ev, epos, evalid = extra
        E = ek.shape[2]
        se = scale * torch.matmul(qb.reshape(B, Hkv, n, g * chunk, D), ek.transpose(-1, -2)[:, :, None])
        qi = (torch.arange(n, device=q.device)[:, None] * chunk + torch.arange(chunk, device=q.device)[None])  # [n,C]
        ok = evalid[:, None, None, :] & (epos[:, None, None, :] <= qi[None, :, :, None] - window)  # [B,n,C,E]
        se = se.view(B, Hkv, n, g, chunk, E).masked_fill(~ok[:, None, :, None], float("-inf"))
        s = torch.cat([s, se], -1)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    if extra is not None:
        pe, p_band = p[..., L:], p[..., :L]
        num = torch.matmul(p_band.reshape(B, Hkv, n, g * chunk, L), vb)
        num = num + torch.matmul(pe.reshape(B, Hkv, n, g * chunk, E), ev[:, :, None])
    else:
        num = torch.matmul(p.view(B, Hkv, n, g * chunk, L), vb)  # [B,Hkv,n,g*C,D]
    den = p.sum(-1)  # [B,Hkv,n,g,C]
    num = num.view(B, Hkv, n, g, chunk, -1).transpose(2, 3).reshape(B, H, n * chunk, -1)[:, :, :T]
    den = den.transpose(2, 3).reshape(B, H, n * chunk)[:, :, :T]
    return num, den


def _window_tiles(k, v, key_valid, window, chunk, T):
    """The padded key/value tiles of the window branch as unfold views: keys [B,Hkv,n,D,L], values
    [B,Hkv,n,L,D], validity [B,n,L], and the static band [C,L] (L = chunk + W - 1)."""
    W = min(window, T)
    n = -(-T // chunk)
    L = chunk + W - 1
    pad_end = n * chunk - T
    kb = F.pad(k, (0, 0, W - 1, pad_end)).unfold(2, L, chunk)
    vb = F.pad(v, (0, 0, W - 1, pad_end)).unfold(2, L, chunk).transpose(-1, -2)
    vbl = F.pad(key_valid, (W - 1, pad_end), value=False).unfold(1, L, chunk)
    r = torch.arange(chunk, device=k.device)[:, None]
    c = torch.arange(L, device=k.device)[None, :]
    return kb, vb, vbl, (c >= r) & (c <= r + W - 1), n, L, pad_end


def _window_branch_inference(q, k, v, key_valid, window, scale, chunk, group: int = 64):
    """`_window_branch` without autograd: the same arithmetic with the scores masked, shifted and
    exponentiated in place, `group` tiles at a time (temporaries stay small)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    kb, vb, vbl, band, n, L, pad_end = _window_tiles(k, v, key_valid, window, chunk, T)
    qb = F.pad(q * scale, (0, 0, 0, pad_end)).view(B, Hkv, g, n, chunk, D).transpose(2, 3)  # [B,Hkv,n,g,C,D]
    masked = ~(band[None, None, None, None] & vbl[:, None, :, None, None, :])  # [B,1,n,1,C,L]
    num = q.new_empty(B, Hkv, g, n, chunk, v.shape[-1])
    den = q.new_empty(B, Hkv, g, n, chunk)
    for a in range(0, n, group):
        e = min(n, a + group)
        s = torch.matmul(qb[:, :, a:e].reshape(B, Hkv, e - a, g * chunk, D), kb[:, :, a:e])
        s = s.view(B, Hkv, e - a, g, chunk, L).masked_fill_(masked[:, :, a:e], float("-inf"))
        p = s.sub_(s.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)).exp_()  # a fully masked row: all 0
        o = torch.matmul(p.view(B, Hkv, e - a, g * chunk, L), vb[:, :, a:e])
        num[:, :, :, a:e] = o.view(B, Hkv, e - a, g, chunk, -1).transpose(2, 3)
        den[:, :, :, a:e] = p.sum(-1).transpose(2, 3)
    return num.view(B, H, n * chunk, -1)[:, :, :T], den.view(B, H, n * chunk)[:, :, :T]


def _state_readout(phi_q, initial_state, D):
    """Numerator [B,H,T,D] and denominator [B,H,T] of phi_q read against the initial state (zeros
    without one): the part of the linear branch that covers every token before key 0."""
    B, H, T, _ = phi_q.shape
    num = phi_q.new_zeros(B, H, T, D)
    den = phi_q.new_zeros(B, H, T)
    if initial_state is not None:
        S0, z0 = initial_state
        num = num + phi_q @ S0.to(phi_q.dtype)
        den = den + (phi_q * z0.to(phi_q.dtype)[:, :, None, :]).sum(-1)
    return num, den


def _linear_branch(phi_q, phi_k, v, key_valid, shift, chunk, initial_state):
    """Inclusive causal linear attention of phi_q against keys delayed by `shift`, with the
    initial state as prefix. Returns numerator [B,H,T,D] and denominator [B,H,T] (without alpha).

    A scan over query blocks of `chunk`: block [s, e) reads the running state (S, z) of every key
    j < s - shift, adds its masked product with the keys [s - shift, e - shift) (j <= i - shift),
    then folds those keys into the state. No per-block state is materialised and no prefix sum
    over blocks is taken (the scan is the prefix sum): the same FLOPs as the prefix-sum form,
    about half the time on CPU (no strided cumsum over [B,H,n,F,D] and its temporaries)."""
    B, H, T, Fd = phi_q.shape
    D = v.shape[-1]
    fk = phi_k * key_valid[:, None, :, None].to(phi_k.dtype)
    if initial_state is not None:
        S, z = (t.to(phi_q.dtype) for t in initial_state)
    else:
        S, z = phi_q.new_zeros(B, H, Fd, D), phi_q.new_zeros(B, H, Fd)
    num = phi_q.new_empty(B, H, T, D)
    den = phi_q.new_empty(B, H, T)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        fq = phi_q[:, :, s:e]
        num_b = fq @ S
        den_b = (fq @ z.unsqueeze(-1)).squeeze(-1)
        lo, hi = max(s - shift, 0), e - shift  # the keys this block reaches beyond the state
        if hi > 0:
            fkb, vb = fk[:, :, lo:hi], expand_kv_heads(v[:, :, lo:hi], H)
            r = torch.arange(s, e, device=fq.device)[:, None]
            c = torch.arange(lo, hi, device=fq.device)[None, :]
            a = (fq @ fkb.transpose(-1, -2)).masked_fill(c > r - shift, 0.0)  # [B,H,e-s,hi-lo]
            num_b = num_b + a @ vb
            den_b = den_b + a.sum(-1)
            S = S + fkb.transpose(-1, -2) @ vb  # out of place: autograd keeps each block's state
            z = z + fkb.sum(-2)
        num[:, :, s:e] = num_b
        den[:, :, s:e] = den_b
    return num, den


def _few_queries(q, k, v, phi_q, phi_k, key_valid, window, scale, mode, shift, initial_state, extra=None,
                 lin_valid=None):
    """Direct computation for the last Tq <= chunk queries of Tk keys (cached decode, or the
    full-history DynamicCache path): only the keys a query can reach are touched, O(Tq * (Tq + w))
    for the window and O(Tq * Tk) for the linear part, instead of padding the queries to Tk.
    Returns the window numerator/denominator (or None) and the linear ones (or None), unweighted.
    `extra`: the sinks' extra softmax keys (`_sink_keys`); `lin_valid`: the linear branch's key
    validity (key_valid less the sinks; default key_valid)."""
    lin_valid = key_valid if lin_valid is None else lin_valid
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    Hkv = k.shape[1]
    g = H // Hkv
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)
    win = lin = None
    if mode != "linear_only":
        start = max(0, Tk - Tq - (window - 1))  # oldest key any of the queries can see
        ks, vs = k[:, :, start:], v[:, :, start:]
        diff = qpos[:, None] - torch.arange(start, Tk, device=q.device)[None, :]
        mask = (diff >= 0) & (diff < window)  # [Tq, Tk']
        mask = mask[None, None, None] & key_valid[:, start:][:, None, None, None, :]  # [B,1,1,Tq,Tk']
        # the g query heads of a group are rows of one matmul against their shared keys (no expand)
        s = scale * torch.matmul(q.reshape(B, Hkv, g * Tq, D), ks.transpose(-1, -2))  # [B,Hkv,g*Tq,Tk']
        s = s.view(B, Hkv, g, Tq, -1).masked_fill(~mask, float("-inf"))
        nk = s.shape[-1]
        if extra is not None:  # the sinks outside each query's band, in the same row max
            ek, ev, epos, evalid = extra
            se = scale * torch.matmul(q.reshape(B, Hkv, g * Tq, D), ek.transpose(-1, -2))  # [B,Hkv,g*Tq,E]
            ok = evalid[:, None, :] & (epos[:, None, :] <= qpos[None, :, None] - window)  # [B,Tq,E]
            se = se.view(B, Hkv, g, Tq, -1).masked_fill(~ok[:, None, None], float("-inf"))
            s = torch.cat([s, se], -1)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        if extra is not None:
            num = torch.matmul(p[..., :nk].reshape(B, Hkv, g * Tq, nk), vs)
            num = num + torch.matmul(p[..., nk:].reshape(B, Hkv, g * Tq, -1), ev)
        else:
            num = torch.matmul(p.view(B, Hkv, g * Tq, -1), vs)  # [B,Hkv,g*Tq,D]
        win = (num.reshape(B, H, Tq, -1), p.sum(-1).reshape(B, H, Tq))
    if mode != "swa_only":
        num, den = _state_readout(phi_q, initial_state, v.shape[-1])
        end = Tk - shift  # keys j <= i - shift exist for some query only if j < end
        if end > 0:
            diff = qpos[:, None] - torch.arange(end, device=q.device)[None, :]
            mask = (diff >= shift)[None, None] & lin_valid[:, None, None, :end]  # [B,1,Tq,end]
            a = (phi_q @ phi_k[:, :, :end].transpose(-1, -2)).masked_fill(~mask, 0.0)  # [B,H,Tq,end]
            num = num + a @ expand_kv_heads(v[:, :, :end], H)
            den = den + a.sum(-1)
        lin = (num, den)
    return win, lin


def hybrid_attention_chunked(
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
    softmax_sinks: int = 0,
    prefix_sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """Chunked hybrid attention; see module docstring and `reference.py` for the contract
    (softmax_sinks / prefix_sinks as there).

    Computes in at least float32 (the state is always fp32) and returns y in q's dtype."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode must be one of {KERNEL_MODES}, got {mode!r}")
    check_softmax_sinks(q, k, v, softmax_sinks, prefix_sinks)
    out_dtype = q.dtype
    cdt = torch.promote_types(q.dtype, torch.float32)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    phi_q, phi_k = phi_q.to(cdt), phi_k.to(cdt)
    if key_valid is None:
        key_valid = torch.ones(B, Tk, dtype=torch.bool, device=q.device)
    key_valid = key_valid.bool()
    chunk = max(1, min(chunk_size, Tk))
    g4 = gamma.to(cdt).view(1, H, 1, 1)
    a4 = alpha.to(cdt).view(1, H, 1, 1)
    shift = 0 if (mode == "linear_only" or linear_covers_window) else window
    extra, lin_valid = None, key_valid
    if softmax_sinks:
        is_sink = softmax_sink_mask(key_valid, softmax_sinks, None if prefix_sinks is None else prefix_sinks[2])
        lin_valid = key_valid & ~is_sink
        if mode != "linear_only":
            if prefix_sinks is not None:
                prefix_sinks = (prefix_sinks[0].to(cdt), prefix_sinks[1].to(cdt), prefix_sinks[2])
            extra = _sink_keys(k, v, is_sink, softmax_sinks, prefix_sinks, window)
    if Tq < Tk and Tq <= chunk:  # a few queries at the end (cached decode): no padding to Tk
        win, lin = _few_queries(q, k, v, phi_q, phi_k, key_valid, window, scale, mode, shift, initial_state,
                                extra=extra, lin_valid=lin_valid)
    else:
        if Tq < Tk:  # queries are the last Tq positions: pad them to the key length
            q = F.pad(q, (0, 0, Tk - Tq, 0))
            phi_q = F.pad(phi_q, (0, 0, Tk - Tq, 0))
        win = _window_branch(q, k, v, key_valid, window, scale, chunk, extra) if mode != "linear_only" else None
        lin = _linear_branch(phi_q, phi_k, v, lin_valid, shift, chunk, initial_state) if mode != "swa_only" else None
        win, lin = ((b[0][:, :, Tk - Tq :], b[1][:, :, Tk - Tq :]) if b is not None else None for b in (win, lin))

    num = q.new_zeros(B, H, Tq, v.shape[-1])
    den = q.new_zeros(B, H, Tq)
    lin_den = torch.zeros_like(den)
    if win is not None:
        num, den = num + g4 * win[0], den + g4[..., 0] * win[1]
    if lin is not None:
        lin_den = a4[..., 0] * lin[1]
        num, den = num + a4 * lin[0], den + lin_den
    safe = torch.where(den != 0, den, torch.ones_like(den))
    y = torch.where((den != 0)[..., None], num / safe[..., None], torch.zeros_like(num)).to(out_dtype)
    if return_stats:
        return y, lin_den, den
    return y
