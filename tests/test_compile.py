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
from conftest import randomize_mixers, tiny_model
from transformers.generation.configuration_utils import CompileConfig

import hf_hybrid_attn
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


def _compile_config(backend: str) -> CompileConfig:
    cc = CompileConfig(fullgraph=True, backend=backend, dynamic=None)
    cc._compile_all_devices = True  # transformers auto-compiles on CUDA only unless told otherwise
    return cc


def _step_kwargs(cache, tok, am):
    am = torch.cat([am, torch.ones_like(tok)], 1)
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -1:]
    kw = dict(input_ids=tok, attention_mask=am, position_ids=pos, use_cache=True)
    compat.set_cache(kw, cache, None)
    return kw, am


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
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # compiled (the decode steps ran the compiled forward), and at most twice for 23 steps: the
    # first step specialises on the position, the second makes it dynamic; no step after that recompiles
    assert 1 <= graphs <= 2, graphs
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
