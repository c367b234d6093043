"""Masks on the hybrid path carry key padding only: nothing of size Tq x Tk is built for converted
layers (issue 11), while unrecognised patterns (packed sequences) still get the exact 4-D mask and
are refused, and layers left unconverted still get their exact softmax mask."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_hybrid_attn as hha
import hf_hybrid_attn.attention as attention
from conftest import randomize_mixers, tiny_model


@pytest.fixture
def no_dense_masks(monkeypatch):
    """Fail on any 4-D mask construction or 4-D mask reading on the hybrid path."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Tq x Tk mask was built on the hybrid path")

    monkeypatch.setattr(attention, "sdpa_mask", refuse)
    monkeypatch.setattr(attention, "mask_to_key_valid", refuse)
    monkeypatch.setattr(attention, "_softmax_mask", refuse)


def padded(B=2, T=40, pad=7):
    ids = torch.randint(3, 99, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("gemma3_text", {})])
def test_padded_forward_backward_and_generate_build_no_dense_mask(family, overrides, no_dense_masks):
    model = hha.convert(tiny_model(family, **overrides), window=5, feature_dim=8)
    randomize_mixers(model)
    ids, mask = padded()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)


def test_key_padding_mask_matches_the_dense_path():
    """The 2-D key padding and the checked 4-D mask give the same outputs (padding on both sides)."""
    model = hha.convert(tiny_model("qwen2", use_sliding_window=True, sliding_window=8,
                                   layer_types=["full_attention", "sliding_attention"]), window=5, feature_dim=8)
    randomize_mixers(model)
    ids, mask = padded(T=30)
    mask[0, -4:] = 0  # right padding too
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(hha.ATTN_IMPLEMENTATION, sdpa_mask)
    try:
        with torch.no_grad():
            dense = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        AttentionMaskInterface.register(hha.ATTN_IMPLEMENTATION, attention.hybrid_mask)
    valid = mask.bool()
    torch.testing.assert_close(fast[valid], dense[valid], rtol=0, atol=1e-6)


def test_packed_sequences_are_still_refused():
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    ids = torch.randint(3, 99, (1, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])  # two packed documents, no attention mask
    with pytest.raises(ValueError, match="causal masks with padding only"):
        model(input_ids=ids, position_ids=pos, use_cache=False)


def test_unconverted_layers_keep_their_exact_softmax_mask():
    """Partial conversion: the softmax layers rebuild causal + padding (+ the teacher's window) from
    the key padding, so a model with no converted layer in play equals the teacher exactly."""
    teacher = tiny_model("mistral", sliding_window=6, num_hidden_layers=3)
    model = hha.convert(copy.deepcopy(teacher), window=4, feature_dim=8, layers=[1])
    hha.set_component_mode(model, "hybrid")
    ids, mask = padded(T=20, pad=5)
    with torch.no_grad():
        # layer 0 is unconverted: its output must equal the teacher's layer-0 output exactly
        t_out = teacher(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states[1]
        m_out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states[1]
    valid = mask.bool()
    torch.testing.assert_close(m_out[valid], t_out[valid], rtol=0, atol=1e-6)
