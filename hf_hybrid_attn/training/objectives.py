"""Stage-1 objectives (SPEC §3): pure functions on tensors, no transformers.

Shapes follow the attention function: q [B, H, T, D], k/v [B, Hkv, T, D] (after RoPE), outputs
y [B, H, T, D] *before* o_proj, feature maps phi_q/phi_k [B, H, T, F'] (phi_k already per query
head, as `HybridMixer.features` returns it), key_valid [B, T] bool (padding = False).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..kernels import expand_kv_heads

#: Objectives selectable in stage 1 (weights are given per name).
OBJECTIVES = ("output_mse_hybrid", "output_mse_linear", "attn_ce")


def output_mse(y_student: torch.Tensor, y_teacher: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over valid query positions (and every head and channel).

    y_* [B, H, T, D] before o_proj; valid [B, T] bool (None = all). Padded positions count for
    nothing, so the value does not depend on how much padding a batch has."""
    if y_student.shape != y_teacher.shape or y_student.dim() != 4:
        raise ValueError(
            f"y_student, y_teacher: expected two tensors of one shape [B, H, T, D], got "
            f"{tuple(y_student.shape)} and {tuple(y_teacher.shape)}"
        )
    diff = (y_student.float() - y_teacher.float()).pow(2)
    if valid is None:
        return diff.mean()
    B, H, T, D = diff.shape
    if valid.shape != (B, T):
        raise ValueError(f"valid: expected a bool tensor of shape [{B}, {T}], got {tuple(valid.shape)}")
    m = valid[:, None, :, None].to(diff.dtype)
    return (diff * m).sum() / (m.sum() * H * D).clamp_min(1.0)


def _chunk_ce_sum(q_c, k_pre, phi_q_c, phi_k_pre, log_den_c, allowed_keys, query_weight_c, row0, scale, eps):
    """Sum over one query chunk of CE_i = log den_i - sum_j A_ij log(phi_q_i . phi_k_j).

    (Since the teacher weights A_i sum to 1, the student normaliser comes out of the sum.)"""
    c, n_keys = q_c.shape[2], k_pre.shape[2]
    rows = torch.arange(row0, row0 + c, device=q_c.device)[:, None]
    causal = rows >= torch.arange(n_keys, device=q_c.device)[None, :]
    mask = causal[None, None] & allowed_keys[:, None, None, :]  # [B,1,c,n]
    with torch.no_grad():  # the teacher's softmax weights are a target
        scores = scale * torch.matmul(q_c, k_pre.transpose(-1, -2))
        scores = scores.masked_fill(~mask, float("-inf"))
        teacher = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key (padding) -> 0
    num = torch.matmul(phi_q_c, phi_k_pre.transpose(-1, -2))
    # log_num is finite everywhere (clamped) and the teacher weight of every masked key is exactly 0,
    # so masked keys add exactly 0 to the sum and to its gradient: no masking pass is needed
    log_num = torch.log(num.clamp_min(eps))
    ce = log_den_c - (teacher * log_num).sum(-1)  # [B,H,c]
    return (ce * query_weight_c[:, None, :]).sum()


def attn_ce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    chunk_size: int = 256,
    eps: float = 1e-12,
    recompute_budget: int = 2**24,
) -> torch.Tensor:
    """Hedgehog attention-weight cross-entropy over the full causal prefix (SPEC §3, `attn_ce`).

    Teacher A_ij = softmax_j(scale q_i.k_j) over valid j <= i (GQA: k has Hkv heads, q has H).
    Student P_ij = phi_q_i.phi_k_j / phi_q_i.(sum_{valid j' <= i} phi_k_j'), the linear_only weights.
    Returns the mean over heads and valid queries of -sum_j A_ij log P_ij.

    Queries are processed in chunks of `chunk_size` against their causal prefix only (about half
    the T x T products). When the whole weight matrix [B, H, T, T] has more than `recompute_budget`
    elements (default 2^24, 64 MiB in fp32), each chunk is recomputed in the backward (activation
    checkpointing), so memory is O(T * chunk) instead of O(T^2); at or below it (stage 1 at seq 512:
    9 heads x 512^2 = 2.4M) the chunks are kept for the backward, which saves the recompute. The
    teacher weights are computed without gradient (q and k are the frozen teacher's)."""
    if q.dim() != 4 or k.dim() != 4 or phi_q.dim() != 4 or phi_k.dim() != 4:
        raise ValueError("q, k, phi_q, phi_k: expected 4-D tensors [batch, heads, seq, dim]")
    B, H, T, _ = q.shape
    if k.shape[0] != B or k.shape[2] != T or H % k.shape[1] != 0:
        raise ValueError(f"k: expected [{B}, Hkv dividing {H}, {T}, D], got {tuple(k.shape)}")
    if phi_q.shape[:3] != (B, H, T) or phi_k.shape[:3] != (B, H, T) or phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(
            f"phi_q, phi_k: expected [{B}, {H}, {T}, F] each (phi_k per query head), got "
            f"{tuple(phi_q.shape)} and {tuple(phi_k.shape)}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
    if isinstance(recompute_budget, bool) or not isinstance(recompute_budget, int) or recompute_budget < 0:
        raise ValueError(f"recompute_budget: expected an integer >= 0 (elements), got {recompute_budget!r}")
    if key_valid is None:
        key_valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
    if key_valid.shape != (B, T) or key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid: expected a bool tensor of shape [{B}, {T}], got {key_valid.dtype} {tuple(key_valid.shape)}")

    work = torch.promote_types(q.dtype, torch.float32)  # at least fp32 for logs and prefix sums
    q, phi_q, phi_k = q.to(work), phi_q.to(work), phi_k.to(work)
    k = expand_kv_heads(k.to(work), H)
    vk = key_valid[:, None, :, None].to(work)
    z = torch.cumsum(phi_k * vk, dim=2)  # [B,H,T,F]: sum of phi_k over the valid causal prefix
    log_den = torch.log((phi_q * z).sum(-1).clamp_min(eps))  # [B,H,T]
    query_weight = key_valid.to(work)
    n_queries = query_weight.sum() * H

    total = q.new_zeros(())
    needs_grad = torch.is_grad_enabled() and (phi_q.requires_grad or phi_k.requires_grad)
    recompute = needs_grad and B * H * T * T > recompute_budget
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        args = (
            q[:, :, start:stop], k[:, :, :stop], phi_q[:, :, start:stop], phi_k[:, :, :stop],
            log_den[:, :, start:stop], key_valid[:, :stop], query_weight[:, start:stop], start, scale, eps,
        )
        if recompute and stop - start < T:
            total = total + checkpoint(_chunk_ce_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(*args)
    return total / n_queries.clamp_min(1.0)
