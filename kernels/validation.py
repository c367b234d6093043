"""Input validation shared by every backend: one clear error, naming the argument, per malformed input."""

from __future__ import annotations

import math

import torch

from .reference import KERNEL_MODES

_CHECK_FINITE = True


def set_input_checks(enabled: bool) -> None:
    """Turn the NaN/Inf check of q, k, v (one reduction and a host sync per call) on or off.
    On by default (bad input gets a clear error, not a silent NaN output); switch it off where the
    sync matters more than the check. Shape, dtype and device checks always run."""
    global _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)


def validate_inputs(q, k, v, phi_q, phi_k, gamma, alpha, *, window, mode, key_valid=None, initial_state=None, **_):
    """One clear error, naming the argument, for every malformed input."""
    for name, t in (("q", q), ("k", k), ("v", v), ("phi_q", phi_q), ("phi_k", phi_k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, seq, dim], got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or v.shape[:3] != k.shape[:3] or Dk != D:
        raise ValueError(f"k, v: expected [batch={B}, kv_heads, seq, {D}] with matching v, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"k: number of kv heads ({Hkv}) must divide the number of query heads ({H})")
    if Tk < Tq:
        raise ValueError(f"k: key length {Tk} must be >= query length {Tq} (queries are the last positions)")
    if phi_q.shape[:3] != (B, H, Tq):
        raise ValueError(f"phi_q: expected shape [{B}, {H}, {Tq}, F], got {tuple(phi_q.shape)}")
    if phi_k.shape[:3] != (B, H, Tk) or phi_k.shape[-1] != phi_q.shape[-1]:
        raise ValueError(f"phi_k: expected shape [{B}, {H}, {Tk}, {phi_q.shape[-1]}], got {tuple(phi_k.shape)}")
    for name, t in (("gamma", gamma), ("alpha", alpha)):
        if not isinstance(t, torch.Tensor) or t.shape != (H,):
            raise ValueError(f"{name}: expected a tensor of shape [{H}] (one per query head), got {getattr(t, 'shape', t)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an integer >= 1, got {window!r}")
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode: expected one of {KERNEL_MODES}, got {mode!r}")
    if key_valid is not None and (key_valid.shape != (B, Tk) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid: expected a bool tensor of shape [{B}, {Tk}], got {key_valid.dtype} {tuple(key_valid.shape)}")
    if initial_state is not None:
        S, z = initial_state
        Fd, Dv = phi_q.shape[-1], v.shape[-1]
        if S.shape != (B, H, Fd, Dv) or z.shape != (B, H, Fd):
            raise ValueError(f"initial_state: expected S [{B}, {H}, {Fd}, {Dv}] and z [{B}, {H}, {Fd}], got {tuple(S.shape)}, {tuple(z.shape)}")
    if _CHECK_FINITE and not torch.compiler.is_compiling():
        check_finite(q=q, k=k, v=v)


def check_finite(**tensors: torch.Tensor) -> None:
    """ValueError naming the first of `tensors` that holds a NaN or an Inf.

    One reduction per tensor and one host sync in all: a NaN or an Inf anywhere makes the fp32 sum
    of the sums non-finite (NaN propagates; +Inf with -Inf gives NaN). A sum that overflows finite
    values is only a false alarm of this fast test, so the exact per-tensor test then decides."""
    total = None
    for t in tensors.values():
        part = t.sum(dtype=torch.float32)
        total = part if total is None else total + part
    if total is None or math.isfinite(total.item()):
        return
    for name, t in tensors.items():  # the error path only
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
