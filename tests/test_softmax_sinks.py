"""The softmax-sinks arm (issue 13 item 4, SPEC §2 "Softmax sinks"): `HybridConfig(softmax_sinks=n)`.

The first n valid keys of a sequence (the sink set Sigma) always take part in the window softmax and
never enter the linear branch or the recurrent state:

    W'(i) = W(i) + { j in Sigma : j <= i }      L'(i) = L(i) - Sigma   (overlap: { j <= i } - Sigma)

Everything here is checked against `dense_sinks`, a float64 definition written out below with
explicit per-row sets (independent of kernels/reference.py): the reference and the chunked path
(forward and every gradient), the mixer (gradients of the feature maps and window logits), the
decode step on a ring, cached generation through HybridCache, the segmented prefill, the Triton
fallbacks, the config and the CLI override."""

from __future__ import annotations

import argparse
import itertools
import json
import warnings

import pytest
import torch
from test_cache import left_padded

import hf_hybrid_attn as hha
import hf_hybrid_attn.layers as layers
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn.compat import cache_kwargs, output_cache
from hf_hybrid_attn.kernels import (
    hybrid_attention,
    hybrid_attention_chunked,
    hybrid_attention_reference,
    linear_state,
)
from hf_hybrid_attn.kernels.decode import DecodeCache, hybrid_decode_torch
from hf_hybrid_attn.kernels.dispatch import warn_triton_softmax_sinks

DT = torch.float64
IMPLS = {"reference": hybrid_attention_reference,
         "chunked": lambda *a, **kw: hybrid_attention_chunked(*a, **kw, chunk_size=16)}
#: (mode, linear_covers_window) of every kernel configuration
KERNEL_CASES = [("hybrid", False), ("hybrid", True), ("swa_only", False), ("linear_only", False)]


# -- the definition, written out -------------------------------------------------------------------
def sink_set(valid_row: torch.Tensor, n: int) -> torch.Tensor:
    """[T] bool: the first n valid positions of one row."""
    out = torch.zeros_like(valid_row)
    out[torch.nonzero(valid_row)[:n, 0]] = True
    return out


def dense_sinks(q, k, v, phi_q, phi_k, gamma, alpha, *, window, scale, n, mode="hybrid", covers=False,
                valid=None, sinks_in_linear=False):
    """y [B, H, T, D] for queries = keys (T x T), from the SPEC sets per row; float64.

    sinks_in_linear=True is the wrong function that keeps the sinks in the linear branch too (a
    leak into the state), for the tests that must tell the two apart."""
    B, H, T, _ = q.shape
    G = H // k.shape[1]
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ys = []
    for b in range(B):
        sinks = sink_set(valid[b], n)[None, :]
        causal = (j <= i) & valid[b][None, :]
        W = (causal & (i - j < window)) | (causal & sinks)  # W'(i)
        L = causal if (covers or mode == "linear_only") else causal & (i - j >= window)
        if not sinks_in_linear:
            L = L & ~sinks  # L'(i)
        if mode == "linear_only":
            W = torch.zeros_like(W)
        if mode == "swa_only":
            L = torch.zeros_like(L)
        s = scale * q[b] @ ke[b].transpose(-1, -2)  # [H, T, T]
        s_w = s.masked_fill(~W, float("-inf"))
        c = s_w.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        e = torch.where(W, torch.exp(s_w - c), torch.zeros_like(s))
        a = (phi_q[b] @ phi_k[b].transpose(-1, -2)) * L
        g, al = gamma.view(H, 1, 1), alpha.view(H, 1, 1)
        num = g * (e @ ve[b]) + al * (a @ ve[b])
        den = g[..., 0] * e.sum(-1) + al[..., 0] * a.sum(-1)
        ys.append(torch.where((den != 0)[..., None], num / torch.where(den != 0, den, 1.0)[..., None], 0.0))
    return torch.stack(ys)


def make_inputs(T, B=3, H=4, Hkv=2, D=8, F=6, requires_grad=True, seed=0):
    """GQA inputs; row 1 left-padded by 3, row 2 by 6, row 0 has a masked key at position 1 (so its
    sinks are positions 0, 2, 3, ...)."""
    g = torch.Generator().manual_seed(T * 131 + seed)
    t = lambda *s: torch.randn(*s, dtype=DT, generator=g).requires_grad_(requires_grad)  # noqa: E731
    r = lambda *s: torch.rand(*s, dtype=DT, generator=g).add(0.05).requires_grad_(requires_grad)  # noqa: E731
    valid = torch.ones(B, T, dtype=torch.bool)
    if T > 2:
        valid[0, 1] = False
    valid[1, : min(3, T - 1)] = False
    valid[2, : min(6, T - 1)] = False
    return (t(B, H, T, D), t(B, Hkv, T, D), t(B, Hkv, T, D), r(B, H, T, F), r(B, H, T, F), r(H), r(H)), valid


def grads(y, args, go):
    return torch.autograd.grad(y, args, go, allow_unused=True, materialize_grads=True)


def first_sinks(k, v, valid, n, end):
    """(k, v, positions, valid) of the first n valid keys before position `end`, as a cache keeps
    them: [B, Hkv, n, D], [B, n]."""
    B = k.shape[0]
    idx = torch.zeros(B, n, dtype=torch.long)
    ok = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        found = torch.nonzero(valid[b, :end])[:n, 0]
        idx[b, : len(found)], ok[b, : len(found)] = found, True
    gk = idx[:, None, :, None]
    return (k.gather(2, gk.expand(-1, k.shape[1], -1, k.shape[-1])), v.gather(2, gk.expand(-1, v.shape[1], -1, v.shape[-1])),
            idx, ok)


# -- kernels: forward and backward -----------------------------------------------------------------
@pytest.mark.parametrize("T,w,n", list(itertools.product([1, 3, 63, 65, 200], [1, 5, 16, 64], [1, 4])))
def test_reference_and_chunked_match_the_definition(T, w, n):
    for (mode, covers), (name, impl) in itertools.product(KERNEL_CASES, IMPLS.items()):
        args, valid = make_inputs(T)
        kw = dict(window=w, scale=0.35, mode=mode, linear_covers_window=covers, key_valid=valid)
        want = dense_sinks(*args, window=w, scale=0.35, n=n, mode=mode, covers=covers, valid=valid)
        y = impl(*args, **kw, softmax_sinks=n)
        tag = f"{name} {mode} covers={covers}"
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10, msg=lambda m, t=tag: f"{t}: {m}")
        go = torch.randn_like(want)
        for a, b, gname in zip(grads(y, args, go), grads(want, args, go), "q k v phi_q phi_k gamma alpha".split()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, t=tag, g=gname: f"{t} d{g}: {m}")


@pytest.mark.parametrize("name", list(IMPLS))
def test_sinks_never_in_the_linear_branch(name):
    """The test that fails if sinks leaked into the linear branch/state: the output differs from
    the leaky function (sinks also in L) by far more than the tolerance, and from the plain hybrid
    (no sinks) too, while it equals the definition."""
    args, valid = make_inputs(200, requires_grad=False)
    for mode, covers in [("hybrid", False), ("hybrid", True), ("linear_only", False)]:
        kw = dict(window=5, scale=0.35, n=4, mode=mode, covers=covers, valid=valid)
        y = IMPLS[name](*args, window=5, scale=0.35, mode=mode, linear_covers_window=covers, key_valid=valid,
                        softmax_sinks=4)
        torch.testing.assert_close(y, dense_sinks(*args, **kw), rtol=1e-10, atol=1e-10)
        assert (y - dense_sinks(*args, **kw, sinks_in_linear=True)).abs().max() > 1e-3, mode
        plain = IMPLS[name](*args, window=5, scale=0.35, mode=mode, linear_covers_window=covers, key_valid=valid)
        assert (y - plain).abs().max() > 1e-3, mode


@pytest.mark.parametrize("name", list(IMPLS))
def test_sinks_are_the_first_valid_keys(name):
    """Padded/masked keys never count as sinks: changing them changes nothing, and the sinks of the
    left-padded row are its first non-pad tokens (shifting the row's content with its padding
    shifts the output)."""
    (q, k, v, fq, fk, g, a), valid = make_inputs(40, requires_grad=False)
    kw = dict(window=4, scale=0.3, key_valid=valid, softmax_sinks=2)
    y = IMPLS[name](q, k, v, fq, fk, g, a, **kw)
    k2, v2, fk2 = k.clone(), v.clone(), fk.clone()
    k2[~valid[:, None, :].expand_as(k[..., 0])] += 100.0
    v2[~valid[:, None, :].expand_as(v[..., 0])] -= 50.0
    fk2[~valid[:, None, :].expand_as(fk[..., 0])] *= 9.0
    y2 = IMPLS[name](q, k2, v2, fq, fk2, g, a, **kw)
    rows = valid[:, None, :, None].expand_as(y)
    torch.testing.assert_close(y[rows], y2[rows], rtol=0, atol=0)
    # row 1 (3 pads) against the same tokens without padding
    P = 3
    one = (q[1:2, :, P:], k[1:2, :, P:], v[1:2, :, P:], fq[1:2, :, P:], fk[1:2, :, P:], g, a)
    y_np = IMPLS[name](*one, window=4, scale=0.3, softmax_sinks=2)
    torch.testing.assert_close(y[1:2, :, P:], y_np, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Tq,Tk", [(1, 2), (1, 40), (3, 40), (16, 90), (17, 90), (40, 200)])
@pytest.mark.parametrize("w,n", [(1, 1), (5, 4), (16, 1), (16, 4)])
def test_suffix_queries_with_state_and_prefix_sinks(Tq, Tk, w, n):
    """The kernel contract of a cached call: keys [start, Tk) (the window buffer and the new
    queries), the state of every earlier non-sink key, and the earlier sinks as `prefix_sinks`:
    the rows equal the definition over the whole sequence; gradients reach the prefix sinks' k, v."""
    for (mode, covers), (name, impl) in itertools.product(KERNEL_CASES, IMPLS.items()):
        (q, k, v, fq, fk, g, a), valid = make_inputs(Tk, requires_grad=False)
        full = dense_sinks(q, k, v, fq, fk, g, a, window=w, scale=0.3, n=n, mode=mode, covers=covers, valid=valid)
        split = Tk - Tq
        start = max(0, split - (w - 1))
        is_sink = torch.stack([sink_set(valid[b], n) for b in range(valid.shape[0])])
        state = linear_state(fk, v, end=start, key_valid=valid & ~is_sink)
        pk, pv, _, pvalid = first_sinks(k, v, valid, n, start)
        pk, pv = pk.clone().requires_grad_(True), pv.clone().requires_grad_(True)
        y = impl(q[:, :, split:], k[:, :, start:], v[:, :, start:], fq[:, :, split:], fk[:, :, start:], g, a,
                 window=w, scale=0.3, mode=mode, linear_covers_window=covers, key_valid=valid[:, start:],
                 initial_state=state, softmax_sinks=n, prefix_sinks=(pk, pv, pvalid))
        tag = f"{name} {mode} covers={covers}"
        # the state is fp32 by contract: fp32 tolerance
        torch.testing.assert_close(y, full[:, :, split:], rtol=1e-5, atol=1e-6, msg=lambda m, t=tag: f"{t}: {m}")
        if mode != "linear_only" and bool(pvalid.any()):
            gk, gv = torch.autograd.grad(y.sum(), (pk, pv))
            assert gv[pvalid[:, None, :].expand_as(gv[..., 0])].abs().sum() > 0, tag
            assert torch.all(gk[~pvalid[:, None, :].expand_as(gk[..., 0])] == 0), tag


def test_softmax_sinks_zero_is_the_plain_kernel_bit_for_bit():
    args, valid = make_inputs(65, requires_grad=False)
    for mode, covers in KERNEL_CASES:
        kw = dict(window=5, scale=0.3, mode=mode, linear_covers_window=covers, key_valid=valid)
        for impl in (hybrid_attention_reference, hybrid_attention_chunked):
            assert torch.equal(impl(*args, **kw), impl(*args, **kw, softmax_sinks=0))
        assert torch.equal(hybrid_attention(*args, **kw, backend="torch"),
                           hybrid_attention(*args, **kw, backend="torch", softmax_sinks=0))


def test_bad_sink_arguments_are_named():
    args, valid = make_inputs(10, requires_grad=False)
    kw = dict(window=3, scale=0.3, key_valid=valid)
    for impl in (hybrid_attention_reference, hybrid_attention_chunked):
        with pytest.raises(ValueError, match="softmax_sinks"):
            impl(*args, **kw, softmax_sinks=-1)
        with pytest.raises(ValueError, match="prefix_sinks"):
            impl(*args, **kw, prefix_sinks=(args[1][:, :, :2], args[2][:, :, :2], valid[:, :2]))
        with pytest.raises(ValueError, match="prefix_sinks: v"):
            impl(*args, **kw, softmax_sinks=2, prefix_sinks=(args[1][:, :, :2], args[2][:, :, :3], valid[:, :2]))


# -- the mixer: gradients of the feature maps and window logits ------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("n,w", [(1, 5), (4, 5), (4, 16)])
def test_mixer_gradients_of_feature_maps_and_window_logits(backend, n, w):
    cfg = hha.HybridConfig(window=w, feature_dim=4, softmax_sinks=n, backend=backend, affine_mix=True)
    torch.manual_seed(3)
    mixer = layers.HybridMixer(cfg, num_heads=4, num_kv_heads=2, head_dim=8).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    (q, k, v, *_), valid = make_inputs(70)
    params = list(mixer.parameters())
    assert len(params) >= 3  # phi_q, phi_k weights and the window logits
    for mode, covers in KERNEL_CASES:
        mixer.linear_covers_window = covers
        y = mixer(q, k, v, valid, 0.35, mode=mode)
        phi_q, phi_k = mixer.features(q, k)
        want = dense_sinks(q, k, v, phi_q, phi_k, mixer.gamma().double(), mixer.alpha().double(), window=w,
                           scale=0.35, n=n, mode=mode, covers=covers, valid=valid)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
        go = torch.randn_like(want)
        names = ["q", "k", "v"] + [pname for pname, _ in mixer.named_parameters()]
        for a, b, name in zip(grads(y, (q, k, v, *params), go), grads(want, (q, k, v, *params), go), names):
            # gamma = sigmoid(window_logit) is fp32 by design: its gradient is rounded to fp32 on both sides
            tol = 1e-9 if name in ("q", "k", "v") or "window_logit" not in name else 1e-6
            if mode == "hybrid":  # every parameter matters there (elsewhere gamma cancels, or phi is unused)
                assert b.abs().sum() > 0, name
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, md=mode, n=name: f"{md} d{n}: {m}")
    # SSD 'sample' granularity: dropped rows run linear_only (without the sinks), the others hybrid
    mixer.linear_covers_window = False
    mixer.swa_drop = torch.tensor([True, False, True])
    y = mixer(q, k, v, valid, 0.35, mode="hybrid")
    phi_q, phi_k = mixer.features(q, k)
    for rows, mode in (([0, 2], "linear_only"), ([1], "hybrid")):
        want = dense_sinks(q[rows], k[rows], v[rows], phi_q[rows], phi_k[rows], mixer.gamma().double(),
                           mixer.alpha().double(), window=w, scale=0.35, n=n, mode=mode, valid=valid[rows])
        torch.testing.assert_close(y[rows], want, rtol=1e-10, atol=1e-10)


# -- the decode step on a ring ---------------------------------------------------------------------
@pytest.mark.parametrize("mode,covers", KERNEL_CASES)
@pytest.mark.parametrize("w", [1, 2, 5, 16])
@pytest.mark.parametrize("prefill", [0, 1, 3, 17])
@pytest.mark.parametrize("n", [1, 4])
def test_decode_steps_equal_the_definition(mode, covers, w, prefill, n):
    """hybrid_decode_torch with the sinks kept beside the ring: each step is row t of the
    definition; afterwards the state holds exactly the non-sink keys older than the window (and
    differs from the state that would hold the sinks)."""
    T = prefill + 12
    (q, k, v, fq, fk, g, a), valid = make_inputs(T, requires_grad=False, seed=1)
    want = dense_sinks(q, k, v, fq, fk, g, a, window=w, scale=0.35, n=n, mode=mode, covers=covers, valid=valid)
    is_sink = torch.stack([sink_set(valid[b], n) for b in range(3)])
    keep_ring = mode == "linear_only" or (mode == "hybrid" and covers)
    state = linear_state(fk, v, end=prefill - (w - 1), key_valid=valid & ~is_sink)
    cache = DecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], state, w, key_valid=valid[:, :prefill],
                                     phi_k=fk[:, :, :prefill] if keep_ring else None)
    for t in range(prefill, T):
        old = t - (w - 1)
        evict = fk[:, :, old : old + 1] if w > 1 and old >= 0 else torch.zeros_like(fk[:, :, :1])
        sinks = first_sinks(k, v, valid, n, t) if t else None
        y = hybrid_decode_torch(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], fq[:, :, t : t + 1],
                                fk[:, :, t : t + 1], g, a, cache, scale=0.35, mode=mode, linear_covers_window=covers,
                                phi_k_evict=None if keep_ring else evict, key_valid=valid[:, t], softmax_sinks=n,
                                sinks=sinks)
        torch.testing.assert_close(y, want[:, :, t : t + 1], atol=2e-6, rtol=2e-5, msg=lambda m, t=t: f"step {t}: {m}")
    expect = linear_state(fk, v, end=T - (w - 1), key_valid=valid & ~is_sink)
    torch.testing.assert_close(cache.S, expect[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.z, expect[1], atol=1e-5, rtol=1e-5)
    if bool(is_sink[:, : max(0, T - (w - 1))].any()):  # some sink is older than the window by now
        leaky = linear_state(fk, v, end=T - (w - 1), key_valid=valid)
        assert (cache.z - leaky[1]).abs().max() > 1e-2


# -- the model: cached decoding, generate, memory --------------------------------------------------
def _model(window, n, covers=False, seed=1, num_layers=None, **kw):
    torch.manual_seed(seed)
    base = tiny_model() if num_layers is None else tiny_model(num_hidden_layers=num_layers)
    model = hha.convert(base, hha.HybridConfig(window=window, feature_dim=8, softmax_sinks=n,
                                                       linear_covers_window=covers, **kw))
    randomize_mixers(model)
    return model


@pytest.fixture(scope="module")
def models():
    return {(w, n, c): _model(w, n, c) for w in (1, 5) for n in (1, 4) for c in (False, True)}


def _dense_hook(mode):
    """Transfer hook: the converted layer's attention from `dense_sinks` in float64 (no cache)."""
    from hf_hybrid_attn.kernels import expand_kv_heads
    from hf_hybrid_attn.modeling import mixers_of

    def hook(module, q, k, v, key_valid, scaling):
        m = mixers_of(module)[0]
        q, k, v = q.double(), k.double(), v.double()
        phi_q, phi_k = m.feature_map_q(q), m.feature_map_k(expand_kv_heads(k, m.num_heads))
        y = dense_sinks(q, k, v, phi_q, phi_k, m.gamma().double(), m.alpha().double(), window=m.window,
                        scale=scaling, n=m.softmax_sinks, mode=mode, covers=m.linear_covers_window, valid=key_valid)
        return y.transpose(1, 2).to(module.q_proj.weight.dtype).contiguous()

    return hook


@pytest.mark.parametrize("w,n", [(1, 4), (5, 1), (5, 4)])
def test_model_forward_equals_the_definition(models, w, n):
    """The whole model (left padding, position ids) with the option from the config, every kernel
    mode: equal to the same model whose layers compute `dense_sinks`, and not to the model
    without the option."""
    from hf_hybrid_attn.modeling import mixers_of

    model = models[(w, n, False)].double()
    try:
        ids, mask, pos = left_padded()
        for mode in ("hybrid", "swa_only", "linear_only"):
            with hha.component_mode(model, mode), torch.no_grad():
                got = model(ids, attention_mask=mask, position_ids=pos).logits
                mixers = [m for _, attn in hha.iter_hybrid_attention(model) for m in mixers_of(attn)]
                for m in mixers:
                    m.transfer_hook = _dense_hook(mode)
                try:
                    want = model(ids, attention_mask=mask, position_ids=pos).logits
                finally:
                    for m in mixers:
                        m.transfer_hook = None
                for m in mixers:
                    m.softmax_sinks = 0
                try:
                    plain = model(ids, attention_mask=mask, position_ids=pos).logits
                finally:
                    for m in mixers:
                        m.softmax_sinks = n
            keep = mask.bool()
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-9, atol=1e-9, msg=lambda e, md=mode: f"{md}: {e}")
            assert (got - plain)[keep].abs().max() > 1e-4, mode
    finally:
        model.float()


@pytest.mark.parametrize("w,n", [(1, 1), (1, 4), (5, 1), (5, 4)])
@pytest.mark.parametrize("prefill", [1, 3, 11])
@pytest.mark.parametrize("covers", [False, True])
def test_token_by_token_equals_uncached(models, w, n, prefill, covers):
    """Prefill (shorter than n, shorter than w, past the ring) then one token at a time through
    HybridCache: every mode equals the uncached forward; the cache stays the same size."""
    model = models[(w, n, covers)]
    ids, mask, pos = left_padded()
    for mode in hha.COMPONENT_MODES:
        with hha.component_mode(model, mode), torch.no_grad():
            full = model(ids, attention_mask=mask, position_ids=pos).logits
            cache = hha.HybridCache(model.config)
            outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                          **cache_kwargs(cache), use_cache=True).logits]
            sizes = []
            for t in range(prefill, ids.shape[1]):
                outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                                  **cache_kwargs(cache), use_cache=True).logits)
                sizes.append(cache.memory_bytes())
        err = (torch.cat(outs, 1) - full)[mask.bool()].abs().max().item()
        assert err <= 1e-5, (mode, err)
        assert len(set(sizes[-10:])) == 1, mode


@pytest.mark.parametrize("n", [0, 1, 4])
def test_mode_switches_and_multi_token_chunks_on_one_cache(models, n):
    """Chunks of several tokens (the general path, sinks partly in the cache) and modes switched
    mid-stream on one cache: equal to the uncached forward of the mode in use.

    Mode switches are checked on a one-layer model: there the cached keys, values and state depend
    only on the embeddings, so the uncached forward of the current mode is the exact reference. With
    more layers, earlier tokens' keys at layer >= 1 depend on the mode they were computed in, and no
    single-mode forward is the reference; there the chunked schedule is checked in one mode."""
    ids, mask, pos = left_padded(T=40)
    cuts = [(0, 2), (2, 3), (3, 9), (9, 10), (10, 11), (11, 25), (25, 26), (26, 40)]
    switching = ["hybrid", "swa_only", "linear_only", "hybrid", "sinks_only", "hybrid", "none", "hybrid"]
    one_layer = _model(5, n, num_layers=1)
    cases = [(one_layer, switching)] + [(models[(5, max(n, 1), False)], [m] * len(cuts))
                                        for m in ("hybrid", "linear_only", "sinks_only")]
    for model, modes in cases:
        with torch.no_grad():
            cache = hha.HybridCache(model.config)
            for (a, b), mode in zip(cuts, modes):
                with hha.component_mode(model, mode):
                    got = model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                                **cache_kwargs(cache), use_cache=True).logits
                    full = model(ids[:, :b], attention_mask=mask[:, :b], position_ids=pos[:, :b]).logits[:, a:b]
                keep = mask[:, a:b].bool()
                if keep.any():
                    assert (got - full)[keep].abs().max().item() <= 1e-5, (model.config.num_hidden_layers, a, b, mode)


def test_generate_greedy_matches_uncached_argmax_and_memory_is_constant(models):
    model = models[(5, 4, False)]
    ids, mask, _ = left_padded()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(out, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits
    assert torch.equal(logits[:, 29:-1].argmax(-1), out[:, 30:])
    sizes = []
    short = torch.randint(3, 99, (2, 3))  # a prompt shorter than the sinks and the window
    for n in (20, 60):
        res = model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True)
        sizes.append(output_cache(res).memory_bytes())
    assert sizes[0] == sizes[1]


def test_cache_keeps_the_sinks_beside_the_ring_constant_in_length():
    """n = 6 > num_sinks = 4: the cache keeps the first 6 valid tokens (k, v, positions), counted by
    memory_bytes, whatever the prompt length; the ring keeps w-1 tokens."""
    model = _model(5, 6, num_sinks=4)
    sizes = []
    for T in (20, 300):
        ids = torch.randint(3, 99, (2, T))
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids, use_cache=True))
        layer = cache.layers[0]
        assert layer.sinks[0].shape[2] == 6 and bool(layer.sinks[3].all())
        assert torch.equal(layer.sinks[2], torch.arange(6).expand(2, 6))
        assert layer.keys.shape[2] == 4
        sizes.append(cache.memory_bytes())
    assert sizes[0] == sizes[1]
    with_sinks = sizes[0]
    with torch.no_grad():
        plain = output_cache(_model(5, 0, num_sinks=4)(input_ids=ids, use_cache=True)).memory_bytes()
    assert with_sinks > plain  # the two extra sink tokens per layer are counted


# -- segmented prefill -----------------------------------------------------------------------------
def _segment(monkeypatch, n):
    monkeypatch.setattr(layers, "PREFILL_SEGMENT", n)


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("window,covers", [(5, False), (16, False), (5, True)])
def test_segmented_forward_equals_one_call(monkeypatch, mode, window, covers):
    """Segments of 16 tokens: the sinks of segment 0 reach every later segment's softmax."""
    model = _model(window, 4, covers).double().eval()
    ids, mask, pos = left_padded(B=3, T=70)
    with hha.component_mode(model, mode), torch.no_grad():
        whole = model(ids, attention_mask=mask, position_ids=pos).logits
        calls = []
        real = layers.HybridMixer._segmented
        monkeypatch.setattr(layers.HybridMixer, "_segmented", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
        _segment(monkeypatch, 16)
        seg = model(ids, attention_mask=mask, position_ids=pos).logits
    assert len(calls) == 2
    torch.testing.assert_close(seg[mask.bool()], whole[mask.bool()], atol=1e-6, rtol=1e-5)


def test_segmented_prefill_after_a_short_cached_prompt_then_decode(monkeypatch):
    """A 2-token prompt (fewer tokens than sinks), then 6 tokens, cached; then a 42-token chunk in
    segments (row 0's sinks are in the cache, before the window buffer: the chunk's prefix sinks;
    rows 1 and 2 are left-padded, so their sinks are found in the chunk, some in its first
    segment); then decoding: equal to the uncached forward, and the same cache as the chunk in one
    call."""
    model = _model(5, 4).double().eval()
    ids, mask, pos = left_padded(B=3, T=60)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    outs = {}
    for name, seg in (("whole", 10_000), ("segmented", 16)):
        _segment(monkeypatch, seg)
        with torch.no_grad():
            cache = hha.HybridCache(model.config)
            logits = []
            for a, b in [(0, 2), (2, 8), (8, 50)] + [(t, t + 1) for t in range(50, 60)]:
                logits.append(model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                                    **cache_kwargs(cache), use_cache=True).logits)
        outs[name] = (torch.cat(logits, 1), cache)
    for name, (got, _) in outs.items():
        torch.testing.assert_close(got[mask.bool()], full[mask.bool()], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for la, lb in zip(outs["whole"][1].layers, outs["segmented"][1].layers):
        torch.testing.assert_close(lb.state[0], la.state[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lb.state[1], la.state[1], atol=1e-4, rtol=1e-5)
        assert torch.equal(lb.sinks[2], la.sinks[2]) and torch.equal(lb.sinks[3], la.sinks[3])


def test_segmented_gradients_equal_one_call(monkeypatch):
    model = _model(5, 4).double()
    ids, mask, pos = left_padded(B=3, T=45)
    grads_ = {}
    for name, seg in (("whole", 10_000), ("segmented", 16)):
        _segment(monkeypatch, seg)
        model.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=pos).logits
        (out[mask.bool()] ** 2).mean().backward()
        grads_[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(".hybrid." in n for n in grads_["whole"])
    for n, g in grads_["whole"].items():
        torch.testing.assert_close(grads_["segmented"][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


# -- Triton: not implemented yet, so never silently run -----------------------------------------------
def test_triton_dispatch_falls_back_to_chunked_with_a_warning():
    args, valid = make_inputs(40, requires_grad=False)
    kw = dict(window=5, scale=0.3, key_valid=valid, softmax_sinks=4)
    warn_triton_softmax_sinks.cache_clear()
    with pytest.warns(RuntimeWarning, match="softmax sinks"):
        y = hybrid_attention(*args, backend="triton", **kw)
    torch.testing.assert_close(y, dense_sinks(*args, window=5, scale=0.3, n=4, valid=valid), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        hybrid_attention(*args, backend="triton", **kw)


def test_triton_decode_falls_back_to_the_torch_step():
    pytest.importorskip("triton")
    from hf_hybrid_attn.kernels.triton_decode import hybrid_decode_triton

    (q, k, v, fq, fk, g, a), valid = make_inputs(12, requires_grad=False)
    caches, ys = [], []
    for step in (hybrid_decode_triton, hybrid_decode_torch):
        cache = DecodeCache.from_prefill(k[:, :, :11], v[:, :, :11], linear_state(fk, v, end=7), 5,
                                         key_valid=valid[:, :11])
        warn_triton_softmax_sinks.cache_clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ys.append(step(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], fq[:, :, 11:], fk[:, :, 11:], g, a, cache,
                           scale=0.3, phi_k_evict=fk[:, :, 7:8], key_valid=valid[:, 11], softmax_sinks=2,
                           sinks=first_sinks(k, v, valid, 2, 11)))
        assert any("softmax sinks" in str(w.message) for w in seen) == (step is hybrid_decode_triton)
        caches.append(cache)
    assert torch.equal(ys[0], ys[1]) and torch.equal(caches[0].S, caches[1].S)


def test_a_cache_without_sink_storage_is_refused():
    mixer = layers.HybridMixer(hha.HybridConfig(window=4, feature_dim=4, softmax_sinks=2), 4, 2, 8)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softmax_sinks=2: this cache"):
        mixer(q, k, v, torch.ones(1, 3, dtype=torch.bool), 0.3, cache_layer=object())


# -- config, checkpoints, CLI ----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", None])
def test_config_validation_names_the_field(bad):
    with pytest.raises(ValueError, match="HybridConfig.softmax_sinks must be an integer >= 0"):
        hha.HybridConfig(softmax_sinks=bad)


def test_config_round_trip_and_old_checkpoints_load_with_zero(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_hybrid_attn.modeling import mixers_of

    assert hha.HybridConfig().softmax_sinks == 0
    cfg = hha.HybridConfig(window=4, softmax_sinks=3)
    assert hha.HybridConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = _model(4, 3)
    ids, mask, _ = left_padded()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "sinks")
    assert json.loads((tmp_path / "sinks" / "config.json").read_text())["hybrid"]["softmax_sinks"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sinks")
    assert all(m.softmax_sinks == 3 for _, a in hha.iter_hybrid_attention(loaded) for m in mixers_of(a))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, logits, rtol=0, atol=0)
    # a checkpoint written before the option existed: no key, loads with 0
    path = tmp_path / "sinks" / "config.json"
    data = json.loads(path.read_text())
    del data["hybrid"]["softmax_sinks"]
    path.write_text(json.dumps(data))
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "sinks")
    assert all(m.softmax_sinks == 0 for _, a in hha.iter_hybrid_attention(old) for m in mixers_of(a))


def test_convert_cli_set_flag_reaches_the_hybrid_config():
    """`hf-hybrid convert ... --set hybrid.softmax_sinks=4` becomes HybridConfig(softmax_sinks=4)."""
    from hf_hybrid_attn.training.cli import _overrides, add_convert_subparser
    from hf_hybrid_attn.training.recipes import get_recipe

    parser = argparse.ArgumentParser()
    add_convert_subparser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["convert", "--out", "x", "--recipe", "lolcats", "--set", "hybrid.softmax_sinks=4"])
    recipe = get_recipe(args.recipe, **_overrides(args))
    assert hha.HybridConfig(**recipe.hybrid).softmax_sinks == 4
    bad = parser.parse_args(["convert", "--out", "x", "--set", "hybrid.softmax_sinks=-2"])
    with pytest.raises(ValueError, match="softmax_sinks"):
        hha.HybridConfig(**get_recipe(bad.recipe, **_overrides(bad)).hybrid)
