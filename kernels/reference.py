"""Readable quadratic reference for the hybrid layer (SPEC §2). float64-safe; O(T^2) memory.

This file is the definition every other implementation (chunked PyTorch, Triton) is tested
against. It computes, for one head, query i, window w and scale s:

    W(i) = { j : i-w < j <= i }        the softmax window (w keys, i itself included)
    L(i) = { j : j <= i-w }            the linear part (or { j <= i } with linear_covers_window)
    c_i  = max_{j in W(i)} s q_i.k_j   exact row max over the window (gradient flows through it)
    N_i  = g_h sum_W exp(s q.k - c_i) v_j + a_h phi_q(q_i) . sum_L phi_k(k_j) v_j
    D_i  = g_h sum_W exp(s q.k - c_i)     + a_h phi_q(q_i) . sum_L phi_k(k_j)
    y_i  = N_i / D_i                        (0 where D_i == 0, e.g. a row with no valid key)

Conventions shared by all implementations:
  q      [B, H, Tq, D]     queries, after RoPE
  k, v   [B, Hkv, Tk, D]   keys/values, Tk >= Tq; the queries are the *last* Tq positions
  phi_q  [B, H, Tq, F]     feature map of q (per query head)
  phi_k  [B, H, Tk, F]     feature map of k (per query head, LoLCATs-compatible with GQA)
  gamma  [H]               window weight (sigmoid of the window logit)
  alpha  [H]               linear weight (1, or 1-gamma with affine mixing)
  key_valid [B, Tk] bool   False for padded keys: they take part in neither branch
  initial_state (S [B,H,F,D], z [B,H,F]) fp32 sums of phi_k v^T and phi_k over every token
                           *before* key 0 (the cache); read by the linear branch only.
Modes handled here: "hybrid", "swa_only", "linear_only". ("sinks_only" and "none" do not use the
linear state and live in `sinks_attention` / the attention function.)

Softmax sinks (SPEC §2, "Softmax sinks"; optional, off by default):
  softmax_sinks  n >= 0        the first n valid keys of the sequence (the set Sigma) are always in
                               the softmax (W'(i) = W(i) + {j in Sigma, j <= i}) and in no linear
                               sum (L'(i) = L(i) - Sigma); the state never holds them
  prefix_sinks   (k [B,Hkv,S,D], v [B,Hkv,S,D], valid [B,S] bool) or None: the sinks among the
                               tokens *before* key 0 (with initial_state; all of them are outside
                               every query's window and before it); the sinks among this call's
                               keys are then its first n - (valid prefix sinks) valid keys
"""

from __future__ import annotations

import torch

KERNEL_MODES = ("hybrid", "swa_only", "linear_only")


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, num_heads, T, D]: each KV head repeated for its group of query heads (GQA)."""
    B, Hkv, T, D = x.shape
    groups = num_heads // Hkv
    # the same as repeat_interleave(groups, dim=1), in one copy (no index kernel)
    return x if groups == 1 else x.unsqueeze(2).expand(B, Hkv, groups, T, D).reshape(B, num_heads, T, D)


def softmax_sink_mask(key_valid: torch.Tensor, softmax_sinks: int,
                      prefix_valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Tk] bool: which of a call's keys are softmax sinks: the first `softmax_sinks` valid keys
    of the row, less the valid sinks already found before key 0 (`prefix_valid` [B, S])."""
    left = torch.full((key_valid.shape[0],), softmax_sinks, dtype=torch.long, device=key_valid.device)
    if prefix_valid is not None:
        left = left - prefix_valid.to(device=key_valid.device).long().sum(1)
    valid = key_valid.bool()
    return valid & (valid.long().cumsum(1) <= left[:, None])


def check_softmax_sinks(q, k, v, softmax_sinks, prefix_sinks) -> None:
    """One clear error, naming the argument, for a malformed softmax_sinks / prefix_sinks."""
    if isinstance(softmax_sinks, bool) or not isinstance(softmax_sinks, int) or softmax_sinks < 0:
        raise ValueError(f"softmax_sinks: expected an integer >= 0, got {softmax_sinks!r}")
    if prefix_sinks is None:
        return
    if softmax_sinks == 0:
        raise ValueError("prefix_sinks: given with softmax_sinks=0 (no sinks); pass softmax_sinks=n")
    if not isinstance(prefix_sinks, (tuple, list)) or len(prefix_sinks) != 3:
        raise ValueError("prefix_sinks: expected a tuple (k [B, Hkv, S, D], v [B, Hkv, S, Dv], valid [B, S] bool)")
    sk, sv, sval = prefix_sinks
    B, Hkv, D, Dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    if sk.dim() != 4 or tuple(sk.shape[:2]) != (B, Hkv) or sk.shape[-1] != D:
        raise ValueError(f"prefix_sinks: k expected [{B}, {Hkv}, S, {D}], got {tuple(sk.shape)}")
    S = sk.shape[2]
    if tuple(sv.shape) != (B, Hkv, S, Dv):
        raise ValueError(f"prefix_sinks: v expected [{B}, {Hkv}, {S}, {Dv}], got {tuple(sv.shape)}")
    if tuple(sval.shape) != (B, S) or sval.dtype != torch.bool:
        raise ValueError(f"prefix_sinks: valid expected a bool tensor [{B}, {S}], got {sval.dtype} {tuple(sval.shape)}")
    for name, t in (("k", sk), ("v", sv), ("valid", sval)):
        if t.device != q.device:
            raise ValueError(f"prefix_sinks: {name} expected device {q.device}, got {t.device}")


def hybrid_attention_reference(
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
    softmax_sinks: int = 0,
    prefix_sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """Quadratic reference. Returns y [B, H, Tq, D] (and, with return_stats, the linear part of the
    normaliser and the whole normaliser, both [B, H, Tq])."""
    check_softmax_sinks(q, k, v, softmax_sinks, prefix_sinks)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    k = expand_kv_heads(k, H)
    v = expand_kv_heads(v, H)
    dev = q.device
    qpos = torch.arange(Tk - Tq, Tk, device=dev)
    kpos = torch.arange(Tk, device=dev)
    diff = qpos[:, None] - kpos[None, :]  # i - j
    causal = diff >= 0
    valid = torch.ones(B, Tk, dtype=torch.bool, device=dev) if key_valid is None else key_valid.bool()
    valid = valid[:, None, None, :]

    if mode == "linear_only":
        win_mask = None
        lin_mask = causal
    elif mode == "swa_only":
        win_mask = causal & (diff < window)
        lin_mask = None
    elif mode == "hybrid":
        win_mask = causal & (diff < window)
        lin_mask = causal if linear_covers_window else causal & (diff >= window)
    else:
        raise ValueError(f"mode must be one of {KERNEL_MODES}, got {mode!r}")

    prefix_k = prefix_v = prefix_valid = None
    if softmax_sinks:  # the sinks join every later query's softmax and leave the linear part
        if prefix_sinks is not None:
            prefix_k, prefix_v, prefix_valid = prefix_sinks
        sink = softmax_sink_mask(valid[:, 0, 0], softmax_sinks, prefix_valid)[:, None, None, :]  # [B,1,1,Tk]
        if win_mask is not None:
            win_mask = win_mask | (causal & sink)
        if lin_mask is not None:
            lin_mask = lin_mask & ~sink

    gamma = gamma.to(q.dtype).view(1, H, 1, 1)
    alpha = alpha.to(q.dtype).view(1, H, 1, 1)
    num = torch.zeros(B, H, Tq, v.shape[-1], dtype=q.dtype, device=dev)
    den = torch.zeros(B, H, Tq, dtype=q.dtype, device=dev)
    lin_den = torch.zeros_like(den)

    if win_mask is not None:
        m = win_mask & valid
        kw, vw = k, v
        if prefix_k is not None:  # the sinks before key 0: extra softmax keys every query sees
            kw = torch.cat([expand_kv_heads(prefix_k, H).to(k.dtype), k], 2)
            vw = torch.cat([expand_kv_heads(prefix_v, H).to(v.dtype), v], 2)
            m = torch.cat([prefix_valid[:, None, None, :].expand(B, 1, Tq, -1), m.expand(B, 1, Tq, Tk)], -1)
        s = scale * (q @ kw.transpose(-1, -2))
        s_masked = s.masked_fill(~m, float("-inf"))
        c = s_masked.amax(dim=-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        p = torch.exp(s_masked - c) * gamma
        num = num + p @ vw
        den = den + p.sum(-1)

    if lin_mask is not None:
        m = lin_mask & valid
        a = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~m, 0.0) * alpha
        num = num + a @ v
        ld = a.sum(-1)
        if initial_state is not None:
            S, z = initial_state
            num = num + alpha * (phi_q @ S.to(q.dtype))
            ld = ld + alpha[..., 0] * (phi_q @ z.to(q.dtype).unsqueeze(-1)).squeeze(-1)
        den = den + ld
        lin_den = ld

    safe = torch.where(den != 0, den, torch.ones_like(den))
    y = torch.where((den != 0)[..., None], num / safe[..., None], torch.zeros_like(num))
    if return_stats:
        return y, lin_den, den
    return y


def sinks_attention(
    q: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    sink_pos: torch.Tensor,
    query_pos: torch.Tensor,
    *,
    scale: float,
    sink_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sinks_only` mode: softmax over the first `num_sinks` valid keys j <= i.

    q [B,H,Tq,D]; sink_k/v [B,Hkv,S,D] (already gathered); sink_pos [B,S] their absolute positions;
    query_pos [Tq] or [B,Tq] absolute query positions; sink_valid [B,S]. O(T * num_sinks)."""
    H = q.shape[1]
    sk = expand_kv_heads(sink_k, H)
    sv = expand_kv_heads(sink_v, H)
    s = scale * (q @ sk.transpose(-1, -2))  # [B,H,Tq,S]
    if query_pos.dim() == 1:
        query_pos = query_pos[None].expand(q.shape[0], -1)
    allowed = sink_pos[:, None, :] <= query_pos[:, :, None]  # [B,Tq,S]
    if sink_valid is not None:
        allowed = allowed & sink_valid[:, None, :].bool()
    allowed = allowed[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    c = s.amax(-1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    p = torch.exp(s - c)
    den = p.sum(-1, keepdim=True)
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, (p @ sv) / safe, torch.zeros_like(q[..., : sv.shape[-1]]))


def linear_state(
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    end: int,
    key_valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold keys [0, end) into the fp32 recurrent state: S += sum phi_k v^T, z += sum phi_k.

    phi_k [B,H,Tk,F], v [B,Hkv,Tk,D]. Padded keys are skipped."""
    B, H, Tk, F = phi_k.shape
    end = max(0, min(end, Tk))
    fk = phi_k[:, :, :end].float()
    vv = expand_kv_heads(v, H)[:, :, :end].float()
    if key_valid is not None:
        fk = fk * key_valid[:, None, :end, None].to(fk.dtype)
    S = fk.transpose(-1, -2) @ vv
    z = fk.sum(2)
    if initial_state is not None:
        S = S + initial_state[0].float()
        z = z + initial_state[1].float()
    return S, z
