"""Tiny random Qwen3 (q/k norms, config.layer_types), every layer converted: vLLM equals HF generate()."""

from __future__ import annotations

import pytest
from harness import assert_identical, generate_staggered, generate_together, make_llm, references

NAME = "tiny_qwen3"


@pytest.fixture(scope="module")
def llm():
    return make_llm(NAME)


@pytest.fixture(scope="module")
def refs():
    return references(NAME)


@pytest.mark.parametrize("mode", ["hybrid", "linear_only"])
def test_batch_of_8_token_identical(llm, refs, mode):
    from hf_hybrid_attn.serving.vllm import set_component_mode

    set_component_mode(llm, mode)
    try:
        got = generate_together(llm, refs["prompts"], refs["new_tokens"])
    finally:
        set_component_mode(llm, "hybrid")
    assert_identical(got, refs["modes"][mode], f"{NAME} {mode}")


def test_requests_added_while_others_decode(llm, refs):
    got, early, _ = generate_staggered(llm, refs["prompts"], refs["new_tokens"], first=2, after_steps=3)
    assert early and all(v >= 1 for v in early.values())
    assert_identical(got, refs["modes"]["hybrid"], f"{NAME} staggered")
