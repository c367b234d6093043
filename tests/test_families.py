"""Every supported family, including teachers with their own sliding windows (Mistral's
`sliding_window`, Qwen2's `layer_types`, Gemma-3's 5 local : 1 global layout):
convert -> forward -> save -> reload as hybrid; the `sdpa` view of the checkpoint is exactly the
teacher; with w >= T the hybrid equals the teacher; cached greedy decoding equals the uncached
argmax; a converted sliding layer caps its softmax window at the teacher's (SPEC §2)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model

#: name -> (family, config overrides, the teacher's sliding window per layer)
CASES = {
    "llama": ("llama", {}, [None, None]),
    "qwen3": ("qwen3", {}, [None, None]),
    "mistral-window": ("mistral", {"sliding_window": 8}, [8, 8]),
    "qwen2-layer_types": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                    "layer_types": ["full_attention", "sliding_attention"]}, [None, 8]),
    "gemma3": ("gemma3_text", {}, [8, 8, None]),
}


def teacher(name, **extra):
    family, overrides, _ = CASES[name]
    torch.manual_seed(0)
    return tiny_model(family, **{**overrides, **extra})


def padded_batch(T=30, B=2, pad=(0, 5)):
    ids = torch.randint(3, 99, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    ids[mask == 0] = 0
    return ids, mask


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits


def valid_rows(x, mask):
    return x[mask.bool()]


@pytest.mark.parametrize("name", list(CASES))
def test_convert_save_reload_and_sdpa_view_is_the_teacher(name, tmp_path):
    t = teacher(name)
    ids, mask = padded_batch()
    ref = logits(t, ids, mask)
    model = hha.convert(copy.deepcopy(t), window=5, feature_dim=8)
    randomize_mixers(model)
    assert [a.hybrid.teacher_window for _, a in hha.iter_hybrid_attention(model)] == CASES[name][2]
    hyb = logits(model, ids, mask)
    assert torch.isfinite(hyb).all()
    assert not torch.allclose(valid_rows(hyb, mask), valid_rows(ref, mask), atol=1e-3)  # the hybrid differs at T > w
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is type(model) and again.config.model_type == f"hybrid_{t.config.model_type}"
    torch.testing.assert_close(logits(again, ids, mask), hyb, rtol=0, atol=1e-6)
    view = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    for key in ("sliding_window", "layer_types", "use_sliding_window"):
        assert getattr(view.config, key, None) == getattr(t.config, key, None), key
    # exactly the teacher, sliding layers included (T=30 > the teacher's window 8)
    torch.testing.assert_close(valid_rows(logits(view, ids, mask), mask), valid_rows(ref, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_full_window_equals_the_teacher(name):
    """w >= T and T <= the teacher's window: every layer attends fully in the teacher, and the
    hybrid's linear branch is empty, so the two compute the same function."""
    t = teacher(name)
    ids, mask = padded_batch(T=8, pad=(0, 3))
    model = hha.convert(copy.deepcopy(t), window=64, feature_dim=8)
    randomize_mixers(model)
    torch.testing.assert_close(valid_rows(logits(model, ids, mask), mask), valid_rows(logits(t, ids, mask), mask),
                               rtol=1e-5, atol=1e-5)


# layers="global" on a teacher with only sliding layers (Mistral) is refused: test_layers_global_needs_a_global_layer
@pytest.mark.parametrize("name,layers", [(n, None) for n in CASES] + [(n, "global") for n in CASES if n != "mistral-window"])
def test_cached_greedy_equals_uncached_argmax(name, layers):
    t = teacher(name)
    ids, mask = padded_batch(T=20, pad=(0, 6))
    model = hha.convert(copy.deepcopy(t), window=5, feature_dim=8, layers=layers)
    randomize_mixers(model, scale=0.2)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                         return_dict_in_generate=True)
    cache = hha.compat.output_cache(out)
    assert isinstance(cache, hha.HybridCache)
    kinds = [type(layer).__name__ for layer in cache.layers]
    converted = {i for i, _ in hha.iter_hybrid_attention(model)}
    for i, (kind, w) in enumerate(zip(kinds, CASES[name][2])):
        expected = "HybridCacheLayer" if i in converted else ("DynamicLayer" if w is None else "DynamicSlidingWindowLayer")
        assert kind == expected, (i, kinds)
    seq = out.sequences
    full = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    pos = (full.cumsum(1) - 1).clamp(min=0)  # the positions generate() gives left-padded rows
    argmax = logits(model, seq, full, position_ids=pos)[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(argmax, seq[:, ids.shape[1]:])


def test_sliding_layer_caps_the_window_at_the_teachers():
    """SPEC §2: on a layer that was sliding-window in the teacher (window W), the converted layer
    uses w_eff = min(w, W) for the softmax branch and the linear branch covers every older token.
    A Mistral with sliding_window=8 converted at w=64 therefore computes exactly what the same
    weights without a teacher window compute at w=8."""
    sliding = teacher("mistral-window")
    plain = teacher("mistral-window", sliding_window=None)
    plain.load_state_dict(sliding.state_dict())
    a = hha.convert(sliding, window=64, feature_dim=8)
    randomize_mixers(a)
    b = hha.convert(plain, window=8, feature_dim=8)
    b.load_state_dict(a.state_dict())
    assert [m.hybrid.window for _, m in hha.iter_hybrid_attention(a)] == [8, 8]
    ids, mask = padded_batch(T=40, pad=(0, 7))
    torch.testing.assert_close(logits(a, ids, mask), logits(b, ids, mask), rtol=0, atol=1e-6)
    hha.set_window(a, 4)  # below the teacher's window: w itself
    assert [m.hybrid.window for _, m in hha.iter_hybrid_attention(a)] == [4, 4]


def test_layers_global_converts_only_global_layers():
    t = teacher("gemma3")
    model = hha.convert(copy.deepcopy(t), window=4, feature_dim=8, layers="global")
    assert [i for i, _ in hha.iter_hybrid_attention(model)] == [2]
    ids, mask = padded_batch(T=24, pad=(0, 5))
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True)
    layers = hha.compat.output_cache(cache).layers
    assert isinstance(layers[0], DynamicSlidingWindowLayer) and isinstance(layers[2], hha.HybridCacheLayer)
    assert model.config.hybrid["layers"] == "global"


def test_layers_global_needs_a_global_layer():
    with pytest.raises(ValueError, match="no global-attention layer"):
        hha.convert(teacher("mistral-window"), layers="global")
    with pytest.raises(ValueError, match="HybridConfig.layers must be None, a list"):
        hha.HybridConfig(layers="local")


def test_uncacheable_partial_layout_is_refused():
    t = teacher("qwen2-layer_types", num_hidden_layers=3,
                layer_types=["full_attention", "sliding_attention", "full_attention"])
    model = hha.convert(t, window=4, feature_dim=8, layers=[0])
    with pytest.raises(ValueError, match="Convert all layers of a kind together"):
        hha.HybridCache(model.config)


def test_wrong_sliding_window_kwarg_is_refused():
    model = hha.convert(teacher("mistral-window"), window=4, feature_dim=8)
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="sliding_window=16"):
        hha.attention.hybrid_attention_forward(attn, q, k, k, None, sliding_window=16)


def test_unsupported_attention_features_are_refused():
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0 is not supported"):
        hha.convert(teacher("gemma3", attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="layer_types \\['chunked_attention'\\] are not supported"):
        hha.convert(teacher("qwen2-layer_types", layer_types=["full_attention", "chunked_attention"]))
