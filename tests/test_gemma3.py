"""The second real teacher: Gemma-3-270M (base, Q4_K_M, dequantized), 18 layers of which every
sixth is global and the others slide over 512 tokens; q/k norms, head_dim 256, its own query
scaling, different RoPE on local and global layers, and a tokenizer that must add BOS (id 2).

Installed by the README's setup (scripts/install_assets.sh): a missing asset fails here."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_hybrid_attn as hha
from hf_hybrid_attn.evaluation.perplexity import corpus_blocks, nll_per_position
from hf_hybrid_attn.loading import load_model

PROMPTS = ["The capital of France is", "It is a truth universally acknowledged, that a single man in possession of"]


@pytest.fixture(scope="module")
def teacher():
    model, tok = load_model("gemma3-270m")
    return model, tok


def batch(tok, texts=PROMPTS):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    pos = (enc.attention_mask.cumsum(1) - 1).clamp(min=0)
    return enc.input_ids, enc.attention_mask, pos


def logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def test_teacher_shape_and_bos(teacher):
    model, tok = teacher
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.num_hidden_layers == 18
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window) == (4, 1, 256, 512)
    assert hha.config.teacher_windows(cfg) == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert tok("Hello world")["input_ids"] == [2, 9259, 1902]
    # perplexity blocks start with BOS for this model: without it Gemma degenerates (measured on these
    # two 256-token Austen blocks: ppl 43 with BOS, 233 without)
    blocks = corpus_blocks(tok, "austen", block_size=256, max_blocks=2)
    assert (blocks[:, 0] == 2).all()
    ppl = float(nll_per_position(model, blocks).mean().exp())
    assert ppl < 80, ppl


def test_full_window_equals_teacher_and_short_generation_matches(teacher):
    model, tok = teacher
    ids, mask, pos = batch(tok)
    ref = logits(model, ids, mask, pos)
    hybrid = hha.convert(copy.deepcopy(model), window=64)  # w >= T: the linear branch is empty
    valid = mask.bool()
    torch.testing.assert_close(logits(hybrid, ids, mask, pos)[valid], ref[valid], rtol=1e-4, atol=1e-4)
    # prompt + 12 new tokens stay inside w=64: greedy generation is the teacher's, through the HybridCache
    gen_t = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    gen_h = hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(gen_h, gen_t)
    assert "France" in tok.decode(gen_h[0, ids.shape[1]:])


def test_convert_save_reload_sdpa_view_and_cached_generation(teacher, tmp_path):
    model, tok = teacher
    hybrid = hha.convert(copy.deepcopy(model), window=16)
    text = " ".join(["The history of the United States Congress begins with the Continental Congress."] * 60)
    ids, mask, pos = batch(tok, [text])
    ids, mask, pos = ids[:, :600], mask[:, :600], pos[:, :600]  # longer than the local layers' window (512)
    ref = logits(model, ids, mask, pos)
    out = logits(hybrid, ids, mask, pos)
    hybrid.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "HybridGemma3TextForCausalLM" and again.config.model_type == "hybrid_gemma3_text"
    torch.testing.assert_close(logits(again, ids, mask, pos), out, rtol=0, atol=1e-5)
    del again
    view = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    torch.testing.assert_close(logits(view, ids, mask, pos), ref, rtol=0, atol=1e-5)  # exactly the teacher
    del view
    # cached greedy decoding past the window equals the uncached argmax
    ids, mask, pos = batch(tok)
    seq = hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    full = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    argmax = logits(hybrid, seq, full, (full.cumsum(1) - 1).clamp(min=0))[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(argmax, seq[:, ids.shape[1]:])


def test_layers_global_converts_the_three_global_layers(teacher):
    model, tok = teacher
    hybrid = hha.convert(copy.deepcopy(model), window=16, layers="global")
    assert [i for i, _ in hha.iter_hybrid_attention(hybrid)] == [5, 11, 17]
    ids, mask, pos = batch(tok)
    seq = hybrid.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert seq.shape[1] == ids.shape[1] + 8


def test_demo_runs_on_gemma(tmp_path, capsys):
    """`hf-hybrid demo --model gemma3-270m` (the README's main job on the second teacher), at a
    minimal size: conversion of the global layers only, one task item, one perplexity block."""
    from hf_hybrid_attn.cli import main

    rc = main(["demo", "--model", "gemma3-270m", "--layers", "global", "--tasks", "arc_easy", "--limit", "1",
               "--ppl-blocks", "1", "--probe-distances", "32", "--probe-items", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Gemma-3-270M (Q4_K_M, dequantized)" in out and "layers='global'" in out
    assert (tmp_path / "demo.json").is_file()
