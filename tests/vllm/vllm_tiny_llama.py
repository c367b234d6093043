"""Tiny random Llama, every layer converted (w = 8): vLLM greedy tokens equal HF generate() with
HybridCache in each component mode (switched at run time), for 8 prompts of lengths < w, around w
and >= 4w submitted together, and for requests added while others decode. max_num_batched_tokens=16:
the long prompts are prefilled in chunks, in steps shared with other requests' decodes."""

from __future__ import annotations

import cases
import pytest
from harness import assert_identical, generate_staggered, generate_together, make_llm, references

NAME = "tiny_llama"


@pytest.fixture(scope="module")
def llm():
    return make_llm(NAME)


@pytest.fixture(scope="module")
def refs():
    return references(NAME)


@pytest.mark.parametrize("mode", cases.MODES)
def test_batch_of_8_token_identical_in_each_mode(llm, refs, mode):
    from hf_hybrid_attn.serving.vllm import set_component_mode

    assert set_component_mode(llm, mode) == 4
    try:
        got = generate_together(llm, refs["prompts"], refs["new_tokens"])
    finally:
        set_component_mode(llm, "hybrid")
    assert_identical(got, refs["modes"][mode], f"{NAME} {mode}")


def test_modes_really_differ(refs):
    """The mode references differ from each other, so the per-mode checks test the mode."""
    modes = refs["modes"]
    assert len({str(modes[m]) for m in cases.MODES}) == len(cases.MODES)


def test_requests_added_while_others_decode(llm, refs):
    got, early, log = generate_staggered(llm, refs["prompts"], refs["new_tokens"], first=3, after_steps=4)
    assert early and all(v >= 1 for v in early.values()), f"the first requests were not decoding yet: {early}"
    # the late 45-token prompt (budget 16 tokens a step) is prefilled over several steps in which the
    # early requests keep producing tokens: mixed prefill/decode steps and chunked prefill
    late = str(len(refs["prompts"]) - 1)
    waiting = [c for c in log if c.get(late, 0) == 0]
    assert len(waiting) >= 2 and waiting[-1].get("0", 0) > waiting[0].get("0", 0), log[:6]
    assert_identical(got, refs["modes"]["hybrid"], f"{NAME} staggered")


def test_state_is_fixed_size_and_replaces_the_kv_cache(llm):
    from hf_hybrid_attn.serving.vllm import state_bytes_per_sequence

    def layers(model):
        from vllm.model_executor.layers.attention import Attention

        from hf_hybrid_attn.serving.vllm import HybridStateLayer
        return ([type(m).__name__ for m in model.modules() if isinstance(m, HybridStateLayer)],
                sum(isinstance(m, Attention) for m in model.modules()))

    state_layers, softmax_layers = llm.apply_model(layers)[0]
    assert len(state_layers) == 4 and softmax_layers == 0
    H, Hkv, D, F2, w, sinks = 4, 2, 32, 16, 8, 4
    per_layer = 4 * (H * F2 * D + H * F2) + 4 * (2 * Hkv * (w - 1) * D + 2 * Hkv * sinks * D)
    assert state_bytes_per_sequence(llm) == 4 * per_layer
