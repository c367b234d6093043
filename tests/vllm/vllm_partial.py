"""Tiny Llama with layers=[0, 2] converted: layers 1 and 3 keep vLLM's paged softmax attention.
Started with --hf-overrides '{"hybrid": {"component_mode": "swa_only"}}' (merged: the other hybrid
fields of config.json stay), then switched to hybrid at run time."""

from __future__ import annotations

import pytest
from harness import assert_identical, generate_staggered, generate_together, make_llm, references

NAME = "tiny_llama_partial"


@pytest.fixture(scope="module")
def llm():
    return make_llm(NAME, hf_overrides={"hybrid": {"component_mode": "swa_only"}})


@pytest.fixture(scope="module")
def refs():
    return references(NAME)


def test_override_merged_and_layers_split(llm):
    def inspect(model):
        from vllm.model_executor.layers.attention import Attention

        from hf_hybrid_attn.layers import HybridMixer
        from hf_hybrid_attn.serving.vllm import HybridStateLayer
        kinds = []
        for layer in model.model.layers:
            a = layer.self_attn.attn
            kinds.append("state" if isinstance(a, HybridStateLayer) else "softmax" if isinstance(a, Attention) else "?")
        mixers = [m for m in model.modules() if isinstance(m, HybridMixer)]
        return kinds, sorted({m.mode for m in mixers}), sorted({m.window for m in mixers}), model.config.hybrid

    kinds, modes, windows, hybrid = llm.apply_model(inspect)[0]
    assert kinds == ["state", "softmax", "state", "softmax"]
    assert modes == ["swa_only"] and windows == [8]
    assert hybrid["layers"] == [0, 2] and hybrid["feature_dim"] == 8 and hybrid["component_mode"] == "swa_only"


def test_swa_only_from_hf_overrides(llm, refs):
    got = generate_together(llm, refs["prompts"], refs["new_tokens"])
    assert_identical(got, refs["modes"]["swa_only"], f"{NAME} swa_only (hf_overrides)")


def test_hybrid_after_runtime_switch_with_staggered_requests(llm, refs):
    from hf_hybrid_attn.serving.vllm import set_component_mode

    assert set_component_mode(llm, "hybrid") == 2
    got, early, _ = generate_staggered(llm, refs["prompts"], refs["new_tokens"], first=3, after_steps=3)
    assert early and all(v >= 1 for v in early.values())
    assert_identical(got, refs["modes"]["hybrid"], f"{NAME} hybrid staggered")
