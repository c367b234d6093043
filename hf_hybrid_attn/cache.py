"""`HybridCache`: constant-memory generation cache (SPEC §2, "Cache").

Per layer it keeps
  - the last w-1 raw keys/values (and their validity) for the softmax window, and their phi_k
    (so a decode step computes the feature map of the new token only),
  - the fp32 recurrent state S = sum phi_k v^T and z = sum phi_k over every older token,
  - the first `num_sinks` valid keys/values, for the `sinks_only` diagnostic mode.

`update()` returns (window buffer + new tokens); the hybrid layer attends over them with the state
as prefix, then calls `advance()`, which folds every token that left the window into (S, z) and
keeps the last w-1. The next query's window is exactly the w-1 kept tokens plus itself, and its
linear part is exactly the state: the same W(i) / L(i) as the uncached forward. Memory per
sequence does not grow with the generated length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .config import HybridConfig
from .config import teacher_windows as _teacher_windows
from .layers import first_valid, sink_candidates


class HybridCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.keys: torch.Tensor | None = None  # [B, Hkv, n<=w-1, D]
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [B, n]
        self.phi_keys: torch.Tensor | None = None  # phi_k of the window buffer [B, H, n, F'] (not recomputed)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # S [B,H,F,D], z [B,H,F] fp32
        self.sinks: tuple[torch.Tensor, ...] | None = None  # k, v, positions [B,S], valid [B,S]
        self.cumulative_length = 0
        self._pending = 0  # tokens returned by update() and not yet advanced
        self._sinks_full = False

    # -- transformers' cache-layer interface -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending:
            raise RuntimeError(
                "HybridCache was updated twice without the hybrid attention advancing it: this cache only "
                "works with layers converted by hf_hybrid_attn and attn_implementation='hybrid_linear_swa'"
            )
        self._pending = key_states.shape[2]
        self.cumulative_length += key_states.shape[2]
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        stored = 0 if self.keys is None else self.keys.shape[2]
        return stored + query_length, self.cumulative_length - stored

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.phi_keys = None
        self.state = self.sinks = None
        self.cumulative_length = 0
        self._pending = 0
        self._sinks_full = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        def sel(x):
            return None if x is None else x.index_select(0, beam_idx.to(x.device))

        self.keys, self.values, self.valid = sel(self.keys), sel(self.values), sel(self.valid)
        self.phi_keys = sel(self.phi_keys)
        if self.state is not None:
            self.state = tuple(sel(s) for s in self.state)
        if self.sinks is not None:
            self.sinks = tuple(sel(s) for s in self.sinks)

    def batch_repeat_interleave(self, repeats: int) -> None:
        def rep(x):
            return None if x is None else x.repeat_interleave(repeats, dim=0)

        self.keys, self.values, self.valid = rep(self.keys), rep(self.values), rep(self.valid)
        self.phi_keys = rep(self.phi_keys)
        if self.state is not None:
            self.state = tuple(rep(s) for s in self.state)
        if self.sinks is not None:
            self.sinks = tuple(rep(s) for s in self.sinks)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "HybridCache cannot be cropped: its recurrent state cannot be rolled back, so assisted / "
            "speculative decoding is not supported for hybrid models"
        )

    def offload(self):
        pass

    def prefetch(self):
        pass

    # -- used by the hybrid layer ------------------------------------------------------------------
    def linear_state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.state

    def buffered_phi_k(self, n_old: int) -> torch.Tensor | None:
        """phi_k of the `n_old` window-buffer tokens that the last update() put before the new ones,
        as stored by the previous step (None if there is no such buffer)."""
        if n_old == 0 or self.phi_keys is None or self.phi_keys.shape[2] != n_old:
            return None
        return self.phi_keys

    def seen_tokens_before(self, query_length: int) -> int:
        """Absolute position of the first token returned by the last update()."""
        stored = 0 if self.keys is None else self.keys.shape[2]
        return self.cumulative_length - query_length - stored

    @torch.no_grad()
    def advance(self, k, v, phi_k, key_valid, window: int, num_sinks: int, inplace: bool = True) -> None:
        """Fold all but the last w-1 of (buffer + new tokens) into the state; keep the rest.

        inplace: add into the existing state tensors (no new state tensor per step); the layer
        passes False when autograd may have saved the state for a backward through this step. The
        fold itself is `fold_into_state`: chunked, fp32, KV heads never expanded."""
        if not self._pending:
            raise RuntimeError("HybridCacheLayer.advance() called without a preceding update()")
        new = self._pending
        offset = self.seen_tokens_before(new)
        Tk = k.shape[2]
        keep = min(window - 1, Tk)
        fold = Tk - keep
        if fold > 0:
            in_place = (self.state is not None and inplace and self.state[0].is_contiguous()
                        and (torch.is_inference_mode_enabled() or not self.state[0].is_inference()))
            if self.state is None:
                B, H, F = phi_k.shape[0], phi_k.shape[1], phi_k.shape[-1]
                self.state = (phi_k.new_zeros(B, H, F, v.shape[-1], dtype=torch.float32),
                              phi_k.new_zeros(B, H, F, dtype=torch.float32))
                in_place = True  # a new tensor of this cache's own
            elif not in_place:  # autograd may hold the old state: fold into a copy
                self.state = tuple(t.clone() for t in self.state)
            fold_into_state(self.state, phi_k[:, :, :fold], v[:, :, :fold], key_valid[:, :fold])
        self.keys, self.values = _own(k[:, :, fold:].detach()), _own(v[:, :, fold:].detach())
        self.phi_keys = _own(phi_k[:, :, fold:].detach())
        self.valid = _own(key_valid[:, fold:])
        self._advance_sinks(k, v, key_valid, Tk - new, offset, num_sinks)
        self._pending = 0

    @torch.no_grad()
    def commit_decode(self, keys, values, phi_keys, valid, state, k, v, key_valid, num_sinks: int) -> None:
        """After a fused decode step (the kernel folded the token leaving the window into `state` and
        the new token joined the window): store the new window buffer and state, as `advance` would."""
        if self._pending != 1:
            raise RuntimeError("HybridCacheLayer.commit_decode() expects exactly one pending token from update()")
        offset = self.seen_tokens_before(1)
        self.keys, self.values, self.phi_keys, self.valid, self.state = keys, values, phi_keys, valid, state
        self._advance_sinks(k, v, key_valid, k.shape[2] - 1, offset, num_sinks)
        self._pending = 0

    def _advance_sinks(self, k, v, key_valid, n_old, offset, num_sinks):
        if self._sinks_full and self.sinks[3].shape[1] == num_sinks:  # every row's first num_sinks valid keys are known
            return
        sk, sv, spos, idx_valid = sink_candidates(k, v, key_valid, n_old, offset, num_sinks, self.sinks)
        keep, keep_valid = first_valid(idx_valid, num_sinks)
        g = keep[:, None, :, None].expand(-1, sk.shape[1], -1, sk.shape[-1])
        self.sinks = (sk.gather(2, g), sv.gather(2, g), spos.gather(1, keep), keep_valid)
        # one host sync per step until every row holds num_sinks valid sinks, none afterwards
        self._sinks_full = keep_valid.shape[1] == num_sinks and bool(keep_valid.all())


class HybridCache(Cache):
    """A `Cache` of `HybridCacheLayer`s; `generate()` builds one by default for hybrid models."""

    def __init__(self, config=None, num_layers: int | None = None, hybrid_layers: list[int] | None = None,
                 teacher_windows: list[int | None] | None = None, **kwargs):
        """Layers listed in `hybrid_layers` (default: the converted layers of config.hybrid["layers"])
        get a `HybridCacheLayer`; unconverted layers keep the teacher's cache: a full `DynamicLayer`,
        or a `DynamicSlidingWindowLayer` where the teacher's layer is sliding-window
        (`teacher_windows`, default: read from `config`)."""
        if num_layers is None:
            if config is None:
                raise ValueError("HybridCache needs `config` or `num_layers`")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if teacher_windows is None:
            teacher_windows = _teacher_windows(config) if config is not None else [None] * num_layers
        if len(teacher_windows) != num_layers:
            raise ValueError(f"teacher_windows: expected {num_layers} entries, got {len(teacher_windows)}")
        if hybrid_layers is None and config is not None and isinstance(getattr(config, "hybrid", None), dict):
            hybrid_layers = HybridConfig.from_dict(config.hybrid).layer_indices(num_layers, teacher_windows)
        hybrid_set = set(range(num_layers)) if hybrid_layers is None else set(hybrid_layers)
        layers = []
        for i, w in enumerate(teacher_windows):
            if i in hybrid_set:
                layer = HybridCacheLayer()
                layer.is_sliding = w is not None
            else:
                layer = DynamicLayer() if w is None else DynamicSlidingWindowLayer(sliding_window=w)
            layers.append(layer)
        _route_masks(layers, hybrid_set, teacher_windows)
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes of storage the cache keeps alive (whole storages, each counted once, so a view that
        pins a larger buffer is counted in full): constant in the generated length for the hybrid
        layers; unconverted layers grow with it (DynamicLayer) or up to their window."""
        seen, total = set(), 0
        for layer in self.layers:
            if isinstance(layer, HybridCacheLayer):
                tensors = (layer.keys, layer.values, layer.phi_keys, layer.valid, *(layer.state or ()), *(layer.sinks or ()))
            else:
                tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
            for t in tensors:
                if t is None:
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total


#: tokens per step of the state fold: bounds the fp32 temporaries of a long prefill's fold
FOLD_CHUNK = 1024


def fold_into_state(state: tuple[torch.Tensor, torch.Tensor], phi_k: torch.Tensor, v: torch.Tensor,
                    valid: torch.Tensor, chunk: int = FOLD_CHUNK) -> None:
    """In place: S += sum_j phi_k_j v_j^T and z += sum_j phi_k_j over the valid tokens j, in fp32.

    state: S [B, H, F, D], z [B, H, F] (fp32, contiguous); phi_k [B, H, T, F] per query head; v
    [B, Hkv, T, D] with H = G * Hkv (GQA). The G query heads of a KV group are the rows of one
    matmul against that group's values, so V is never expanded to H heads, and the fold walks T
    in chunks of `chunk` tokens, so the fp32 temporaries are O(chunk), not O(T)."""
    S, z = state
    B, H, F, D = S.shape
    Hkv, T = v.shape[1], v.shape[2]
    G = H // Hkv
    S_groups = S.view(B * Hkv, G * F, D)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        fk = phi_k[:, :, s:e].float() * valid[:, None, s:e, None].float()  # [B, H, c, F]
        z.add_(fk.sum(2))
        fkT = fk.view(B, Hkv, G, e - s, F).permute(0, 1, 2, 4, 3).reshape(B * Hkv, G * F, e - s)
        S_groups.baddbmm_(fkT, v[:, :, s:e].float().reshape(B * Hkv, e - s, D))


def _own(x: torch.Tensor) -> torch.Tensor:
    """`x` (a slice kept in the cache) without pinning a much larger buffer: after a prefill of T
    tokens the kept w-1 would otherwise hold the whole prefill's k/v/phi_k alive."""
    if x.untyped_storage().nbytes() > 2 * x.numel() * x.element_size():
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _route_masks(layers: list, hybrid_set: set[int], windows: list[int | None]) -> None:
    """transformers builds one mask per layer kind, sized by the first cache layer of that kind
    (`is_sliding`): the first non-sliding layer for the global mask, the first sliding one for the
    sliding mask. A converted layer can read the tail of a longer mask (its span is the window
    buffer plus the new tokens, never longer than an unconverted layer's of the same kind), but an
    unconverted softmax layer needs a mask of exactly its own span. So where a kind has unconverted
    layers, its converted layers must not be found first; they are flagged as the other kind when
    that kind has no layers of its own, and layouts that cannot be served are refused."""
    kinds = ["sliding" if w is not None else "full" for w in windows]
    unconverted = {k for i, k in enumerate(kinds) if i not in hybrid_set}
    present = set(kinds)
    for i, layer in enumerate(layers):
        if i in hybrid_set and kinds[i] in unconverted:
            other = "full" if kinds[i] == "sliding" else "sliding"
            if other in present:
                raise ValueError(
                    f"HybridConfig.layers: layer {i} is converted while other {kinds[i]}-attention layers are not, and "
                    f"the teacher also has {other}-attention layers; transformers sizes one mask per kind, so this "
                    "layout cannot be cached. Convert all layers of a kind together (e.g. layers='global', or all)"
                )
            layer.is_sliding = other == "sliding"
