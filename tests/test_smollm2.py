"""The real teacher: SmolLM2-135M-Instruct (Q4_1, dequantized), cut to its first 4 layers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_hybrid_attn as hha

assets = pytest.importorskip("hf_hybrid_attn.assets")


@pytest.fixture(scope="module")
def teacher():
    try:
        model, tok = assets.load_teacher(dtype=torch.float32, num_layers=4)
    except FileNotFoundError as e:  # the README's setup installs it; say why if it is absent
        pytest.skip(f"SmolLM2 teacher asset missing: {e}")
    return model.eval(), tok


def _batch(tok):
    texts = [
        "The state of the union is strong, and the people of this nation",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    ]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(texts, return_tensors="pt", padding=True)


def test_real_teacher_converts_and_matches_with_full_window(teacher, tmp_path):
    model, tok = teacher
    enc = _batch(tok)
    pos = (enc.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(**enc, position_ids=pos).logits
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)

    hybrid = hha.convert(model, hha.HybridConfig(window=64, feature_map="hedgehog", feature_dim=64))
    keep = enc.attention_mask.bool()
    assert enc.input_ids.shape[1] <= 64
    with torch.no_grad():
        out = hybrid(**enc, position_ids=pos).logits
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-4, rtol=1e-4)

    hybrid.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "HybridLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc, position_ids=pos).logits, out, rtol=0, atol=0)

    # a short window makes the modes differ; every mode generates, and greedy decoding with the
    # HybridCache reproduces the uncached argmax
    hha.set_window(loaded, 8)
    for mode in hha.COMPONENT_MODES:
        with hha.component_mode(loaded, mode):
            gen = loaded.generate(**enc, max_new_tokens=6, do_sample=False)
            full_mask = torch.cat([enc.attention_mask, torch.ones(2, 6, dtype=torch.long)], 1)
            with torch.no_grad():
                logits = loaded(gen, attention_mask=full_mask,
                                position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits
        T = enc.input_ids.shape[1]
        assert gen.shape == (2, T + 6)
        assert torch.equal(logits[:, T - 1 : -1].argmax(-1), gen[:, T:]), mode
