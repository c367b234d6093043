"""`HybridMixer`: the parameters and run-time state that turn one softmax attention layer hybrid.

It is attached to each converted attention module as `module.hybrid` and called by the registered
attention function. PEFT's `modules_to_save=["hybrid"]` wraps it and routes calls to the active
copy, which is why all the computation happens in `HybridMixer.forward` (SPEC §2).

(This file must not define a class named `*Attention*(nn.Module)`; see HF_NOTES.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .config import COMPONENT_MODES, HybridConfig
from .feature_maps import build_feature_map
from .kernels import KERNEL_MODES, expand_kv_heads, hybrid_attention, sinks_attention, validate_inputs
from .kernels.decode import fold_into_state
from .kernels.dispatch import resolve_backend
from .kernels.reference import softmax_sink_mask

#: a call with more queries than this is computed in segments of this many (`HybridMixer._segmented`):
#: its feature maps and kernel temporaries stay O(segment) whatever the prompt length
PREFILL_SEGMENT = 2048


def _unused_features(q: torch.Tensor, key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Width-1 stand-ins for (phi_q, phi_k) in swa_only, where the kernels never read them."""
    return q[..., :1], q.new_zeros(q.shape[0], q.shape[1], key_length, 1)


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
        self.phi_dim = self.feature_map_k.output_dim(head_dim, config.feature_dim)  # F', the size of phi(x)
        self.window_logit = nn.Parameter(torch.full((num_heads,), config.init_window_logit))
        self.init_window_logit = config.init_window_logit
        self.affine_mix = config.affine_mix
        self.linear_covers_window = config.linear_covers_window
        self.num_sinks = config.num_sinks
        self.softmax_sinks = config.softmax_sinks
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

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi_q(q) [B,H,Tq,F'] and phi_k(k) per query head [B,H,Tk,F']."""
        return self.feature_map_q(q), self.feature_map_k(expand_kv_heads(k, self.num_heads))

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

        Returns y [B,H,Tq,D] (with return_stats: y, lin_den, den). With a `HybridCacheLayer`, k/v/
        key_valid are the new tokens only (Tk = Tq): one new token without autograd runs the decode
        step on the cache's ring in place (`_ring_decode`); otherwise the kept window tokens are
        prepended, the layer's fp32 state is the prefix, and the cache is advanced afterwards.
        Either way whatever the mode, so modes can be switched mid-stream."""
        mode = self.mode if mode is None else mode
        if mode not in COMPONENT_MODES:
            raise ValueError(f"component mode must be one of {COMPONENT_MODES}, got {mode!r}")
        n_sinks = self.softmax_sinks
        sink_kw = dict(softmax_sinks=n_sinks) if n_sinks else {}  # nothing new passed when the arm is off
        prefix_sinks = None
        if cache_layer is not None:
            if k.shape[2] != q.shape[2]:
                raise ValueError(f"k: with a HybridCache layer k/v are the new tokens only ({q.shape[2]}), got {k.shape[2]}")
            if n_sinks and not getattr(cache_layer, "supports_softmax_sinks", False):
                raise ValueError(
                    f"softmax_sinks={n_sinks}: this cache ({type(cache_layer).__name__}) does not keep softmax sinks; "
                    "use the default HybridCache (generate() creates it), or convert with softmax_sinks=0"
                )
            ring_backend = self._ring_decode_backend(q, k, v, cache_layer, mode, return_stats)
            if ring_backend is not None:
                return self._ring_decode(q, k, v, key_valid, scaling, cache_layer, mode, ring_backend)
            kept = cache_layer.window_tokens()
            if kept is not None:  # the general path: prepend the window tokens kept by the cache
                kb, vb, validb = kept
                k, v = torch.cat([kb.to(k.dtype), k], 2), torch.cat([vb.to(v.dtype), v], 2)
                key_valid = torch.cat([validb.to(key_valid.device), key_valid], 1)
            if n_sinks:  # the sinks before k[0] (k[0] is at position seen - kept)
                kept_sinks = cache_layer.softmax_sinks_of(n_sinks,
                                                          before=cache_layer.seen_tokens_before(q.shape[2]) - (k.shape[2] - q.shape[2]))
                if kept_sinks is not None:
                    prefix_sinks = (kept_sinks[0].to(k.dtype), kept_sinks[1].to(v.dtype), kept_sinks[3])
        initial_state = cache_layer.linear_state() if cache_layer is not None else None
        if self._segments_apply(q, k, mode, return_stats):
            y, state = self._segmented(q, k, v, key_valid, scaling, mode, initial_state, prefix_sinks,
                                       need_state=cache_layer is not None)
            if cache_layer is not None:
                cache_layer.advance(k, v, None, key_valid, self.window, self.num_sinks, state=state, **sink_kw)
            return y
        needs_features = mode in ("hybrid", "linear_only") or cache_layer is not None
        phi_q, phi_k = self.features(q, k) if needs_features else (None, None)
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
            if n_sinks:
                kw.update(softmax_sinks=n_sinks, prefix_sinks=prefix_sinks)
            if mode == "swa_only":  # the linear features are not needed
                phi_q_, phi_k_ = (phi_q, phi_k) if phi_q is not None else _unused_features(q, k.shape[2])
            else:
                phi_q_, phi_k_ = phi_q, phi_k
            gamma, alpha = self.gamma(), self.alpha()
            drop = self.swa_drop if mode == "hybrid" else None
            if drop is not None:
                out = self._with_row_drop(q, k, v, phi_q_, phi_k_, gamma, alpha, drop, kw)
            else:
                out = hybrid_attention(q, k, v, phi_q_, phi_k_, gamma, alpha, mode=mode, **kw)
            if return_stats:
                y, lin_den, den = out
            else:
                y = out

        if cache_layer is not None:
            cache_layer.advance(k, v, phi_k, key_valid, self.window, self.num_sinks, inplace=not torch.is_grad_enabled(),
                                **sink_kw)
        if return_stats:
            if lin_den is None:
                lin_den = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
                den = lin_den
            return y, lin_den, den
        return y

    def _segments_apply(self, q, k, mode, return_stats) -> bool:
        """Long inputs (more than PREFILL_SEGMENT queries) in a kernel mode, without the per-row
        SSD drop or per-query statistics: computed segment by segment (`_segmented`)."""
        return (q.shape[2] > PREFILL_SEGMENT and mode in KERNEL_MODES and not return_stats
                and not (mode == "hybrid" and self.swa_drop is not None))

    def _segmented(self, q, k, v, key_valid, scaling, mode, initial_state, prefix_sinks=None, need_state=True):
        """The same output as one call, in segments of PREFILL_SEGMENT queries, so that the feature
        maps and the kernels' temporaries are O(segment), not O(T), whatever the prompt length.

        Queries [s, e) (positions in k) attend keys [s - w + 1, e) with, as prefix, the linear
        state of every key before s - w + 1 (the kernels' initial_state contract: those keys are
        all in L(i) for every query of the segment, with or without the overlap); between segments
        the keys that drop out of reach are folded into that state (fp32, never expanded per
        query head; out of place when autograd needs the graph). Returns y [B,H,Tq,D] and the state
        over every key before Tk - (w - 1), the fold a cache keeps after this call.

        Softmax sinks (`softmax_sinks` > 0): the sinks of the whole call (`prefix_sinks`, those before
        k[0], then the first valid keys of k) are found once; each segment gets those before its first
        key as its prefix sinks, and they are never folded into the state.

        In swa_only without `need_state` (no cache will keep the state) the linear branch is unused:
        no feature map runs and nothing is folded; the state returned is None."""
        Tq, Tk = q.shape[2], k.shape[2]
        linear = mode != "swa_only" or need_state
        w, off, H = self.window, Tk - Tq, self.num_heads
        gamma, alpha = self.gamma(), self.alpha()
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *self.parameters()))
        state = initial_state
        if state is None:
            B, F, D = q.shape[0], self.phi_dim, v.shape[-1]
            state = (q.new_zeros(B, H, F, D, dtype=torch.float32), q.new_zeros(B, H, F, dtype=torch.float32))
        elif not grad:
            state = tuple(t.float().clone() for t in state)  # folded in place below: never the cache's own
        n = self.softmax_sinks
        fold_valid, sinks = key_valid, None
        if n:
            is_sink = softmax_sink_mask(key_valid, n, None if prefix_sinks is None else prefix_sinks[2])
            fold_valid = key_valid & ~is_sink
            idx, found = first_valid(is_sink, n)
            gk = idx[:, None, :, None]
            sinks = (k.gather(2, gk.expand(-1, k.shape[1], -1, k.shape[-1])),
                     v.gather(2, gk.expand(-1, v.shape[1], -1, v.shape[-1])), idx, found)  # pos = index in k
            if prefix_sinks is not None:
                pk, pv, pvalid = prefix_sinks
                sinks = (torch.cat([pk, sinks[0]], 2), torch.cat([pv, sinks[1]], 2),
                         torch.cat([torch.full_like(pvalid, -1, dtype=torch.long), idx], 1),
                         torch.cat([pvalid, found], 1))
        ys, ks = [], 0
        for s in range(off, Tk, PREFILL_SEGMENT):
            e = min(Tk, s + PREFILL_SEGMENT)
            ks = max(0, s - (w - 1))
            kk, vv, kv = k[:, :, ks:e], v[:, :, ks:e], key_valid[:, ks:e]
            if linear:
                phi_q, phi_k = self.features(q[:, :, s - off : e - off], kk)
            else:  # the kernels take feature maps of any width in swa_only and never read them
                phi_q, phi_k = _unused_features(q[:, :, s - off : e - off], kk.shape[2])
            sink_kw = {}
            if n:  # the sinks before this segment's first key
                sink_kw = dict(softmax_sinks=n, prefix_sinks=(sinks[0], sinks[1], sinks[3] & (sinks[2] < ks)))
            ys.append(hybrid_attention(q[:, :, s - off : e - off], kk, vv, phi_q, phi_k, gamma, alpha, mode=mode,
                                       window=w, scale=scaling, linear_covers_window=self.linear_covers_window,
                                       key_valid=kv, initial_state=state if linear else None, backend=self.backend,
                                       chunk_size=self.chunk_size, **sink_kw))
            nxt = max(0, e - (w - 1))  # the next segment's first key (after the last: the cache's fold point)
            if linear and nxt > ks:
                state = fold_into_state(state, phi_k[:, :, : nxt - ks], vv[:, :, : nxt - ks],
                                        fold_valid[:, ks:nxt], inplace=not grad)
        return torch.cat(ys, 2), (state if linear else None)

    def _ring_decode_backend(self, q, k, v, cache_layer, mode, return_stats) -> str | None:
        """The backend of the in-place decode step ("torch" or "triton"), or None where it does not
        apply. It applies to one new token per sequence, no gradient, a kernel mode, the torch or
        Triton backend (auto: Triton on CUDA), and a ring laid out for this window (it is not after
        set_window changed w: the general path re-lays it once)."""
        if q.shape[2] != 1 or return_stats or mode not in KERNEL_MODES or (mode == "hybrid" and self.swa_drop is not None):
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return None
        backend = resolve_backend(self.backend, q.device)
        if backend == "reference":
            return None
        if backend == "triton" and torch.compiler.is_compiling():
            # a compiled step runs the PyTorch step, which inductor turns into its own fused kernels;
            # tracing the hand-written Triton decode kernel through dynamo is not verified yet
            backend = "torch"
        fits = cache_layer.ensure_ring(q.shape[0], self.num_heads, k.shape[1], k.shape[-1], v.shape[-1], self.phi_dim,
                                       self.window, k.dtype, k.device)
        return backend if fits else None

    def _ring_decode(self, q, k, v, key_valid, scaling, cache_layer, mode, backend):
        """The decode step on the cache's ring, in place (`kernels.decode` / `kernels.triton_decode`):
        the feature map runs on the new key and on the one key leaving the window (and, in the
        modes whose linear branch covers the window, on the ring's w-1 keys)."""
        ring = cache_layer.decode_cache()
        lin_window = mode == "linear_only" or (mode == "hybrid" and self.linear_covers_window)
        W1 = ring.k_win.shape[2]
        # eager, with a cache that knows the position on the host (a HybridCacheLayer; not vLLM's
        # batch of requests): the evicted slot is then a view, with no index kernels
        pos = None if torch.compiler.is_compiling() or not W1 else getattr(cache_layer, "host_position", None)
        slot = pos % W1 if pos is not None and ring.position.numel() == 1 else None
        evicts = W1 > 0 and not lin_window  # fold needs phi_k of the key leaving
        if evicts:  # the new key and the one leaving, through the feature map in one call
            leaving = ring.evicted_keys(slot)
            keys = torch.cat([k, leaving if leaving.dtype == k.dtype else leaving.to(k.dtype)], 2)
        else:
            keys = k
        phi_q, phi_keys = self.features(q, keys)
        phi_k, phi_evict = phi_keys[:, :, :1], (phi_keys[:, :, 1:] if evicts else None)
        if lin_window and W1:
            ring = dataclasses.replace(ring, phi_k_win=self.feature_map_k(expand_kv_heads(ring.k_win, self.num_heads)))
        gamma, alpha = self.gamma(), self.alpha()
        validate_inputs(q, k, v, phi_q, phi_k, gamma, alpha, window=self.window, mode=mode, key_valid=key_valid)
        n = self.softmax_sinks
        if backend == "triton":  # with softmax sinks it runs the torch step
            from .kernels.triton_decode import hybrid_decode_triton as step
            extra = {}
        else:
            from .kernels.decode import hybrid_decode_torch as step
            extra = {"slot": slot}
        sink_kw = dict(softmax_sinks=n, sinks=cache_layer.softmax_sinks_of(n)) if n else {}
        y = step(q, k, v, phi_q, phi_k, gamma, alpha, ring, scale=scaling, mode=mode,
                 linear_covers_window=self.linear_covers_window, phi_k_evict=phi_evict, key_valid=key_valid[:, -1],
                 **sink_kw, **extra)
        if n:
            cache_layer.after_decode(k, v, key_valid, self.num_sinks, softmax_sinks=n)
        else:
            cache_layer.after_decode(k, v, key_valid, self.num_sinks)
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
            if kw.get("prefix_sinks") is not None:
                sub["prefix_sinks"] = tuple(s[rows] for s in kw["prefix_sinks"])
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
        n_old = Tk - Tq  # window-buffer tokens, already considered for sinks in earlier steps
        offset = cache_layer.seen_tokens_before(Tq) - n_old if cache_layer is not None else 0  # position of k[0]
        cached = cache_layer.sinks if cache_layer is not None else None
        sk, sv, spos, svalid = sink_candidates(k, v, key_valid, n_old, offset, self.num_sinks, cached)
        svalid = svalid & (svalid.long().cumsum(1) <= self.num_sinks)  # only the first num_sinks valid ones
        qpos = torch.arange(offset + Tk - Tq, offset + Tk, device=q.device)
        return sinks_attention(q, sk, sv, spos, qpos, scale=scaling, sink_valid=svalid)
