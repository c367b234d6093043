"""Builds the converted checkpoints the vLLM tests serve and records their HF references.

Run with the MAIN venv's python (transformers + the offline SmolLM2 teacher):
    python tests/vllm/build_models.py OUT_DIR
Writes OUT_DIR/<name>/ (save_pretrained folders, unchanged format) and OUT_DIR/references.json:
per model, the prompts (token ids) and, per component mode, HF `generate()` greedy tokens with the
default HybridCache, one prompt at a time, fp32. Also a converted checkpoint of an unsupported
family's shape and one with an unknown feature map, for the bad-input tests.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402

from hf_hybrid_attn import HybridConfig, component_mode, convert  # noqa: E402


def tiny_teacher(family: str, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, tie_word_embeddings=False, rms_norm_eps=1e-6)
    cfg = LlamaConfig(**common) if family == "llama" else Qwen3Config(head_dim=32, **common)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def randomise_hybrid(model, seed: int) -> None:
    """Non-trivial feature maps and window weights (an untrained conversion is identity-like)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hybrid." in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if "window_logit" in name else 0.3))


@torch.no_grad()
def references(model, prompts, new_tokens, modes):
    out = {}
    for mode in modes:
        with component_mode(model, mode):
            rows = []
            for ids in prompts:
                x = torch.tensor([ids])
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                rows.append(y[0, len(ids):].tolist())
            out[mode] = rows
    return out


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    refs = {}
    gen = torch.Generator().manual_seed(0)
    for i, (name, (family, layers, modes)) in enumerate(cases.TINY_MODELS.items()):
        model = tiny_teacher(family, seed=10 + i)
        model = convert(model, HybridConfig(window=cases.TINY_WINDOW, feature_dim=8, layers=layers))
        randomise_hybrid(model, seed=20 + i)
        model.generation_config.eos_token_id = None
        path = os.path.join(out_dir, name)
        model.save_pretrained(path)
        prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in cases.TINY_LENGTHS]
        refs[name] = {"prompts": prompts, "new_tokens": cases.TINY_NEW_TOKENS,
                      "modes": references(model, prompts, cases.TINY_NEW_TOKENS, modes)}
        print(f"[build] {name}: {family}, layers={layers}, modes={modes}", flush=True)
        if name == "tiny_llama":  # bad inputs: same weights, an unsupported family / an unknown feature map
            for bad, edit in (("bad_family", {"model_type": "hybrid_phi3", "architectures": ["HybridPhi3ForCausalLM"]}),
                              ("bad_feature_map", None)):
                bpath = os.path.join(out_dir, bad)
                model.save_pretrained(bpath)
                with open(os.path.join(bpath, "config.json")) as f:
                    d = json.load(f)
                if edit:
                    d.update(edit)
                else:
                    d["hybrid"]["feature_map"] = "no_such_map"
                with open(os.path.join(bpath, "config.json"), "w") as f:
                    json.dump(d, f, indent=2)

    from hf_hybrid_attn.assets import load_corpus
    from hf_hybrid_attn.loading import load_model

    teacher, tok = load_model("smollm2")
    tpath = os.path.join(out_dir, "smollm2_teacher")
    teacher.save_pretrained(tpath)
    tok.save_pretrained(tpath)
    model = convert(teacher, HybridConfig())  # untrained, the defaults: w = 64, hedgehog F = 64
    model.generation_config.eos_token_id = None
    path = os.path.join(out_dir, "smollm2_hybrid")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    text = " ".join(load_corpus("austen")[0].split()[:3000])
    ids = tok(text)["input_ids"]
    prompts = [ids[100 * k : 100 * k + n] for k, n in enumerate(cases.SMOL_LENGTHS)]
    refs["smollm2_hybrid"] = {"prompts": prompts, "new_tokens": cases.SMOL_NEW_TOKENS,
                              "modes": references(model, prompts, cases.SMOL_NEW_TOKENS, cases.SMOL_MODES)}
    print("[build] smollm2_hybrid: SmolLM2-135M-Instruct (Q4_1, dequantized), untrained conversion", flush=True)
    with open(os.path.join(out_dir, "references.json"), "w") as f:
        json.dump(refs, f)


if __name__ == "__main__":
    main(sys.argv[1])
