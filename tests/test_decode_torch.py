"""kernels/decode.py: the PyTorch decode step on a ring cache against the readable quadratic
reference (kernels/reference.py, float64 inputs), every kernel mode, with and without the overlap
option, windows 1 .. 64 around the ring boundaries, GQA, left padding, prefills shorter and longer
than the window; the state and ring after the steps equal a fresh `from_prefill` of the longer
prefix. (The state is fp32 by contract, hence the fp32 tolerance.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_hybrid_attn.kernels.decode import DecodeCache, fold_into_state, hybrid_decode_torch
from hf_hybrid_attn.kernels.reference import hybrid_attention_reference, linear_state


def _inputs(B=3, H=6, Hkv=2, T=20, D=8, F=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    phi_q = torch.rand(B, H, T, F, generator=g, dtype=torch.float64) + 0.05
    phi_k = torch.rand(B, H, T, F, generator=g, dtype=torch.float64) + 0.05
    gamma = torch.rand(H, generator=g, dtype=torch.float64) * 0.9 + 0.05
    alpha = torch.rand(H, generator=g, dtype=torch.float64) * 0.9 + 0.05
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2, : T - 2] = False  # almost everything padded: early rows see nothing
    return q, k, v, phi_q, phi_k, gamma, alpha, valid


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("covers", [False, True])
@pytest.mark.parametrize("w", [1, 2, 5, 16])
@pytest.mark.parametrize("prefill", [0, 1, 3, 15, 17])
@pytest.mark.parametrize("host_slot", [False, True], ids=["device-slot", "host-slot"])
def test_decode_steps_equal_the_reference_rows(mode, covers, w, prefill, host_slot):
    """host_slot: the eager caller passes the ring slot T % (w-1) as an int (views instead of index
    kernels); otherwise the step computes it from the device position (the compiled path)."""
    T = prefill + 9
    q, k, v, phi_q, phi_k, gamma, alpha, valid = _inputs(T=T)
    scale = 0.35
    ref = hybrid_attention_reference(q, k, v, phi_q, phi_k, gamma, alpha, window=w, scale=scale, mode=mode,
                                     linear_covers_window=covers, key_valid=valid)
    keep_ring = mode == "linear_only" or (mode == "hybrid" and covers)
    state = linear_state(phi_k, v, end=prefill - (w - 1), key_valid=valid)
    cache = DecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], state, w, key_valid=valid[:, :prefill],
                                     phi_k=phi_k[:, :, :prefill] if keep_ring else None)
    for t in range(prefill, T):
        old = t - (w - 1)  # the position leaving the window after this step
        evict = phi_k[:, :, old : old + 1] if w > 1 and old >= 0 else torch.zeros_like(phi_k[:, :, :1])
        y = hybrid_decode_torch(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], phi_q[:, :, t : t + 1],
                                phi_k[:, :, t : t + 1], gamma, alpha, cache, scale=scale, mode=mode,
                                linear_covers_window=covers, phi_k_evict=None if keep_ring else evict,
                                key_valid=valid[:, t], slot=t % max(w - 1, 1) if host_slot else None)
        assert y.dtype == q.dtype and y.shape == (3, 6, 1, 8)
        torch.testing.assert_close(y, ref[:, :, t : t + 1], atol=2e-6, rtol=2e-5, msg=lambda m, t=t: f"step {t}: {m}")
    assert int(cache.position) == T
    fresh = DecodeCache.from_prefill(k, v, linear_state(phi_k, v, end=T - (w - 1), key_valid=valid), w, key_valid=valid)
    torch.testing.assert_close(cache.S, fresh.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.z, fresh.z, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.valid, fresh.valid)
    assert torch.equal(cache.k_win[fresh.valid[:, None, :].expand_as(cache.k_win[..., 0])],
                       fresh.k_win[fresh.valid[:, None, :].expand_as(fresh.k_win[..., 0])])
    torch.testing.assert_close(cache.chronological(T)[0], k[:, :, T - min(T, w - 1):] if w > 1 else k[:, :, :0])


def test_decode_refuses_what_it_cannot_compute():
    q, k, v, phi_q, phi_k, gamma, alpha, valid = _inputs(T=6)
    cache = DecodeCache.from_prefill(k[:, :, :5], v[:, :, :5], linear_state(phi_k, v, end=1), 5)
    step = dict(scale=0.3)
    one = (q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6], phi_q[:, :, 5:6], phi_k[:, :, 5:6], gamma, alpha, cache)
    with pytest.raises(ValueError, match="phi_k_evict"):
        hybrid_decode_torch(*one, **step)
    with pytest.raises(ValueError, match="phi_k of the window"):
        hybrid_decode_torch(*one, mode="linear_only", phi_k_evict=phi_k[:, :, :1], **step)
    with pytest.raises(ValueError, match="mode must be one of"):
        hybrid_decode_torch(*one, mode="sinks_only", **step)
    with pytest.raises(ValueError, match="one new token"):
        hybrid_decode_torch(q[:, :, 4:6], *one[1:], **step)
    for bad in (4, -1):  # 4 slots (w = 5): the slot of position 5 is 1
        with pytest.raises(ValueError, match=r"slot: expected an int in \[0, 4\)"):
            hybrid_decode_torch(*one, phi_k_evict=phi_k[:, :, 1:2], slot=bad, **step)
    per_row = dataclasses.replace(cache, position=cache.position.expand(3).clone())
    with pytest.raises(ValueError, match="slot: .*shared position"):
        hybrid_decode_torch(*one[:-1], per_row, phi_k_evict=phi_k[:, :, 1:2], slot=1, **step)
    before = (cache.S.clone(), cache.k_win.clone(), int(cache.position))
    hybrid_decode_torch(*one, phi_k_evict=phi_k[:, :, 1:2], update_cache=False, **step)
    assert torch.equal(cache.S, before[0]) and torch.equal(cache.k_win, before[1]) and int(cache.position) == before[2]


def test_fold_into_state_chunks_give_the_same_state():
    _, k, v, _, phi_k, _, _, valid = _inputs(T=37)
    ref = linear_state(phi_k, v, end=37, key_valid=valid)
    for chunk in (1, 5, 37, 1024):
        state = (torch.zeros_like(ref[0]), torch.zeros_like(ref[1]))
        fold_into_state(state, phi_k, v, valid, chunk=chunk)
        torch.testing.assert_close(state[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[1], ref[1], atol=1e-5, rtol=1e-5)


def stacked_per_row_caches(prefills, w, keep_ring, seed=1):
    """Rows of different lengths (prefills[b] tokens each, as vLLM batches requests): one cache per
    row (shared position) and their stack with a position per row. Returns the inputs of 3 more
    tokens per row, the per-row caches and the stacked cache."""
    B, T = len(prefills), max(prefills) + 3
    q, k, v, phi_q, phi_k, gamma, alpha, _ = _inputs(B=B, T=T, seed=seed)
    q, k, v, phi_q, phi_k = (t.float() for t in (q, k, v, phi_q, phi_k))
    rows = []
    for b, P in enumerate(prefills):
        sl = slice(b, b + 1)
        state = tuple(s.float() for s in linear_state(phi_k[sl].double(), v[sl].double(), end=P - (w - 1)))
        rows.append(DecodeCache.from_prefill(k[sl, :, :P], v[sl, :, :P], state, w,
                                             phi_k=phi_k[sl, :, :P] if keep_ring else None))
    cat = {f: torch.cat([getattr(r, f) for r in rows]) for f in ("k_win", "v_win", "valid", "S", "z")}
    stacked = DecodeCache(**cat, position=torch.tensor(prefills, dtype=torch.int64),
                          phi_k_win=torch.cat([r.phi_k_win for r in rows]) if keep_ring else None)
    return (q, k, v, phi_q, phi_k, gamma.float(), alpha.float()), rows, stacked


def _to(cache: DecodeCache, device) -> DecodeCache:
    return DecodeCache(**{f.name: None if getattr(cache, f.name) is None else getattr(cache, f.name).to(device)
                          for f in dataclasses.fields(cache)})


def check_per_row_positions(step, mode, covers, w, prefills=(0, 3, 7, 20), device="cpu"):
    """`step` (hybrid_decode_torch or the Triton kernel) on a batch whose rows stand at different
    positions equals each row stepped alone: outputs, state, ring and positions, for 3 steps."""
    keep_ring = mode == "linear_only" or (mode == "hybrid" and covers)
    inputs, rows, stacked = stacked_per_row_caches(prefills, w, keep_ring)
    (q, k, v, phi_q, phi_k, gamma, alpha) = (t.to(device) for t in inputs)
    rows, stacked = [_to(r, device) for r in rows], _to(stacked, device)
    B = len(prefills)
    kw = dict(scale=0.35, mode=mode, linear_covers_window=covers)
    for i in range(3):
        pos = [P + i for P in prefills]
        one = [torch.cat([t[b : b + 1, :, p : p + 1] for b, p in enumerate(pos)]) for t in (q, k, v, phi_q, phi_k)]
        evict = None
        if not keep_ring:  # phi_k of each row's key leaving the window (zeros before there is one)
            evict = torch.cat([phi_k[b : b + 1, :, p - w + 1 : p - w + 2] if w > 1 and p - w + 1 >= 0
                               else torch.zeros_like(phi_k[:1, :, :1]) for b, p in enumerate(pos)])
        y = step(*one, gamma, alpha, stacked, phi_k_evict=evict, **kw)
        for b in range(B):
            yb = step(*(t[b : b + 1] for t in one), gamma, alpha, rows[b],
                      phi_k_evict=None if evict is None else evict[b : b + 1], **kw)
            torch.testing.assert_close(y[b : b + 1], yb, atol=1e-5, rtol=1e-5, msg=lambda m, b=b: f"row {b}: {m}")
    for b in range(B):
        for f in ("S", "z", "k_win", "v_win", "valid") + (("phi_k_win",) if keep_ring else ()):
            torch.testing.assert_close(getattr(stacked, f)[b : b + 1], getattr(rows[b], f), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, b=b, f=f: f"row {b} {f}: {m}")
    assert stacked.position.tolist() == [P + 3 for P in prefills]


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("covers", [False, True])
@pytest.mark.parametrize("w", [1, 2, 5])
def test_a_position_per_row_equals_each_row_alone(mode, covers, w):
    check_per_row_positions(hybrid_decode_torch, mode, covers, w)


def test_position_shape_and_sinks_are_checked():
    (q, k, v, phi_q, phi_k, gamma, alpha), _, stacked = stacked_per_row_caches((2, 4, 5), 3, False)
    one = [t[:, :, 4:5] for t in (q, k, v, phi_q, phi_k)]
    kw = dict(scale=0.3, phi_k_evict=phi_k[:, :, :1])
    stacked.position = torch.tensor([2, 4])
    with pytest.raises(ValueError, match=r"cache.position: expected an int64 tensor \[1\] or \[3\]"):
        hybrid_decode_torch(*one, gamma, alpha, stacked, **kw)
    stacked.position = torch.tensor([2, 4, 5])
    with pytest.raises(ValueError, match=r"cache.position: softmax sinks need one position shared by the batch"):
        hybrid_decode_torch(*one, gamma, alpha, stacked, softmax_sinks=2, **kw)


def _row_strided(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """The same values in rows with padding between them (as vLLM's paged state rows lie): a view
    whose batch stride is not the product of the other sizes, so it cannot be flattened by view()."""
    per_row = t[0].numel()
    buf = torch.full((t.shape[0], per_row + pad), -7, dtype=t.dtype)
    view = buf[:, :per_row].unflatten(1, t.shape[1:])
    view.copy_(t)
    return view


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("host_slot", [False, True], ids=["device-slot", "host-slot"])
def test_decode_on_row_strided_cache_rows(mode, host_slot):
    """A cache whose tensors are row-strided views (vLLM's state rows) gives the same outputs as a
    contiguous one and is updated in place, through the views."""
    w, prefill, T = 5, 7, 12
    q, k, v, phi_q, phi_k, gamma, alpha, valid = _inputs(T=T)
    keep_ring = mode == "linear_only"
    state = linear_state(phi_k, v, end=prefill - (w - 1), key_valid=valid)

    def fresh():
        return DecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], state, w, key_valid=valid[:, :prefill],
                                        phi_k=phi_k[:, :, :prefill] if keep_ring else None)
    plain = fresh()
    c = fresh()
    strided = dataclasses.replace(c, **{f.name: _row_strided(getattr(c, f.name)) for f in dataclasses.fields(c)
                                        if f.name != "position" and getattr(c, f.name) is not None})
    with pytest.raises(RuntimeError):
        strided.S.view(-1)  # really not flat
    for t in range(prefill, T):
        old = t - (w - 1)
        evict = None if keep_ring else phi_k[:, :, old : old + 1]
        one = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], phi_q[:, :, t : t + 1], phi_k[:, :, t : t + 1],
               gamma, alpha)
        kw = dict(scale=0.35, mode=mode, phi_k_evict=evict, key_valid=valid[:, t],
                  slot=t % (w - 1) if host_slot else None)
        y_plain = hybrid_decode_torch(*one, plain, **kw)
        y_strided = hybrid_decode_torch(*one, strided, **kw)
        torch.testing.assert_close(y_strided, y_plain, rtol=0, atol=0)
    for f in ("S", "z", "k_win", "v_win", "valid"):
        assert torch.equal(getattr(strided, f), getattr(plain, f)), f
