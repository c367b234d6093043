"""Cached decoding equals the uncached forward; generation uses a constant-memory HybridCache."""

import pytest
import torch
from transformers import DynamicCache

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn.compat import cache_kwargs, output_cache


def left_padded(B=3, T=30):
    ids = torch.randint(3, 99, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = hha.convert(tiny_model(), window=5, feature_dim=8)
    randomize_mixers(m)
    return m


@pytest.mark.parametrize("mode", hha.COMPONENT_MODES)
@pytest.mark.parametrize("prefill", [1, 4, 11])
@pytest.mark.parametrize("covers", [False, True])
def test_token_by_token_equals_uncached(model, mode, prefill, covers):
    for _, attn in hha.iter_hybrid_attention(model):
        attn.hybrid.linear_covers_window = covers
    ids, mask, pos = left_padded()
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
    for _, attn in hha.iter_hybrid_attention(model):
        attn.hybrid.linear_covers_window = False
    inc = torch.cat(outs, 1)
    keep = mask.bool()
    assert (inc - full)[keep].abs().max().item() <= 1e-5
    # constant memory once the window buffer is full
    assert len(set(sizes[-10:])) == 1


def test_multi_token_chunks_equal_uncached(model):
    ids, mask, pos = left_padded(T=40)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = hha.HybridCache(model.config)
        outs = []
        for a, b in [(0, 7), (7, 8), (8, 20), (20, 40)]:
            outs.append(model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                              **cache_kwargs(cache), use_cache=True).logits)
    assert (torch.cat(outs, 1) - full)[mask.bool()].abs().max().item() <= 1e-5


def test_decode_steps_map_only_the_new_and_the_evicted_key(model):
    """A decode step runs phi_k once per layer, on two tokens: the new key and the key leaving the
    window (phi_k is recomputed, not stored: its ring would be (H/Hkv)*(F'/D) times the k ring);
    the cache keeps exactly the w-1 window keys, in a ring, and no phi_k."""
    ids, mask, pos = left_padded()
    seen = []
    layers = list(hha.iter_hybrid_attention(model))
    hooks = [attn.hybrid.feature_map_k.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[2]))
             for _, attn in layers]
    try:
        with torch.no_grad():
            cache = hha.HybridCache(model.config)
            model(ids[:, :11], attention_mask=mask[:, :11], position_ids=pos[:, :11], **cache_kwargs(cache))
            assert set(seen) == {11}
            seen.clear()
            for t in range(11, 20):
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                      **cache_kwargs(cache))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [2] * (9 * len(layers)), seen
    _, attn = layers[0]
    layer = cache.layers[0]
    assert not hasattr(layer, "phi_keys") and layer.keys.shape[2] == attn.hybrid.window - 1
    assert layer.position == 20 and layer.cumulative_length == 20


def test_cached_steps_with_autograd_can_backward(model):
    """With grad enabled the state is not updated in place (autograd saved it for the backward of
    phi_q . S); without grad it is, and both give the same outputs."""
    ids, mask, pos = left_padded()
    outs = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            cache = hha.HybridCache(model.config)
            logits = [model(ids[:, :12], attention_mask=mask[:, :12], position_ids=pos[:, :12],
                            **cache_kwargs(cache)).logits]
            for t in range(12, 20):
                logits.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                                    **cache_kwargs(cache)).logits)
            outs[grad] = torch.cat(logits, 1)
    outs[True].sum().backward()
    _, attn = next(iter(hha.iter_hybrid_attention(model)))
    grads = [p.grad for p in attn.hybrid.parameters()]
    model.zero_grad(set_to_none=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(outs[True].detach(), outs[False], rtol=0, atol=1e-6)


def test_forward_with_use_cache_returns_a_hybrid_cache(model):
    """model(ids, use_cache=True) with no cache builds a HybridCache (not transformers' DynamicCache);
    continuing from it equals the uncached forward. An explicit DynamicCache is still honoured."""
    ids, mask, pos = left_padded()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        out = model(ids[:, :20], attention_mask=mask[:, :20], position_ids=pos[:, :20], use_cache=True)
        assert isinstance(output_cache(out), hha.HybridCache)
        logits = [out.logits]
        for t in range(20, 30):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                        **cache_kwargs(output_cache(out)), use_cache=True)
            logits.append(out.logits)
        assert (torch.cat(logits, 1) - full)[mask.bool()].abs().max().item() <= 1e-5
        dyn = output_cache(model(ids[:, :5], **cache_kwargs(DynamicCache(config=model.config)), use_cache=True))
        assert isinstance(dyn, DynamicCache)
        assert output_cache(model(ids[:, :5], use_cache=False)) is None


def test_softmax_view_caches_like_the_base_model(model):
    """In diagnostics.softmax_view (exact softmax attention) a forward with use_cache=True and
    generate() use the base model's DynamicCache, and generate equals the uncached argmax."""
    from hf_hybrid_attn.diagnostics import softmax_view

    ids = torch.randint(3, 99, (2, 9))
    with softmax_view(model), torch.no_grad():
        out = model(ids, use_cache=True)
        assert isinstance(output_cache(out), DynamicCache)
        step = model(ids[:, -1:].clone(), **cache_kwargs(output_cache(out)), use_cache=True)
        assert isinstance(output_cache(step), DynamicCache)
        gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model(gen).logits[:, 8:-1].argmax(-1), gen[:, 9:])


def test_prefill_in_inference_mode_then_decode_under_no_grad(model):
    ids, mask, pos = left_padded()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    cache = hha.HybridCache(model.config)
    with torch.inference_mode():
        outs = [model(ids[:, :12], attention_mask=mask[:, :12], position_ids=pos[:, :12], **cache_kwargs(cache)).logits]
    with torch.no_grad():
        for t in range(12, 30):
            outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                              **cache_kwargs(cache)).logits)
    assert (torch.cat(outs, 1) - full)[mask.bool()].abs().max().item() <= 1e-5


def test_dynamic_cache_takes_exact_full_history_path(model):
    ids, mask, pos = left_padded()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        outs = [model(ids[:, :10], attention_mask=mask[:, :10], position_ids=pos[:, :10], **cache_kwargs(cache)).logits]
        for t in range(10, 30):
            outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                              **cache_kwargs(cache)).logits)
    assert (torch.cat(outs, 1) - full)[mask.bool()].abs().max().item() <= 1e-5


def test_generate_greedy_matches_uncached_argmax(model):
    ids, mask, _ = left_padded()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(out, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits
    assert torch.equal(logits[:, 29:-1].argmax(-1), out[:, 30:])


@pytest.mark.parametrize("mode", hha.COMPONENT_MODES)
def test_generate_with_chunked_prefill_equals_one_prefill(model, mode):
    """generate(prefill_chunk_size=n) (transformers' chunked prefill: the prompt goes through the model
    n tokens at a time on the HybridCache, so prefill activations are O(n), not O(T)) gives the same
    scores and tokens as one prefill, on a left-padded batch whose padding spans the first chunk, with
    chunks shorter than, equal to and longer than the window, and the same cache size."""
    ids, mask, _ = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    with hha.component_mode(model, mode):
        one = model.generate(ids, **kw)
        for n in (3, 5, 11):  # window 5: chunks inside, at and beyond it; 30 tokens: a ragged last chunk
            chunked = model.generate(ids, prefill_chunk_size=n, **kw)
            assert torch.equal(chunked.sequences, one.sequences), n
            for a, b in zip(chunked.scores, one.scores):  # min_new_tokens leaves -inf (EOS) in both: equal
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            assert output_cache(chunked).memory_bytes() == output_cache(one).memory_bytes()


def test_generate_uses_hybrid_cache_with_constant_memory(model):
    ids = torch.randint(3, 99, (2, 8))
    sizes = []
    for n in (20, 60):
        res = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True)
        assert isinstance(output_cache(res), hha.HybridCache)
        sizes.append(output_cache(res).memory_bytes())
    assert sizes[0] == sizes[1]


def test_sampling_and_beam_search(model):
    ids, mask, _ = left_padded()
    torch.manual_seed(0)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=10)
    torch.manual_seed(0)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=10)
    assert torch.equal(a, b) and a.shape == (3, 36)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                           return_dict_in_generate=True, output_scores=True)
    assert beams.sequences.shape == (6, 36)
    # the best beam's score equals the uncached log-probability of its continuation
    seq = beams.sequences[0:1]
    m = torch.cat([mask[0:1], torch.ones(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        logp = model(seq, attention_mask=m).logits.log_softmax(-1)
    tok_lp = logp[0, 29:-1].gather(-1, seq[0, 30:, None]).sum()
    assert abs(tok_lp.item() - beams.sequences_scores[0].item() * 6) < 1e-3


def test_assisted_decoding_is_refused(model):
    ids = torch.randint(3, 99, (1, 5))
    with pytest.raises(ValueError, match="assisted / speculative decoding"):
        model.generate(ids, assistant_model=model, max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(ids, prompt_lookup_num_tokens=2, max_new_tokens=3)
    cache = hha.HybridCache(model.config)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.layers[0].crop(1)


def test_prefill_does_not_pin_its_keys_and_memory_is_reported_in_full():
    """After a long prefill the cache keeps w-1 tokens, not views into the whole prefill's k/v/phi_k
    (issue 11); memory_bytes counts the storage actually held."""
    torch.manual_seed(0)
    model = hha.convert(tiny_model(), window=5, feature_dim=8)
    ids = torch.randint(3, 99, (2, 300))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    for layer in cache.layers:
        for t in (layer.keys, layer.values, layer.valid):
            assert t.shape[2 if t.dim() == 4 else 1] == 4
            assert t.untyped_storage().nbytes() <= 2 * t.numel() * t.element_size()
    small = cache.memory_bytes()
    with torch.no_grad():
        cache2 = output_cache(model(input_ids=ids[:, :20], use_cache=True))
    assert cache2.memory_bytes() == small  # constant in the prefill length


class _LargestOutput:
    """Records the largest tensor (in elements) that any op produces while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        outer.largest = max(outer.largest, t.numel())
                return out

        self.largest, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_state_fold_is_exact_chunked_and_never_expands_kv_heads():
    """Issue 11 item 2: the prefill fold walks T in chunks (fp32 temporaries O(chunk), not O(T))
    and multiplies each KV group's values once for its query heads (V never expanded to H heads);
    the result equals the float64 sum over the valid tokens, for the bare fold and through
    HybridCacheLayer.advance after a long prefill."""
    from hf_hybrid_attn.cache import HybridCacheLayer
    from hf_hybrid_attn.kernels.decode import fold_into_state

    B, H, Hkv, T, F, D, w, chunk = 2, 6, 2, 1000, 8, 5, 64, 64
    g = torch.Generator().manual_seed(0)
    phi_k = torch.rand(B, H, T, F, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2

    def reference(n):
        fk = phi_k[:, :, :n].double() * valid[:, None, :n, None]
        return fk.transpose(-1, -2) @ v[:, :, :n].double().repeat_interleave(H // Hkv, 1), fk.sum(2)

    bound = max(B * H * F * D, B * H * chunk * F)  # the state itself, or one chunk of phi_k
    state = (torch.zeros(B, H, F, D), torch.zeros(B, H, F))
    with _LargestOutput() as seen:
        fold_into_state(state, phi_k, v, valid, chunk=chunk)
    S_ref, z_ref = reference(T)
    torch.testing.assert_close(state[0].double(), S_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(state[1].double(), z_ref, atol=1e-4, rtol=1e-5)
    assert seen.largest <= bound, (seen.largest, bound)

    layer = HybridCacheLayer()
    layer.update(k, v)
    with torch.inference_mode(), _LargestOutput() as seen:
        layer.advance(k, v, phi_k, valid, window=w, num_sinks=4)
    S_ref, z_ref = reference(T - (w - 1))
    torch.testing.assert_close(layer.state[0].double(), S_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.state[1].double(), z_ref, atol=1e-4, rtol=1e-5)
    assert seen.largest <= max(bound, B * H * 1024 * F, B * T), seen.largest  # FOLD_CHUNK = 1024 here
    assert layer.keys.shape[2] == w - 1 and torch.equal(layer.window_tokens()[0], k[:, :, T - (w - 1):])


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("proj,bad", [("q_proj", float("nan")), ("k_proj", float("inf")), ("v_proj", float("nan")),
                                      ("k_proj", float("-inf"))])
def test_non_finite_new_token_in_a_decode_step_is_named_and_leaves_the_cache(model, mode, proj, bad):
    """A NaN or an Inf in the new token's q, k or v during a cached decode step (the in-place ring
    step): one ValueError naming the tensor, raised before the ring and state are written."""
    ids = torch.randint(3, 99, (2, 9))
    layer = model.model.layers[1].self_attn
    with torch.no_grad(), hha.component_mode(model, mode):
        cache = hha.HybridCache(model.config)
        model(ids, **cache_kwargs(cache), use_cache=True)
        before = [t.clone() for t in ring_tensors(cache.layers[1])]
        hook = getattr(layer, proj).register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([3]), bad))
        try:
            with pytest.raises(ValueError, match=f"^{proj[0]}: contains NaN or Inf"):
                model(ids[:, :1], **cache_kwargs(cache), use_cache=True)
        finally:
            hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, ring_tensors(cache.layers[1]), strict=True))


def ring_tensors(layer):
    c = layer.decode_cache()
    return [c.k_win, c.v_win, c.valid, c.S, c.z, c.position]
