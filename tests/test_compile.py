"""Compiled decoding: the decode step on the HybridCache ring traces as one graph (no graph break,
no host sync: with capture_scalar_outputs off, any .item() / bool(tensor) would break it), and
generate(cache_implementation="static") with a compiled forward gives the eager tokens and scores
with a bounded number of compilations however many steps it takes.

The compiler backends here are dynamo's "eager" and "aot_eager" (AOTAutograd functionalises the
in-place ring and state updates, as inductor and CUDA graphs need); inductor itself is left to the
GPU evidence run, since compiling C++ on this CI's two cores costs minutes."""

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from transformers.generation.configuration_utils import CompileConfig

import hf_hybrid_attn
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn import HybridConfig, compat
from hf_hybrid_attn.attention import hybrid_mask
from hf_hybrid_attn.cache import HybridCache


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _model(mode="hybrid", **hybrid):
    m = hf_hybrid_attn.convert(tiny_model(), HybridConfig(window=8, **hybrid))
    randomize_mixers(m)
    hf_hybrid_attn.set_component_mode(m, mode)
    return m.eval()


def _prompt(pad: int, T: int = 20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, T), generator=g)
    am = torch.ones_like(ids)
    am[1, :pad] = 0
    return ids, am


def _compile_config(backend, dynamic=False) -> CompileConfig:
    """transformers' CompileConfig (dynamic=False, its default: every int the step reads is a
    guard, so an int that changed per step would recompile every step), with fullgraph."""
    cc = CompileConfig(fullgraph=True, backend=backend, dynamic=dynamic)
    cc._compile_all_devices = True  # transformers auto-compiles on CUDA only unless told otherwise
    return cc


class RecordingBackend:
    """aot_eager, recording the graph inputs that are not tensors (a SymInt there would make CUDA
    graph trees record a new graph for every value it takes)."""

    def __init__(self):
        self.non_tensor_inputs = []

    def __call__(self, gm, example_inputs, **kwargs):
        from torch._dynamo.backends.registry import lookup_backend

        self.non_tensor_inputs += [type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)]
        return lookup_backend("aot_eager")(gm, example_inputs)


def _step_kwargs(cache, tok, am, prepared=False):
    """One decode step's kwargs; `prepared`: the mask as generate() prepares it for a compileable
    cache (the new token's key padding, a fixed [B, 1] whatever the length)."""
    am = torch.cat([am, torch.ones_like(tok)], 1)
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -1:].clone()  # contiguous, as generate() passes it
    kw = dict(input_ids=tok, attention_mask=am[:, -1:].bool() if prepared else am, position_ids=pos, use_cache=True)
    compat.set_cache(kw, cache, None)
    return kw, am


def _prefilled(m, ids, am):
    """A compileable HybridCache after an eager prefill of ids, the greedy next token, the mask."""
    cache = HybridCache(m.config, compileable=True)
    out = m(ids, attention_mask=am, **compat.cache_kwargs(cache), use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1), am


# (mode, HybridConfig overrides, left padding of row 1): 18 of 20 padded leaves the row with fewer
# valid tokens than num_sinks (4), so the sinks bookkeeping runs in the compiled steps
CASES = [
    ("hybrid", {}, 5),
    ("hybrid", {}, 18),
    ("hybrid", {"softmax_sinks": 2}, 18),
    ("hybrid", {"linear_covers_window": True}, 5),
    ("linear_only", {}, 5),
    ("swa_only", {}, 18),
]


@pytest.mark.parametrize("mode,hybrid,pad", CASES, ids=[f"{m}-{'-'.join(h) or 'default'}-pad{p}" for m, h, p in CASES])
def test_decode_step_is_one_graph_without_host_sync(mode, hybrid, pad):
    m = _model(mode, **hybrid)
    ids, am = _prompt(pad)
    cache = HybridCache(m.config, compileable=True)
    with torch.no_grad():
        out = m(ids, attention_mask=am, **compat.cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        eager_cache = copy.deepcopy(cache)
        kw, _ = _step_kwargs(cache, tok, am)
        explained = torch._dynamo.explain(m.forward)(**kw)
        assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
        assert explained.graph_count == 1
        # the traced step advanced the cache exactly as an eager step does
        kw_e, _ = _step_kwargs(eager_cache, tok, am)
        ref = m(**kw_e).logits
    for a, b in zip(cache.layers, eager_cache.layers):
        assert a.position == b.position and a.cumulative_length == b.cumulative_length
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
        torch.testing.assert_close(a.state[0], b.state[0], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ref).all()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode,hybrid,pad", [CASES[1], CASES[2], CASES[4]],
                         ids=["hybrid-pad18", "softmax_sinks-pad18", "linear_only-pad5"])
def test_compiled_generate_equals_eager(backend, mode, hybrid, pad):
    m = _model(mode, **hybrid)
    ids, am = _prompt(pad)
    kw = dict(attention_mask=am, max_new_tokens=24, min_new_tokens=24, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # eager: nothing compiled
        got = m.generate(ids, cache_implementation="static", compile_config=_compile_config(backend), **kw)
    # compiled once for all 23 decode steps: no int that changes per step is read in the graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), rtol=1e-5, atol=1e-5)
    assert compat.output_cache(got).is_compileable


def test_static_cache_implementation_is_the_compileable_hybrid_cache():
    m = _model()
    ids, am = _prompt(0, T=6)
    kw = dict(attention_mask=am, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        default = compat.output_cache(m.generate(ids, **kw))
        static = compat.output_cache(m.generate(ids, cache_implementation="static", **kw))
    assert type(default) is HybridCache and not default.is_compileable  # eager everywhere unless asked
    assert type(static) is HybridCache and static.is_compileable
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported by hybrid models"):
        m.generate(ids, cache_implementation="offloaded", **kw)


def test_partial_conversion_stays_eager():
    """With an unconverted full-attention layer (a growing DynamicLayer) the cache is not
    compileable, so generate() runs eagerly even when asked to compile, with the same tokens."""
    m = hf_hybrid_attn.convert(tiny_model(), HybridConfig(window=8, layers=[0]))
    randomize_mixers(m)
    ids, am = _prompt(5)
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        got = m.generate(ids, cache_implementation="static", compile_config=_compile_config("eager"), **kw)
    assert not HybridCache(m.config, compileable=True).is_compileable
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert torch.equal(got, ref)


def test_hybrid_mask_is_idempotent():
    """generate() prepares a compileable cache's mask before the forward, which passes it through
    the mask interface again: the second pass must return the same key padding."""
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :4] = 0
    from transformers.masking_utils import causal_mask_function

    once = hybrid_mask(2, 1, 1, q_offset=11, kv_offset=11, mask_function=causal_mask_function, attention_mask=padding)
    twice = hybrid_mask(2, 1, 1, q_offset=11, kv_offset=11, mask_function=causal_mask_function, attention_mask=once)
    assert once.shape == (2, 1) and once.dtype == torch.bool and once.all()
    assert torch.equal(once, twice)
    full = hybrid_mask(2, 12, 12, kv_offset=0, mask_function=causal_mask_function, attention_mask=padding)
    assert torch.equal(full, padding.bool())
    assert torch.equal(hybrid_mask(2, 12, 12, kv_offset=0, mask_function=causal_mask_function, attention_mask=full), full)


@pytest.mark.parametrize("dynamic", [False, None])
def test_compiled_step_has_only_tensor_inputs(dynamic):
    """With dynamic shapes allowed too, the position never becomes a SymInt graph input: it lives
    on the device, advanced in place by the step (what CUDA graphs need)."""
    m = _model(**{})
    ids, am = _prompt(5)
    backend = RecordingBackend()
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=am, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        got = m.generate(ids, attention_mask=am, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         cache_implementation="static", compile_config=_compile_config(backend, dynamic))
    assert torch.equal(got, ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert backend.non_tensor_inputs == []


def test_compiled_steps_with_beam_reordering():
    """Beam search reorders the cache between steps (transformers' beam search runs eagerly, so the
    steps are driven here); a compileable cache reorders in place, keeping its static addresses,
    so the compiled step is not recompiled after a reorder, and the steps equal the eager ones."""
    m = _model()
    ids, am = _prompt(5)
    perms = [torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([1, 0])]
    step = torch.compile(m.forward, fullgraph=True, backend="aot_eager")
    runs = []
    with torch.no_grad():
        for fwd in (m.forward, step):
            cache, tok, a = _prefilled(m, ids, am)
            logits = []
            storage = cache.layers[0].keys.data_ptr()
            for perm in perms:
                cache.reorder_cache(perm)
                tok, a = tok[perm], a[perm]
                kw, a = _step_kwargs(cache, tok, a, prepared=True)
                logits.append(fwd(**kw).logits[:, -1])
                tok = logits[-1][:, None].argmax(-1)
            assert cache.layers[0].keys.data_ptr() == storage  # reordered in place
            runs.append(torch.stack(logits))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_counters_after_compiled_steps():
    """After compiled steps only the device position moved; the layer's position, length and the
    ring read back exactly as after eager steps, and eager steps can follow."""
    m = _model()
    ids, am = _prompt(5)
    step = torch.compile(m.forward, fullgraph=True, backend="aot_eager")
    caches = []
    with torch.no_grad():
        for fwd in (m.forward, step):
            cache, tok, a = _prefilled(m, ids, am)
            for i in range(6):
                kw, a = _step_kwargs(cache, tok, a, prepared=True)
                tok = (fwd if i < 4 else m.forward)(**kw).logits[:, -1:].argmax(-1)  # 4 compiled, then 2 eager
            caches.append((cache, tok))
    (ce, te), (cc, tc) = caches
    assert torch.equal(te, tc)
    for a, b in zip(ce.layers, cc.layers):
        assert a.position == b.position == 26 and a.cumulative_length == b.cumulative_length == 26
        assert b.get_seq_length() == 26 and int(b._position_t) == 26
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)


def test_compiled_step_runs_the_torch_step_where_triton_is_chosen(monkeypatch):
    """On CUDA the eager step is the fused Triton kernel; a compiled step runs the PyTorch step
    (inductor compiles it) and never traces the hand-written kernel. Forced here with
    backend='triton' on CPU: the Triton step must not be reached while compiling."""
    import hf_hybrid_attn.kernels.triton_decode as triton_decode

    m = _model()
    for _, attn in hf_hybrid_attn.iter_hybrid_attention(m):
        attn.hybrid.backend = "triton"
    ids, am = _prompt(5)

    def refuse(*a, **k):
        raise AssertionError("the Triton decode kernel was traced")

    with torch.no_grad():
        cache = HybridCache(m.config, compileable=True)
        m(ids, attention_mask=am, **compat.cache_kwargs(cache), use_cache=True)
        reference = copy.deepcopy(cache)
        tok = torch.tensor([[5], [7]])
        monkeypatch.setattr(triton_decode, "hybrid_decode_triton", refuse)
        kw, _ = _step_kwargs(cache, tok, am, prepared=True)
        got = torch.compile(m.forward, fullgraph=True, backend="eager")(**kw).logits
        for _, attn in hf_hybrid_attn.iter_hybrid_attention(m):
            attn.hybrid.backend = "torch"
        kw, _ = _step_kwargs(reference, tok, am, prepared=True)
        ref = m(**kw).logits
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
