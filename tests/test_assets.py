"""Offline assets: the real SmolLM2 teacher (Q4_1, dequantized) and the real corpora."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_hybrid_attn import assets


def _require(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except assets.AssetMissingError as e:  # the README's setup installs these; say which is absent
        pytest.skip(f"offline asset missing: {e}")


@pytest.fixture(scope="module")
def teacher2():
    return _require(assets.load_teacher, num_layers=2)


def test_full_config_is_smollm2_135m():
    cfg = AutoConfig.from_pretrained(_require(assets.teacher_dir))
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.head_dim == 64 and cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None


def test_cut_teacher_has_real_weights_and_saves(teacher2, tmp_path):
    model, tok = teacher2
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert not model.training
    w = model.model.layers[1].self_attn.q_proj.weight
    assert w.shape == (576, 576) and w.dtype == torch.float32
    # dequantized Q4_1: a trained matrix, not an init (few distinct values per 32-block, nonzero spread)
    assert 0.01 < w.std().item() < 1.0 and w.abs().max().item() > 0.1
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([assets.tokenize_for_lm(tok, "The state of the union is strong.")])
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)  # no quantization_config: saving works
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)


def test_bos_convention_is_no_bos(teacher2):
    _, tok = teacher2
    ids = assets.tokenize_for_lm(tok, "Hello world")
    assert ids == [19556, 905]  # SmolLM2's ids for "Hello", " world": no BOS (<|im_start|> = 1) in front
    assert tok("Hello world").input_ids == ids  # plain tokenizer call agrees
    assert tok.pad_token is not None


def test_num_layers_and_dtype_are_checked():
    _require(assets.teacher_dir)
    with pytest.raises(ValueError, match="num_layers: expected an int in 1..30"):
        assets.load_teacher(num_layers=0)
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        assets.load_teacher(dtype="float32")


def test_corpora_are_real_and_sized():
    sotu = _require(assets.load_corpus, "sotu")
    assert len(sotu) == 233
    assert sotu[0].startswith("Fellow-Citizens of the Senate and House of Representatives")  # Washington, 1790
    assert 9e6 < sum(map(len, sotu)) < 12e6
    austen = _require(assets.load_corpus, "austen")
    assert len(austen) == 6
    assert austen[1].startswith("PRIDE AND PREJUDICE") and "It is a truth universally acknowledged" in austen[1]
    assert 3.5e6 < sum(map(len, austen)) < 4.5e6
    boolq = _require(assets.load_corpus, "boolq")
    assert len(boolq) == 2938 and len(set(boolq)) == 2938
    assert 300 < sum(map(len, boolq)) / len(boolq) < 1000
    with pytest.raises(ValueError, match="name: expected one of"):
        assets.load_corpus("wikitext")


def test_missing_assets_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HYBRID_ASSETS", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="State of the Union.*install_assets.sh"):
        assets.load_corpus("sotu")
    with pytest.raises(assets.AssetMissingError, match="Austen.*install_assets.sh"):
        assets.load_corpus("austen")
    monkeypatch.setenv("HF_HYBRID_TEACHER_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(assets.AssetMissingError, match="HF_HYBRID_TEACHER_GGUF"):
        assets.teacher_gguf_path()


def test_full_teacher_perplexity_on_a_speech_is_sane(teacher2):
    """Full 30-layer teacher on 256 tokens of the most recent speech (ASSETS.md: ~22 on 4x512)."""
    speech = _require(assets.load_corpus, "sotu")[-1]
    model, tok = _require(assets.load_teacher)
    ids = torch.tensor([assets.tokenize_for_lm(tok, speech)[:256]])
    with torch.no_grad():
        full = math.exp(model(ids, labels=ids).loss.item())
        cut = math.exp(teacher2[0](ids, labels=ids).loss.item())
    assert 12.0 < full < 40.0, full
    assert cut > 3 * full, (cut, full)  # two layers alone are a much worse LM: the other 28 matter
