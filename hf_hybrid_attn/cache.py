"""`HybridCache`: constant-memory generation cache (SPEC §2, "Cache").

Per converted layer it keeps, in place, preallocated once (`kernels.decode.DecodeCache`'s layout):
  - a ring of the last w-1 raw keys/values and their validity (position p in slot p % (w-1)):
    the softmax window of the next query, minus itself;
  - the fp32 recurrent state S = sum phi_k v^T and z = sum phi_k over every older valid token;
  - the first `num_sinks` valid keys/values, for the `sinks_only` diagnostic mode; with the softmax
    sinks arm (`softmax_sinks` = n > 0, SPEC §2) the first max(num_sinks, n) ones: the first n are
    the softmax sinks, attended by every later query and never folded into (S, z).
phi_k is not stored: a decode step maps the new key and the one key leaving the window (the ring
of phi_k would be (H / Hkv) * (F' / D) times the k ring: 6x for SmolLM2 at the defaults).

`update()` returns only the new tokens. A one-token step (decode) then runs
`kernels.decode` / `kernels.triton_decode` on the ring directly: attend (ring + new key, state),
fold the key leaving the window into (S, z), write the new key into its slot; nothing is
allocated for the ring or the state, nothing shifts. Longer calls (a prefill, a second prompt
chunk) and calls with autograd take the general path: the window tokens are read out oldest first
(`window_tokens`), prepended to the new ones, attended with the state as prefix, and `advance()`
folds every token that left the window and lays the last w-1 into the ring. Either way the next
query's window is exactly the w-1 kept tokens plus itself and its linear part exactly the state:
the same W(i) / L(i) as the uncached forward. Memory per sequence does not grow with the length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .config import HybridConfig
from .config import teacher_windows as _teacher_windows
from .kernels.decode import DecodeCache, fold_into_state
from .kernels.reference import softmax_sink_mask
from .layers import first_valid, sink_candidates


def _frozen(t: torch.Tensor) -> bool:
    """An inference tensor used outside torch.inference_mode(): it cannot be updated in place there.
    Never inside a compiled step (dynamo cannot trace is_inference(); generate() uses no_grad)."""
    return not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled()


class HybridCacheLayer(CacheLayerMixin):
    is_compileable = False  # per instance: HybridCache(compileable=True)
    is_sliding = False
    #: keeps the softmax sinks (HybridConfig.softmax_sinks > 0) beside the ring, outside the state
    supports_softmax_sinks = True

    def __init__(self, **kwargs):
        super().__init__()
        self.keys: torch.Tensor | None = None  # ring [B, Hkv, w-1, D] (slot p % (w-1) holds position p)
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [B, w-1] bool
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # S [B,H,F,D], z [B,H,F] fp32
        self.sinks: tuple[torch.Tensor, ...] | None = None  # k, v, positions [B,S], valid [B,S]
        self._position = 0  # tokens the ring and state account for (Python int: no host sync)
        self._position_t: torch.Tensor | None = None  # the same on the device, for the kernels
        self._stale = False  # a compiled step advanced _position_t only: _position is read back lazily
        self._pending = 0  # tokens returned by update() and not yet advanced
        self._sinks_full = False

    # -- the counters ------------------------------------------------------------------------------
    # A compiled decode step must not read or write a Python int that changes every step: each
    # value would be a guard (a recompilation per step with dynamic=False) or a graph input (a new
    # CUDA graph per step). So inside one, only the device position advances (the decode kernel's
    # in-place add), `_stale` records that, and eager code reads the position back once (a host
    # sync) the next time it asks. `cumulative_length` (tokens recorded by update()) is always the
    # position plus the tokens update() returned and the layer has not yet advanced.
    @property
    def position(self) -> int:
        if self._stale:
            self._position, self._stale = int(self._position_t.reshape(())), False
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._position, self._stale = int(value), False

    @property
    def host_position(self) -> int:
        """The position of the next token, on the host (the eager decode step reads its ring slot
        from it instead of computing it on the device)."""
        return self.position

    @property
    def cumulative_length(self) -> int:
        return self.position + self._pending

    # -- transformers' cache-layer interface -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Records the new tokens and returns them as they are: the hybrid layer reads the window
        from the ring itself (`window_tokens`, or the decode kernels in place)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending:
            raise RuntimeError(
                "HybridCache was updated twice without the hybrid attention advancing it: this cache only "
                "works with layers converted by hf_hybrid_attn and attn_implementation='hybrid_linear_swa'"
            )
        self._pending = key_states.shape[2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # the mask covers the new tokens only: their key padding; the ring keeps its own validity.
        # In a compiled step no offset (no per-step int): hybrid_mask then takes the mask's tail
        if torch.compiler.is_compiling():
            return query_length, 0
        return query_length, self.cumulative_length

    def get_seq_length(self, *args, **kwargs):
        if torch.compiler.is_compiling() and self._position_t is not None:
            return self._position_t.reshape(()) + self._pending  # a tensor, as transformers' StaticLayer
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.valid = None
        self.state = self.sinks = self._position_t = None
        self.position = 0
        self._pending = 0
        self._sinks_full = False

    def _map(self, fn, inplace: bool = False) -> None:
        """Apply fn to every kept tensor; `inplace` (same shapes) copies the result back into the
        same storage, so a compileable cache keeps its static addresses (no recompilation)."""
        def f(x):
            if x is None:
                return None
            y = fn(x)
            return x.copy_(y) if inplace and not _frozen(x) else y
        self.keys, self.values, self.valid = (f(x) for x in (self.keys, self.values, self.valid))
        if self.state is not None:
            self.state = tuple(f(s).contiguous() for s in self.state)
        if self.sinks is not None:
            self.sinks = tuple(f(s) for s in self.sinks)
        self._mark_static()

    def _mark_static(self) -> None:
        """A compileable layer's ring, state and position keep one address each, updated in place:
        tell dynamo (as transformers' StaticLayer does), so CUDA graphs can capture the step."""
        if not self.is_compileable or torch.compiler.is_compiling():
            return
        for t in (self.keys, self.values, self.valid, self._position_t, *(self.state or ())):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)), inplace=self.is_compileable)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

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

    @property
    def ring_window(self) -> int | None:
        """The window w the ring was laid out for (w-1 slots), None before the first call."""
        return None if self.keys is None else self.keys.shape[2] + 1

    def window_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k, v, valid) of the kept window tokens, oldest first (copies), or None if there are none."""
        if self.keys is None or self.position == 0 or self.keys.shape[2] == 0:
            return None
        return self.decode_cache().chronological(self.position)

    def seen_tokens_before(self, query_length: int) -> int:
        """Absolute position of the first of the `query_length` tokens the last update() recorded."""
        return self.cumulative_length - query_length

    def decode_cache(self) -> DecodeCache:
        """The ring and state as the decode kernels take them (the same tensors: updated in place)."""
        if self._position_t is None or self._position_t.device != self.keys.device:
            self._position_t = torch.tensor([self.position], dtype=torch.int64, device=self.keys.device)
            self._mark_static()
        return DecodeCache(k_win=self.keys, v_win=self.values, valid=self.valid, S=self.state[0], z=self.state[1],
                           position=self._position_t)

    def ensure_ring(self, batch: int, heads: int, kv_heads: int, head_dim: int, value_dim: int, feature_dim: int,
                    window: int, dtype: torch.dtype, device) -> bool:
        """Allocate an empty ring and state before the first call if needed; True when the ring
        and state are laid out for exactly these sizes (the decode kernels can run on them)."""
        if self.keys is None and self.state is None and self.position == 0:
            c = DecodeCache.empty(batch, heads, kv_heads, head_dim, feature_dim, window, dtype=dtype, device=device,
                                  value_dim=value_dim)
            self.keys, self.values, self.valid, self.state = c.k_win, c.v_win, c.valid, (c.S, c.z)
            self._position_t = c.position
            self._mark_static()
        elif self.keys is not None and _frozen(self.keys):
            # written under torch.inference_mode() (e.g. the prefill), used outside it: inference
            # tensors cannot be updated in place there, so the cache takes normal copies once
            self._map(torch.clone)
            self._position_t = None
        return (self.keys is not None and self.state is not None and self.keys.shape[2] == window - 1
                and tuple(self.state[0].shape) == (batch, heads, feature_dim, value_dim)
                and self.keys.dtype == dtype and self.keys.device == torch.device(device)
                and self.keys.shape[0] == batch)

    def softmax_sinks_of(self, n: int, before: int | None = None):
        """The softmax sinks kept so far, (k, v, positions [B,S], valid [B,S]), valid only for the first
        n valid tokens of each row (and, with `before`, at positions < before); None before any."""
        if self.sinks is None or n == 0:
            return None
        sk, sv, spos, svalid = self.sinks
        valid = svalid & (svalid.long().cumsum(1) <= n)
        if before is not None:
            valid = valid & (spos < before)
        return sk, sv, spos, valid

    def after_decode(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, num_sinks: int,
                     softmax_sinks: int = 0) -> None:
        """After a decode kernel advanced the ring and state in place: the bookkeeping."""
        if self._pending != 1:
            raise RuntimeError("HybridCacheLayer.after_decode() expects exactly one pending token from update()")
        if torch.compiler.is_compiling():  # the kernel advanced the device position; no int changes
            offset, self._stale = self._position_t.reshape(()) - 1, True
        else:
            offset = self._position
            self._position += 1
        self._advance_sinks(k, v, key_valid, 0, offset, max(num_sinks, softmax_sinks))
        self._pending = 0

    @torch.no_grad()
    def advance(self, k, v, phi_k, key_valid, window: int, num_sinks: int, inplace: bool = True,
                state: tuple[torch.Tensor, torch.Tensor] | None = None, softmax_sinks: int = 0) -> None:
        """The general path, after attending (window tokens + new tokens) = k, v, phi_k, key_valid:
        fold all but the last w-1 into the state, lay the last w-1 into the ring. With
        `softmax_sinks` = n > 0 the sinks (the first n valid tokens of the row) are not folded (SPEC
        §2, "Softmax sinks"); with `state` the caller has already left them out.

        inplace: add into the existing state tensors (no new state tensor); the layer passes False
        when autograd may have saved the state for a backward through this step. The fold is
        `fold_into_state`: chunked, fp32, KV heads never expanded. `state`: the caller has already
        folded the same tokens (a segmented prefill): it becomes the cache's state (phi_k unused)."""
        if not self._pending:
            raise RuntimeError("HybridCacheLayer.advance() called without a preceding update()")
        new = self._pending
        Tk = k.shape[2]
        end = self.cumulative_length  # absolute position after the last of the Tk tokens
        keep = min(window - 1, Tk)
        fold = Tk - keep
        if state is not None:  # folded by the caller
            self.state = tuple(t.detach().float().contiguous() for t in state)
            B, H, F, D = self.state[0].shape
        else:
            B, H, F, D = phi_k.shape[0], phi_k.shape[1], phi_k.shape[-1], v.shape[-1]
            if self.state is None:
                self.state = (phi_k.new_zeros(B, H, F, D, dtype=torch.float32),
                              phi_k.new_zeros(B, H, F, dtype=torch.float32))
            elif not (inplace and all(t.is_contiguous() for t in self.state)
                      and not _frozen(self.state[0])):
                self.state = tuple(t.clone() for t in self.state)  # autograd may hold the old state
            if fold > 0:
                fold_valid = key_valid
                if softmax_sinks:  # the sinks among these tokens: after those kept before k[0]
                    prefix = self.softmax_sinks_of(softmax_sinks, before=end - Tk)
                    fold_valid = key_valid & ~softmax_sink_mask(key_valid, softmax_sinks,
                                                                None if prefix is None else prefix[3])
                fold_into_state(self.state, phi_k[:, :, :fold], v[:, :, :fold], fold_valid[:, :fold])
        if self.ring_window != window or self.keys.shape[0] != B or self.keys.dtype != k.dtype:
            ring = DecodeCache.empty(B, H, k.shape[1], k.shape[-1], F, window, dtype=k.dtype, device=k.device,
                                     value_dim=D)
            self.keys, self.values, self.valid = ring.k_win, ring.v_win, ring.valid
        elif _frozen(self.keys):
            self.keys, self.values, self.valid = self.keys.clone(), self.values.clone(), self.valid.clone()
        self.position = end
        ring = self.decode_cache()
        ring.position.fill_(end)
        ring.write_window(k.detach(), v.detach(), end, key_valid=key_valid)
        self._advance_sinks(k, v, key_valid, Tk - new, end - Tk, max(num_sinks, softmax_sinks))
        self._pending = 0
        self._mark_static()

    def _advance_sinks(self, k, v, key_valid, n_old, offset, num_sinks):
        if self._sinks_full and self.sinks[3].shape[1] == num_sinks:  # every row's first num_sinks valid keys are known
            return
        sk, sv, spos, idx_valid = sink_candidates(k, v, key_valid, n_old, offset, num_sinks, self.sinks)
        keep, keep_valid = first_valid(idx_valid, num_sinks)
        g = keep[:, None, :, None].expand(-1, sk.shape[1], -1, sk.shape[-1])
        self.sinks = (sk.gather(2, g), sv.gather(2, g), spos.gather(1, keep), keep_valid)
        # eager: one host sync per step until every row holds num_sinks valid sinks, none afterwards;
        # in a compiled step no sync at all: the few sinks are re-gathered every step instead
        self._sinks_full = (keep_valid.shape[1] == num_sinks and not torch.compiler.is_compiling()
                            and bool(keep_valid.all()))


class HybridCache(Cache):
    """A `Cache` of `HybridCacheLayer`s; `generate()` builds one by default for hybrid models."""

    def __init__(self, config=None, num_layers: int | None = None, hybrid_layers: list[int] | None = None,
                 teacher_windows: list[int | None] | None = None, compileable: bool = False, **kwargs):
        """Layers listed in `hybrid_layers` (default: the converted layers of config.hybrid["layers"])
        get a `HybridCacheLayer`; unconverted layers keep the teacher's cache: a full `DynamicLayer`,
        or a `DynamicSlidingWindowLayer` where the teacher's layer is sliding-window
        (`teacher_windows`, default: read from `config`).

        compileable: mark the hybrid layers `is_compileable` (what `generate(...,
        cache_implementation="static")` builds). The decode step on the ring then traces as one
        graph with no host sync (`torch.compile(fullgraph=True)`), and generate() compiles the
        forward where transformers auto-compiles (CUDA, or any device with a `compile_config`
        allowing it); generate() also prepares the step's mask outside the compiled forward, so the
        compiled step sees fixed-size inputs. Off by default: the eager step is then used
        everywhere, as before. The cache is compileable only if every layer is, so a model with
        unconverted full-attention layers (a growing `DynamicLayer`) stays eager."""
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
                layer.is_compileable = bool(compileable)
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
                tensors = (layer.keys, layer.values, layer.valid, *(layer.state or ()), *(layer.sinks or ()))
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
