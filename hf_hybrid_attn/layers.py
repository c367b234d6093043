"""`HybridMixer`: the parameters and run-time state that turn one softmax attention layer hybrid.

It is attached to each converted attention module as `module.hybrid` and called by the registered
attention function. PEFT's `modules_to_save=["hybrid"]` wraps it and routes calls to the active
copy, which is why all the computation happens in `HybridMixer.forward` (SPEC §2).

(This file must not define a class named `*Attention*(nn.Module)`; see HF_NOTES.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import COMPONENT_MODES, HybridConfig
from .feature_maps import build_feature_map
from .kernels import expand_kv_heads, hybrid_attention, sinks_attention, validate_inputs
from .kernels.dispatch import resolve_backend


def first_valid(valid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, count] of the first `count` True entries of each row of `valid` [B, T] (in order),
    and whether each index really is a valid one."""
    T = valid.shape[1]
    count = min(count, T)
    order = torch.arange(T, device=valid.device)
    key = (~valid).long() * T + order  # valid positions first, in order
    idx = key.argsort(dim=1)[:, :count]
    return idx, valid.gather(1, idx)


def sink_candidates(k, v, key_valid, n_old: int, offset: int, num_sinks: int, cached=None):
    """Sink candidates for the `sinks_only` mode: the first `num_sinks` valid keys among the new
    tokens k[:, :, n_old:] (absolute positions from `offset`, the position of k's first token),
    after the `cached` ones (k, v, positions [B,S], valid [B,S]) when a cache holds earlier sinks.
    Returns (k, v, positions, valid), cached entries first, each group in order: the sinks are the
    first `num_sinks` valid entries."""
    idx, idx_valid = first_valid(key_valid[:, n_old:], num_sinks)
    gather = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1]) + n_old
    sk, sv, spos = k.gather(2, gather), v.gather(2, gather), idx + offset + n_old
    if cached is not None:
        ck, cv, cpos, cvalid = cached
        sk, sv = torch.cat([ck, sk], 2), torch.cat([cv, sv], 2)
        spos, idx_valid = torch.cat([cpos, spos], 1), torch.cat([cvalid, idx_valid], 1)
    return sk, sv, spos, idx_valid


class HybridMixer(nn.Module):
    """Feature maps, window logits and mode of one converted layer.

    Attributes set at run time (not saved):
      mode           one of COMPONENT_MODES
      window         the softmax window this layer uses: min(w, teacher_window) (SSD may schedule w)
      teacher_window the teacher's own sliding window on this layer (None: a global layer); the
                     softmax branch never reaches further back than the teacher did (SPEC §2)
      swa_drop       None, or a bool tensor [B]: rows that run `linear_only` (SSD, sample granularity)
      transfer_hook  None, or callable(module, q, k, v, key_valid, scaling) -> [B, T, H, D]; when set
                     the attention function returns its result (stage-1 attention transfer)
    """

    def __init__(self, config: HybridConfig, num_heads: int, num_kv_heads: int, head_dim: int,
                 teacher_window: int | None = None):
        super().__init__()
        if teacher_window is not None and (isinstance(teacher_window, bool) or not isinstance(teacher_window, int)
                                           or teacher_window < 1):
            raise ValueError(f"teacher_window must be None or an integer >= 1, got {teacher_window!r}")
        self.teacher_window = teacher_window
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.feature_map_name = config.feature_map
        self.feature_map_q = build_feature_map(config.feature_map, num_heads, head_dim, config.feature_dim)
        self.feature_map_k = build_feature_map(config.feature_map, num_heads, head_dim, config.feature_dim)
        self.window_logit = nn.Parameter(torch.full((num_heads,), config.init_window_logit))
        self.init_window_logit = config.init_window_logit
        self.affine_mix = config.affine_mix
        self.linear_covers_window = config.linear_covers_window
        self.num_sinks = config.num_sinks
        self.backend = config.backend
        self.chunk_size = config.chunk_size
        self.window = config.window
        self.mode = config.component_mode
        self.swa_drop: torch.Tensor | None = None
        self.transfer_hook = None

    @property
    def window(self) -> int:
        w = self._window
        return w if self.teacher_window is None else min(w, self.teacher_window)

    @window.setter
    def window(self, value: int) -> None:
        self._window = value

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC initialisation: identity-like feature maps, gamma = init_window_gamma."""
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()
        self.window_logit.fill_(self.init_window_logit)

    def extra_repr(self) -> str:
        tw = "" if self.teacher_window is None else f", teacher_window={self.teacher_window}"
        return f"mode={self.mode!r}, window={self.window}{tw}, feature_map={self.feature_map_name!r}"

    # -- mixing factors -------------------------------------------------------------------------
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.window_logit.float())

    def alpha(self) -> torch.Tensor:
        return 1.0 - self.gamma() if self.affine_mix else torch.ones_like(self.window_logit, dtype=torch.float32)

    def features(self, q: torch.Tensor, k: torch.Tensor, cache_layer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_q(q) [B,H,Tq,F'] and phi_k(k) per query head [B,H,Tk,F'].

        With a cache, k = (window buffer + new tokens) and the buffer's phi_k was stored by the
        previous step: only the new tokens go through the feature map (without grad: with grad the
        buffer is mapped again, so the feature map gets its gradient through those keys too)."""
        n_old = k.shape[2] - q.shape[2]
        reuse = cache_layer is not None and not torch.is_grad_enabled()
        buffered = cache_layer.buffered_phi_k(n_old) if reuse else None
        if buffered is None:
            return self.feature_map_q(q), self.feature_map_k(expand_kv_heads(k, self.num_heads))
        phi_new = self.feature_map_k(expand_kv_heads(k[:, :, n_old:], self.num_heads))
        return self.feature_map_q(q), torch.cat([buffered.to(phi_new.dtype), phi_new], 2)

    # -- computation ----------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid: torch.Tensor,
        scaling: float,
        cache_layer=None,
        mode: str | None = None,
        return_stats: bool = False,
    ):
        """q [B,H,Tq,D], k/v [B,Hkv,Tk,D] (queries = last Tq keys), key_valid [B,Tk] bool.

        Returns y [B,H,Tq,D] (with return_stats: y, lin_den, den). With a `HybridCacheLayer`, k/v
        are (window buffer + new tokens) and the layer's fp32 state covers everything older; the
        state is advanced afterwards whatever the mode, so modes can be switched mid-stream."""
        mode = self.mode if mode is None else mode
        if mode not in COMPONENT_MODES:
            raise ValueError(f"component mode must be one of {COMPONENT_MODES}, got {mode!r}")
        initial_state = cache_layer.linear_state() if cache_layer is not None else None
        needs_features = mode in ("hybrid", "linear_only") or cache_layer is not None
        phi_q, phi_k = self.features(q, k, cache_layer) if needs_features else (None, None)
        lin_den = den = None

        if mode == "none":
            y = q.new_zeros(*q.shape[:3], v.shape[-1])
        elif mode == "sinks_only":
            y = self._sinks(q, k, v, key_valid, scaling, cache_layer)
        else:
            kw = dict(
                window=self.window,
                scale=scaling,
                linear_covers_window=self.linear_covers_window,
                key_valid=key_valid,
                initial_state=initial_state,
                backend=self.backend,
                chunk_size=self.chunk_size,
                return_stats=return_stats,
            )
            if mode == "swa_only":  # the linear features are not needed
                phi_q_, phi_k_ = (phi_q, phi_k) if phi_q is not None else (q[..., :1], q.new_zeros(q.shape[0], q.shape[1], k.shape[2], 1))
            else:
                phi_q_, phi_k_ = phi_q, phi_k
            gamma, alpha = self.gamma(), self.alpha()
            drop = self.swa_drop if mode == "hybrid" else None
            if drop is None and not return_stats and self._fused_decode_applies(q, k, v, cache_layer):
                validate_inputs(q, k, v, phi_q, phi_k, gamma, alpha, mode=mode, **kw)
                return self._fused_decode(q, k, v, phi_q, phi_k, gamma, alpha, key_valid, scaling, cache_layer, mode)
            if drop is not None:
                out = self._with_row_drop(q, k, v, phi_q_, phi_k_, gamma, alpha, drop, kw)
            else:
                out = hybrid_attention(q, k, v, phi_q_, phi_k_, gamma, alpha, mode=mode, **kw)
            if return_stats:
                y, lin_den, den = out
            else:
                y = out

        if cache_layer is not None:
            cache_layer.advance(k, v, phi_k, key_valid, self.window, self.num_sinks, inplace=not torch.is_grad_enabled())
        if return_stats:
            if lin_den is None:
                lin_den = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
                den = lin_den
            return y, lin_den, den
        return y

    def _fused_decode_applies(self, q, k, v, cache_layer) -> bool:
        """One new token per sequence, with a cache, on the Triton backend (auto on CUDA), no
        gradient: the fused decode-step kernel (`kernels/triton_decode.py`) does the whole step."""
        if cache_layer is None or q.shape[2] != 1 or k.shape[2] > self.window:
            return False  # (a buffer longer than w-1 happens once after set_window shrinks w)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return False
        return resolve_backend(self.backend, q.device) == "triton"

    def _fused_decode(self, q, k, v, phi_q, phi_k, gamma, alpha, key_valid, scaling, cache_layer, mode):
        """k/v/phi_k/key_valid = the cache's window buffer (n <= w-1 tokens, oldest first) + the new
        token. The buffer is laid out as the kernel's ring with the oldest token in slot 0 (invalid
        front padding while n < w-1), so the kernel folds exactly the token leaving the window into
        the fp32 state, in place, and writes the new token into that slot."""
        from .kernels.triton_decode import DecodeCache, hybrid_decode_triton

        B, _, Tk, _ = k.shape
        n, w1 = Tk - 1, self.window - 1
        pad = w1 - n

        def ring(x):
            x = x[:, :, :n]
            if pad:
                x = torch.cat([x.new_zeros(*x.shape[:2], pad, x.shape[-1]), x], 2)
            return x.contiguous()

        valid = key_valid[:, :n]
        if pad:
            valid = torch.cat([valid.new_zeros(B, pad), valid], 1)
        state = cache_layer.linear_state()
        if state is None:
            S = torch.zeros(B, self.num_heads, phi_k.shape[-1], v.shape[-1], dtype=torch.float32, device=q.device)
            z = torch.zeros(B, self.num_heads, phi_k.shape[-1], dtype=torch.float32, device=q.device)
        else:
            S, z = (t.float().contiguous() for t in state)
        cache = DecodeCache(k_win=ring(k), v_win=ring(v), valid=valid.contiguous(), S=S, z=z,
                            position=torch.zeros(1, dtype=torch.int64, device=q.device), phi_k_win=ring(phi_k))
        y = hybrid_decode_triton(q, k[:, :, n:], v[:, :, n:], phi_q, phi_k[:, :, n:], gamma, alpha, cache,
                                 scale=scaling, mode=mode, linear_covers_window=self.linear_covers_window,
                                 key_valid=key_valid[:, n])
        keep = min(n + 1, w1)  # the new token sits in slot 0: rotate it to the end, drop the padding

        def window_of(x):
            return torch.roll(x, -1, dims=2)[:, :, w1 - keep:] if keep else x[:, :, :0]

        new_valid = torch.roll(cache.valid, -1, dims=1)[:, w1 - keep:] if keep else key_valid[:, :0]
        cache_layer.commit_decode(window_of(cache.k_win), window_of(cache.v_win), window_of(cache.phi_k_win), new_valid,
                                  (cache.S, cache.z), k, v, key_valid, self.num_sinks)
        return y

    def _with_row_drop(self, q, k, v, phi_q, phi_k, gamma, alpha, drop, kw):
        """SSD 'sample' granularity: rows in `drop` run linear_only, the others hybrid."""
        drop = drop.to(device=q.device, dtype=torch.bool)
        if drop.shape != (q.shape[0],):
            raise ValueError(f"swa_drop must be a bool tensor of shape [batch={q.shape[0]}], got {tuple(drop.shape)}")
        if bool(drop.all()):
            return hybrid_attention(q, k, v, phi_q, phi_k, gamma, alpha, mode="linear_only", **kw)
        if not bool(drop.any()):
            return hybrid_attention(q, k, v, phi_q, phi_k, gamma, alpha, mode="hybrid", **kw)
        outs = []
        for mode, rows in (("hybrid", (~drop).nonzero()[:, 0]), ("linear_only", drop.nonzero()[:, 0])):
            sub = dict(kw)
            sub["key_valid"] = kw["key_valid"][rows]
            if kw["initial_state"] is not None:
                sub["initial_state"] = tuple(s[rows] for s in kw["initial_state"])
            res = hybrid_attention(q[rows], k[rows], v[rows], phi_q[rows], phi_k[rows], gamma, alpha, mode=mode, **sub)
            outs.append((rows, res))
        first = outs[0][1]
        parts = first if isinstance(first, tuple) else (first,)
        merged = [p.new_empty((q.shape[0], *p.shape[1:])) for p in parts]
        for rows, res in outs:
            for m, p in zip(merged, res if isinstance(res, tuple) else (res,)):
                m[rows] = p
        return tuple(merged) if isinstance(first, tuple) else merged[0]

    def _sinks(self, q, k, v, key_valid, scaling, cache_layer):
        """Softmax over the first `num_sinks` valid keys j <= i (prefix from the cache if any)."""
        Tq, Tk = q.shape[2], k.shape[2]
        offset = cache_layer.seen_tokens_before(Tq) if cache_layer is not None else 0
        n_old = Tk - Tq  # window-buffer tokens, already considered for sinks in earlier steps
        cached = cache_layer.sinks if cache_layer is not None else None
        sk, sv, spos, svalid = sink_candidates(k, v, key_valid, n_old, offset, self.num_sinks, cached)
        svalid = svalid & (svalid.long().cumsum(1) <= self.num_sinks)  # only the first num_sinks valid ones
        qpos = torch.arange(offset + Tk - Tq, offset + Tk, device=q.device)
        return sinks_attention(q, sk, sv, spos, qpos, scale=scaling, sink_valid=svalid)
