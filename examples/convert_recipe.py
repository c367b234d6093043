"""Convert the offline SmolLM2 teacher with a recipe, from Python (the `hf-hybrid convert` CLI does
the same with more options).

    python examples/convert_recipe.py --recipe hedgecats --tokens 200000 --num-layers 4 --out runs/hc4

Prints the validation loss of each stage and, at the end, the next-token loss per component mode:
after a conversion whose linear branch matters, `hybrid` is clearly better than `swa_only`.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

import hf_hybrid_attn as hha
from hf_hybrid_attn.assets import load_teacher
from hf_hybrid_attn.training import build_packed_data, get_recipe, run_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="hedgecats", choices=["lolcats", "linear_only", "hedgecats", "ssd"])
    ap.add_argument("--tokens", type=int, default=200_000, help="total over both stages")
    ap.add_argument("--num-layers", type=int, default=4, help="first N teacher layers (None-like 0 = all 30)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", default="runs/convert_recipe")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_teacher(dtype=torch.float32, num_layers=args.num_layers or None)
    data = build_packed_data(tok, "sotu", seq_len=args.seq_len, window=args.window, max_train_tokens=args.tokens)
    recipe = get_recipe(args.recipe, **{
        "hybrid.window": args.window, "hybrid.feature_dim": 64,
        "transfer.batch_size": 4, "transfer.grad_accum": 1, "transfer.eval_every": 25,
        "finetune.batch_size": 4, "finetune.grad_accum": 1, "finetune.eval_every": 25,
    })
    model, log = run_recipe(model.to(device), recipe, data, args.out, tokens=args.tokens)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    for stage, s in log["stages"].items():
        print(f"{stage:>9}: val {s['initial_val_loss']:.4f} -> {s['final_val_loss']:.4f}  "
              f"({s['tokens']} tokens, {s['tokens_per_s']:.0f} tokens/s)")
    print("next-token loss by component mode:", json.dumps(log["val_loss_by_mode"], indent=1))
    again = AutoModelForCausalLM.from_pretrained(args.out)
    print("saved:", type(again).__name__, "recipe", again.config.hybrid["training"]["recipe"],
          "| modes", sorted(set(hha.get_component_modes(again).values())))


if __name__ == "__main__":
    main()
