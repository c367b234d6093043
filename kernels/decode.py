"""One decode step of the hybrid layer on a ring cache, in PyTorch (any device), and the state fold.

The ring layout (`DecodeCache`), per layer, for window w and the next token at absolute position T:

    k_win, v_win  [B, Hkv, w-1, D]   the last w-1 raw keys/values (after RoPE): position p lives in
                                      slot p % (w-1); a step writes one slot, nothing shifts
    valid         [B, w-1] bool       slot holds a real key (False: padding or never filled)
    S, z          fp32 [B, H, F, D], [B, H, F]   sum of phi_k v^T and phi_k over every valid key
                                      older than the window (positions <= T-w)
    position      [1] int64           T, on the device (no host sync per step); or [B]: a position
                                      per row (rows of different requests, as vLLM batches them;
                                      not with softmax sinks)
    phi_k_win     optional [B, H, w-1, F]: phi_k of the ring's keys (same slots), only read by the
                                      modes whose linear branch covers the window

One step (`hybrid_decode_torch`, the same contract as `triton_decode.hybrid_decode_triton`):
  1. attend: softmax over the w-1 ring keys + the new key (window), linear readout of (S, z)
     (plus the window's keys in `linear_only` / `linear_covers_window`), one shared normaliser:
     row T of the uncached forward (SPEC §2);
  2. fold the key leaving the window (slot T % (w-1), position T-w+1) into (S, z) — whatever the
     mode, so the cache stays valid when modes are switched at run time; with w = 1 the new key
     itself leaves at once;
  3. write the new key/value/validity into that slot; position += 1.
The query heads of a KV group are rows of one matmul against that group's ring (keys and values
are never expanded per query head), and all arithmetic is fp32.

Softmax sinks (`softmax_sinks` = n > 0, SPEC §2): the caller passes `sinks` = (k, v, positions,
valid) of the sinks among the tokens before the new one (the cache keeps them beside the ring). The
sinks older than the window join the softmax; a sink in the ring is already there; the new token
is a sink while fewer than n valid sinks precede it. Sinks are in no linear sum: the key leaving
the window (or the new key, w = 1) is not folded into (S, z) when it is a sink, and the modes whose
linear branch covers the window skip the sinks of the ring and the new key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: tokens per step of `fold_into_state`: bounds the fp32 temporaries of a long prefill's fold
FOLD_CHUNK = 1024


@dataclass
class DecodeCache:
    """Per-layer decode cache; see the module docstring for the layout."""

    k_win: torch.Tensor
    v_win: torch.Tensor
    valid: torch.Tensor
    S: torch.Tensor
    z: torch.Tensor
    position: torch.Tensor
    phi_k_win: torch.Tensor | None = None

    @property
    def window(self) -> int:
        return self.k_win.shape[2] + 1

    @classmethod
    def empty(cls, batch: int, heads: int, kv_heads: int, head_dim: int, feature_dim: int, window: int, *,
              dtype: torch.dtype, device, keep_phi_k: bool = False, value_dim: int | None = None) -> DecodeCache:
        slots, dv = window - 1, head_dim if value_dim is None else value_dim
        return cls(
            k_win=torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
            v_win=torch.zeros(batch, kv_heads, slots, dv, dtype=dtype, device=device),
            valid=torch.zeros(batch, slots, dtype=torch.bool, device=device),
            S=torch.zeros(batch, heads, feature_dim, dv, dtype=torch.float32, device=device),
            z=torch.zeros(batch, heads, feature_dim, dtype=torch.float32, device=device),
            position=torch.zeros(1, dtype=torch.int64, device=device),
            phi_k_win=(torch.zeros(batch, heads, slots, feature_dim, dtype=dtype, device=device)
                       if keep_phi_k else None),
        )

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], window: int,
                     *, key_valid: torch.Tensor | None = None, phi_k: torch.Tensor | None = None) -> DecodeCache:
        """Cache after a prefill of Tk tokens: k, v [B,Hkv,Tk,D] (and phi_k [B,H,Tk,F] to keep the
        phi_k ring), state = the (S, z) over all but the last window-1 keys (e.g. what
        `hybrid_attention_triton(..., return_state=True)` returned for that prefill)."""
        B, Hkv, Tk, D = k.shape
        S, z = state
        H, F = S.shape[1], S.shape[2]
        cache = cls.empty(B, H, Hkv, D, F, window, dtype=k.dtype, device=k.device, keep_phi_k=phi_k is not None,
                          value_dim=v.shape[-1])
        cache.S.copy_(S)
        cache.z.copy_(z)
        cache.position.fill_(Tk)
        cache.write_window(k, v, Tk, key_valid=key_valid, phi_k=phi_k)
        return cache

    def write_window(self, k: torch.Tensor, v: torch.Tensor, end: int, *, key_valid: torch.Tensor | None = None,
                     phi_k: torch.Tensor | None = None) -> None:
        """Lay the last min(w-1, n) of n chronological tokens (positions end-n .. end-1) into their
        slots (position p -> slot p % (w-1)); slots not written become invalid."""
        slots, n = self.window - 1, k.shape[2]
        if slots == 0:
            return
        keep = min(slots, n)
        self.valid.zero_()
        if keep == 0:
            return
        pos = torch.arange(end - keep, end, device=k.device)
        slot = pos % slots
        src = torch.arange(n - keep, n, device=k.device)
        self.k_win[:, :, slot] = k[:, :, src].to(self.k_win.dtype)
        self.v_win[:, :, slot] = v[:, :, src].to(self.v_win.dtype)
        self.valid[:, slot] = True if key_valid is None else key_valid[:, src].bool()
        if self.phi_k_win is not None and phi_k is not None:
            self.phi_k_win[:, :, slot] = phi_k[:, :, src].to(self.phi_k_win.dtype)

    def evict_slot(self) -> torch.Tensor:
        """[1] (or [B], a position per row) int64: ring slot of the key that leaves the window after
        the next step."""
        return self.position % max(self.window - 1, 1)

    def evicted_keys(self, slot: int | None = None) -> torch.Tensor:
        """[B, Hkv, 1, D]: raw key at position T-w+1 (apply the feature map to get phi_k_evict); `slot`:
        its ring slot where the caller knows it on the host (a view then)."""
        return ring_take(self.k_win, self.evict_slot() if slot is None else slot)

    def write_slot(self, slot: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                   phi_k: torch.Tensor | None = None) -> None:
        """Step 3: the new token ([B, Hkv, 1, D], valid [B]) into ring slot `slot` ([1] or [B])."""
        ring_put(self.k_win, slot, k)
        ring_put(self.v_win, slot, v)
        ring_put(self.valid, slot, valid.reshape(-1, 1))
        if self.phi_k_win is not None and phi_k is not None:
            ring_put(self.phi_k_win, slot, phi_k)

    def chronological(self, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, valid) of the ring's tokens oldest first, copies (positions max(0, P-w+1) .. P-1,
        P = `position`, passed as a Python int so that no host sync is needed)."""
        slots = self.window - 1
        n = min(slots, position)
        if position <= slots or slots == 0:
            idx = torch.arange(n, device=self.k_win.device)
        else:
            idx = (torch.arange(slots, device=self.k_win.device) + position % slots) % slots
        return self.k_win.index_select(2, idx), self.v_win.index_select(2, idx), self.valid.index_select(1, idx)


def check_position(cache: DecodeCache, batch: int) -> None:
    """cache.position must be int64 [1] (shared) or [batch] (one per row)."""
    p = cache.position
    if p.dtype != torch.int64 or p.dim() != 1 or p.shape[0] not in (1, batch):
        raise ValueError(f"cache.position: expected an int64 tensor [1] or [{batch}] (one per row), got "
                         f"{p.dtype} {tuple(p.shape)}")


def ring_take(t: torch.Tensor, slot: torch.Tensor | int) -> torch.Tensor:
    """Ring slot `slot` of every row of a ring tensor (4-D [B, X, w-1, ...]: slots on dim 2; 2-D
    `valid` [B, w-1]: dim 1), keeping that dim (size 1). slot [1]: the same slot for every row; [B]:
    one slot per row; an int: a slot known on the host (a view)."""
    d = 1 if t.dim() == 2 else 2
    if isinstance(slot, int):  # known on the host (an eager step): a view, no index kernel
        return t.narrow(d, slot, 1)
    if slot.numel() == 1:
        return t.index_select(d, slot.reshape(1))
    rows = torch.arange(t.shape[0], device=t.device)
    return (t[rows, slot] if d == 1 else t[rows, :, slot]).unsqueeze(d)


def ring_put(t: torch.Tensor, slot: torch.Tensor | int, value: torch.Tensor) -> None:
    """In place: write `value` (shaped as `ring_take(t, slot)` returns) into ring slot `slot`."""
    d = 1 if t.dim() == 2 else 2
    if isinstance(slot, int):
        t.narrow(d, slot, 1).copy_(value)
        return
    value = value.to(t.dtype)
    if slot.numel() == 1:
        t.index_copy_(d, slot.reshape(1), value)
        return
    rows = torch.arange(t.shape[0], device=t.device)
    if d == 1:
        t[rows, slot] = value.reshape(-1)
    else:
        t[rows, :, slot] = value.squeeze(2)


def fold_into_state(state: tuple[torch.Tensor, torch.Tensor], phi_k: torch.Tensor, v: torch.Tensor,
                    valid: torch.Tensor, chunk: int = FOLD_CHUNK, inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """S += sum_j phi_k_j v_j^T and z += sum_j phi_k_j over the valid tokens j, in fp32; returns (S, z).

    state: S [B, H, F, D], z [B, H, F] (fp32, contiguous); phi_k [B, H, T, F] per query head; v
    [B, Hkv, T, D] with H = G * Hkv (GQA); valid [B, T] bool. The G query heads of a KV group are
    the rows of one matmul against that group's values, so V is never expanded to H heads, and the
    fold walks T in chunks of `chunk` tokens, so the fp32 temporaries are O(chunk), not O(T).
    inplace=False adds out of place (autograd can then differentiate through the fold)."""
    S, z = state
    B, H, F, D = S.shape
    Hkv, T = v.shape[1], v.shape[2]
    G = H // Hkv
    if T == 1 and inplace:  # a decode step's one token: an outer product, no chunk loop or reshapes
        w = _f32(phi_k).reshape(B, H, F) * valid.reshape(B, 1, 1)  # bool promotes: no conversion op
        z.add_(w)
        S.view(B, Hkv, G, F, D).addcmul_(w.view(B, Hkv, G, F, 1), _f32(v).reshape(B, Hkv, 1, 1, D))
        return S, z
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        fk = phi_k[:, :, s:e].float() * valid[:, None, s:e, None].float()  # [B, H, c, F]
        fkT = fk.view(B, Hkv, G, e - s, F).permute(0, 1, 2, 4, 3).reshape(B * Hkv, G * F, e - s)
        vv = v[:, :, s:e].float().reshape(B * Hkv, e - s, D)
        if inplace:
            z.add_(fk.sum(2))
            S.view(B * Hkv, G * F, D).baddbmm_(fkT, vv)
        else:
            z = z + fk.sum(2)
            S = S + torch.bmm(fkT, vv).view(B, H, F, D)
    return S, z


@torch.no_grad()
def hybrid_decode_torch(
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
    slot: int | None = None,
) -> torch.Tensor:
    """One decode step; equals row T of the uncached forward over all T+1 keys.

    slot: T % (w-1) as a Python int, where the caller knows T on the host (an eager step; the
    position must be shared, [1]): the evicted slot is then read and written through views, with
    no index kernels. None (a compiled step, or a position per row): it is computed on the device.

    softmax_sinks / sinks: the softmax-sinks arm (module docstring): sinks = (k [B,Hkv,S,D],
    v [B,Hkv,S,Dv], absolute positions [B,S] int64, valid [B,S] bool) of the sinks before the new
    token (entries at positions >= T are ignored); None: no valid sink precedes it. The state in
    `cache` must hold no sink (as `HybridCache` keeps it).

    q [B,H,1,D], k/v [B,Hkv,1,D] of the new token (after RoPE), phi_q/phi_k [B,H,1,F] of it,
    phi_k_evict [B,H,1,F]: phi_k of `cache.evicted_keys()` (needed to fold it, unless the cache
    keeps a phi_k ring), key_valid [B] bool for the new token (default all valid). Modes whose
    linear branch covers the window (`linear_only`, `hybrid` with linear_covers_window) need
    `cache.phi_k_win`. With update_cache (default) the cache is advanced in place. Returns
    y [B, H, 1, D] in q's dtype. No autograd (inference only)."""
    if mode not in ("hybrid", "swa_only", "linear_only"):
        raise ValueError(f"mode must be one of ('hybrid', 'swa_only', 'linear_only'), got {mode!r}")
    B, H, Tq, D = q.shape
    Hkv, W1, DV = cache.k_win.shape[1], cache.k_win.shape[2], cache.v_win.shape[-1]
    if Tq != 1 or tuple(k.shape) != (B, Hkv, 1, D) or tuple(v.shape) != (B, Hkv, 1, DV):
        raise ValueError(f"q, k, v must be one new token: q [B, H, 1, D], k/v [{B}, {Hkv}, 1, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    G, F = H // Hkv, cache.S.shape[2]
    lin_window = mode == "linear_only" or (mode == "hybrid" and linear_covers_window)
    if lin_window and W1 and cache.phi_k_win is None:
        raise ValueError(f"mode {mode!r} (linear_covers_window={linear_covers_window}) reads phi_k of the window: "
                         "pass a cache with phi_k_win")
    if update_cache and W1 and cache.phi_k_win is None and phi_k_evict is None:
        raise ValueError("phi_k_evict [B, H, 1, F] (phi_k of cache.evicted_keys()) is required to fold the evicted "
                         "key when the cache keeps no phi_k ring")
    if isinstance(softmax_sinks, bool) or not isinstance(softmax_sinks, int) or softmax_sinks < 0:
        raise ValueError(f"softmax_sinks: expected an integer >= 0, got {softmax_sinks!r}")
    if sinks is not None and not softmax_sinks:
        raise ValueError("sinks: given with softmax_sinks=0 (no sinks); pass softmax_sinks=n")
    check_position(cache, B)
    if softmax_sinks and cache.position.numel() != 1:
        raise ValueError(f"cache.position: softmax sinks need one position shared by the batch ([1]), got "
                         f"{tuple(cache.position.shape)}")
    if slot is not None and (cache.position.numel() != 1 or not 0 <= slot < max(W1, 1)):
        raise ValueError(f"slot: expected an int in [0, {max(W1, 1)}) with a shared position [1], got {slot!r} "
                         f"with position {tuple(cache.position.shape)}")
    f32 = torch.float32
    if key_valid is None:
        new_valid = torch.ones(B, dtype=torch.bool, device=q.device)
    else:
        new_valid = key_valid.reshape(B)
        if new_valid.dtype != torch.bool or new_valid.device != q.device:
            new_valid = new_valid.to(device=q.device, dtype=torch.bool)
    sink = _sink_step(cache, sinks, softmax_sinks, new_valid, B, Hkv, D, DV) if softmax_sinks else None
    # Few, whole-tensor ops, none that is a no-op: on CPU a step costs about one dispatch per op,
    # whatever the sizes (dtype conversions only where the dtype differs). The G query heads of a
    # KV group are the rows of one bmm against that group's keys; gamma and alpha scale p and
    # phi_q, so the window sums and the state readout add up in the readout's bmm.
    kn, vn = _f32(k), _f32(v)  # [B, Hkv, 1, D] (checked above)
    num = den = None
    if mode != "linear_only":  # one softmax over [sinks older than the window,] the ring and the new key
        keys, values, valid = [_f32(cache.k_win), kn], [_f32(cache.v_win), vn], [cache.valid, new_valid[:, None]]
        if sink is not None and sink["k"].shape[2]:
            keys.insert(0, sink["k"])
            values.insert(0, sink["v"])
            valid.insert(0, sink["outside"])
        n = sum(t.shape[2] for t in keys)
        qg = _f32(q).reshape(B * Hkv, G, D) * scale
        s = torch.bmm(qg, torch.cat(keys, 2).reshape(B * Hkv, n, D).transpose(1, 2)).view(B, Hkv, G, n)
        s.masked_fill_(~torch.cat(valid, 1).reshape(B, 1, 1, n), float("-inf"))
        # row max over the valid keys; a row with none gets the lowest finite value, so every p is 0
        p = s.sub_(s.amax(-1, keepdim=True).clamp_min_(torch.finfo(f32).min)).exp_()
        p = p.mul_(_f32(gamma).reshape(1, Hkv, G, 1)).view(B * Hkv, G, n)
        num = torch.bmm(p, torch.cat(values, 2).reshape(B * Hkv, n, DV)).view(B * H, 1, DV)
        den = p.sum(-1).view(B * H, 1, 1)
    if mode != "swa_only":  # the linear branch: the state (+ the window's keys where it covers them)
        pq = (_f32(phi_q).reshape(B, H, 1, F) * _f32(alpha).reshape(1, H, 1, 1)).view(B * H, 1, F)
        # reshape, not view: a cache's S and z may be strided views (vLLM's state rows); read only here
        S, z = cache.S.reshape(B * H, F, DV), cache.z.reshape(B * H, F, 1)
        num = torch.bmm(pq, S) if num is None else torch.baddbmm(num, pq, S)
        den = torch.bmm(pq, z) if den is None else torch.baddbmm(den, pq, z)
        if lin_window:  # the window's keys in the linear sum: a_j = alpha * phi_q . phi_k_j
            pq = pq.view(B, H, F)
            new_lin = new_valid if sink is None else new_valid & ~sink["new"]
            a_new = (pq * _f32(phi_k).reshape(B, H, F)).sum(-1).view(B, Hkv, G, 1) * new_lin.reshape(B, 1, 1, 1)
            num = num + (a_new * vn).view(B * H, 1, DV)
            den = den + a_new.view(B * H, 1, 1)
            if W1:
                win_lin = cache.valid if sink is None else cache.valid & ~sink["ring"]
                a_win = torch.bmm(_f32(cache.phi_k_win).reshape(B * H, W1, F), pq.view(B * H, F, 1)).view(B, H, W1)
                a_win = (a_win * win_lin.reshape(B, 1, W1)).view(B * Hkv, G, W1)
                num = num + torch.bmm(a_win, _f32(cache.v_win).reshape(B * Hkv, W1, DV)).view(B * H, 1, DV)
                den = den + a_win.sum(-1).view(B * H, 1, 1)
    # feature maps are non-negative, so den >= 0, and den == 0 only where every term of num is 0:
    # the clamp alone gives the empty row its 0 (as the kernels' den != 0 test)
    y = num.div_(den.clamp_min_(1e-30)).view(B, H, 1, DV)
    if update_cache:
        _advance(cache, k, v, phi_k, phi_k_evict, new_valid, sink, slot)
    return y if y.dtype == q.dtype else y.to(q.dtype)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, without a dispatch when it already is."""
    return t if t.dtype == torch.float32 else t.float()


def _sink_step(cache: DecodeCache, sinks, n: int, new_valid, B, Hkv, D, DV) -> dict:
    """Which keys of this step are sinks: "outside" [B,S] (valid sinks older than the window, extra
    softmax keys "k"/"v" [B,Hkv,S,*] fp32), "ring" [B,w-1] (ring slots holding a sink), "new" [B]
    (the new token is one: fewer than n valid sinks precede it)."""
    W1, dev = cache.k_win.shape[2], cache.k_win.device
    T = cache.position.reshape(())
    if sinks is None:
        sk = torch.zeros(B, Hkv, 0, D, device=dev)
        sv = torch.zeros(B, Hkv, 0, DV, device=dev)
        spos = torch.zeros(B, 0, dtype=torch.long, device=dev)
        svalid = torch.zeros(B, 0, dtype=torch.bool, device=dev)
    else:
        sk, sv, spos, svalid = sinks
        for name, t, shape in (("k", sk, (B, Hkv, None, D)), ("v", sv, (B, Hkv, None, DV))):
            if t.dim() != 4 or any(a is not None and a != b for a, b in zip(shape, t.shape)):
                raise ValueError(f"sinks: {name} expected [{B}, {Hkv}, S, {shape[-1]}], got {tuple(t.shape)}")
        if tuple(spos.shape) != (B, sk.shape[2]) or tuple(svalid.shape) != (B, sk.shape[2]):
            raise ValueError(f"sinks: positions and valid expected [{B}, {sk.shape[2]}], got "
                             f"{tuple(spos.shape)}, {tuple(svalid.shape)}")
        spos = spos.to(device=dev, dtype=torch.long)
        svalid = svalid.to(device=dev, dtype=torch.bool) & (spos < T)
    ring_pos = T - 1 - (T - 1 - torch.arange(W1, device=dev)).remainder(max(W1, 1))  # position in each slot
    ring = (svalid[:, None, :] & (spos[:, None, :] == ring_pos[None, :, None])).any(-1)  # [B, W1]
    return dict(k=sk.to(torch.float32), v=sv.to(torch.float32), outside=svalid & (spos < T - W1), ring=ring,
                new=new_valid & (svalid.long().sum(1) < n))


def _advance(cache: DecodeCache, k, v, phi_k, phi_k_evict, new_valid, sink=None, slot: int | None = None) -> None:
    """Steps 2-3: fold the key leaving the window (not a sink), write the new token into its slot,
    position += 1. With a host `slot` the slot is read and written through views."""
    W1 = cache.k_win.shape[2]
    if W1 == 0:  # w = 1: the new key leaves the window at once
        fold_into_state((cache.S, cache.z), phi_k, v, (new_valid if sink is None else new_valid & ~sink["new"])[:, None])
    else:
        slot = cache.evict_slot() if slot is None else slot
        phi_old = ring_take(cache.phi_k_win, slot) if cache.phi_k_win is not None else phi_k_evict
        old_valid = ring_take(cache.valid, slot)
        if sink is not None:
            old_valid = old_valid & ~ring_take(sink["ring"], slot)
        fold_into_state((cache.S, cache.z), phi_old, ring_take(cache.v_win, slot), old_valid)  # before the write
        cache.write_slot(slot, k, v, new_valid, phi_k)
    cache.position.add_(1)
