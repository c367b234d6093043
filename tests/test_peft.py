"""PEFT LoRA on converted models: training step, adapter save/reload, merge (HF_NOTES "PEFT")."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model


def test_lora_with_hybrid_modules_to_save(tmp_path):
    base = hha.convert(tiny_model(), window=4, feature_dim=8)
    randomize_mixers(base)
    base.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     modules_to_save=["hybrid"])
    model = get_peft_model(base, cfg)
    ids = torch.randint(3, 99, (2, 20))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    # the trained copy of `hybrid` is the one that runs, and modes still switch through the wrapper
    with torch.no_grad():
        out = model(ids).logits
        with hha.component_mode(model, "swa_only"):
            swa = model(ids).logits
    assert (out - swa).abs().max() > 1e-4
    assert hha.get_component_modes(model) == {0: "hybrid", 1: "hybrid"}

    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, out, rtol=0, atol=1e-6)

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out, rtol=1e-5, atol=1e-5)
