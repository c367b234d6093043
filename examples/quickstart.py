"""Quickstart: convert the offline SmolLM2 teacher, switch component modes, save and reload.

    python examples/quickstart.py [--window 64] [--out smol-hybrid]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

import hf_hybrid_attn as hha
from hf_hybrid_attn.assets import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", default="smol-hybrid")
    args = ap.parse_args()

    model, tok = load_teacher(dtype=torch.float32)
    model = hha.convert(model, hha.HybridConfig(window=args.window, feature_map="hedgehog", feature_dim=64))
    enc = tok("The three branches of government are", return_tensors="pt")
    for mode in hha.COMPONENT_MODES:
        with hha.component_mode(model, mode):
            out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        print(f"{mode:<12}", repr(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)))

    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    again = AutoModelForCausalLM.from_pretrained(args.out)  # hybrid, no extra argument
    teacher = AutoModelForCausalLM.from_pretrained(args.out, attn_implementation="sdpa")  # softmax view
    print(type(again).__name__, again.config._attn_implementation, "|", teacher.config._attn_implementation)


if __name__ == "__main__":
    main()
