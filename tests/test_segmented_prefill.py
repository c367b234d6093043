"""Long calls are computed in segments of PREFILL_SEGMENT queries (issue 11: feature maps and kernel
temporaries O(segment), not O(T)): the same outputs, cache and gradients as one call. The segment
is shrunk to 16 tokens here so that small inputs cross many segment boundaries (w = 5 and 16, so
windows and the linear state both straddle them)."""

from __future__ import annotations

import pytest
import torch
from test_cache import left_padded

import hf_hybrid_attn as hha
import hf_hybrid_attn.layers as layers
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn.compat import cache_kwargs


def _model(window, covers=False, seed=0):
    torch.manual_seed(seed)
    model = hha.convert(tiny_model(), hha.HybridConfig(window=window, feature_dim=8, linear_covers_window=covers))
    randomize_mixers(model)
    return model.double().eval()


def _segment(monkeypatch, n):
    monkeypatch.setattr(layers, "PREFILL_SEGMENT", n)


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("window,covers", [(5, False), (16, False), (5, True)])
def test_segmented_forward_equals_one_call(monkeypatch, mode, window, covers):
    model = _model(window, covers)
    ids, mask, pos = left_padded(B=3, T=70)
    with hha.component_mode(model, mode), torch.no_grad():
        whole = model(ids, attention_mask=mask, position_ids=pos).logits
        calls = []
        real = layers.HybridMixer._segmented
        monkeypatch.setattr(layers.HybridMixer, "_segmented", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
        _segment(monkeypatch, 16)
        seg = model(ids, attention_mask=mask, position_ids=pos).logits
    assert len(calls) == 2  # both layers took the segmented path
    # float64 model, but the carried linear state is fp32 by contract (as in the cache): fp32 tolerance
    torch.testing.assert_close(seg[mask.bool()], whole[mask.bool()], atol=1e-6, rtol=1e-5)


def test_segmented_swa_only_without_cache_maps_no_features(monkeypatch):
    """swa_only without a cache: the linear branch is unused and no cache keeps a state, so the
    segments run no feature map and fold nothing; with a cache the state is still folded."""
    model = _model(5)
    ids, mask, pos = left_padded(B=3, T=70)
    mapped = []
    real = layers.HybridMixer.features
    monkeypatch.setattr(layers.HybridMixer, "features", lambda self, q, k: mapped.append(q.shape[2]) or real(self, q, k))
    with hha.component_mode(model, "swa_only"), torch.no_grad():
        whole = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        _segment(monkeypatch, 16)
        mapped.clear()
        seg = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        assert mapped == []
        cache = hha.HybridCache(model.config)
        model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(cache), use_cache=True)
        assert mapped and all(layer.state is not None for layer in cache.layers)
    torch.testing.assert_close(seg[mask.bool()], whole[mask.bool()], atol=1e-12, rtol=1e-12)


def test_segmented_prefill_leaves_the_same_cache_and_decodes_the_same(monkeypatch):
    model = _model(5)
    ids, mask, pos = left_padded(B=3, T=60)
    outs = {}
    for name, seg in (("whole", 10_000), ("segmented", 16)):
        _segment(monkeypatch, seg)
        with torch.no_grad():
            cache = hha.HybridCache(model.config)
            logits = [model(ids[:, :50], attention_mask=mask[:, :50], position_ids=pos[:, :50], **cache_kwargs(cache),
                            use_cache=True).logits]
            for t in range(50, 60):
                logits.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                                    **cache_kwargs(cache), use_cache=True).logits)
        outs[name] = (torch.cat(logits, 1), cache)
    (a, ca), (b, cb) = outs["whole"], outs["segmented"]
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-6, rtol=1e-5)  # fp32 state
    for la, lb in zip(ca.layers, cb.layers):
        torch.testing.assert_close(lb.state[0], la.state[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lb.state[1], la.state[1], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lb.keys, la.keys, atol=1e-6, rtol=1e-5)  # layer 1's come through layer 0's state
        assert torch.equal(lb.valid, la.valid) and lb.position == la.position


def test_segmented_gradients_equal_one_call(monkeypatch):
    model = _model(5)
    ids, mask, pos = left_padded(B=3, T=45)
    grads = {}
    for name, seg in (("whole", 10_000), ("segmented", 16)):
        _segment(monkeypatch, seg)
        model.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=pos).logits
        (out[mask.bool()] ** 2).mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["whole"].keys() == grads["segmented"].keys() and any(".hybrid." in n for n in grads["whole"])
    for n, g in grads["whole"].items():
        torch.testing.assert_close(grads["segmented"][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_segments_bound_the_largest_temporary(monkeypatch):
    """A 600-token prompt in 64-token segments never produces a tensor of T x F' per head (the
    whole prompt's phi_k), which one call does."""
    from test_cache import _LargestOutput

    torch.manual_seed(0)
    model = hha.convert(tiny_model(), hha.HybridConfig(window=8, feature_dim=16)).eval()
    mixer = next(iter(hha.iter_hybrid_attention(model)))[1].hybrid
    ids = torch.randint(3, 99, (1, 600))
    phi_all = mixer.num_heads * 600 * mixer.phi_dim
    sizes = {}
    for name, seg in (("whole", 10_000), ("segmented", 64)):
        _segment(monkeypatch, seg)
        with torch.no_grad(), _LargestOutput() as seen:
            model.model.layers[0].self_attn.hybrid(*_qkv(model, ids), 1.0)
        sizes[name] = seen.largest
    assert sizes["whole"] >= phi_all > sizes["segmented"], (sizes, phi_all)


def _qkv(model, ids):
    """Random q, k, v, key_valid of the first layer's shapes for a prompt like `ids`."""
    attn = model.model.layers[0].self_attn
    mixer = attn.hybrid
    B, T = ids.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, mixer.num_heads, T, mixer.head_dim, generator=g)
    k = torch.randn(B, mixer.num_kv_heads, T, mixer.head_dim, generator=g)
    v = torch.randn(B, mixer.num_kv_heads, T, mixer.head_dim, generator=g)
    return q, k, v, torch.ones(B, T, dtype=torch.bool)
