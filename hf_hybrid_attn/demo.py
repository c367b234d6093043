"""The main job (`hf-hybrid demo`): convert the real teacher and print its component diagnostics.

On the embedded default it loads SmolLM2-135M-Instruct (Q4_1, dequantized; `--model gemma3-270m`
for the Gemma-3-270M teacher), converts it with the default `HybridConfig` (window 64, hedgehog,
F=64, every layer; `--layers global` for the teacher's global layers only; or --model DIR for an
already converted checkpoint), then runs `hf_hybrid_attn.diagnostics.diagnose` beside the softmax base: zero-shot
tasks per component mode, perplexity inside the first w tokens and beyond, a passkey probe beyond
the window, the LA share of the normaliser per layer, and the headline gaps. It prints the Markdown
report and one greedy generation per mode.
"""

from __future__ import annotations

import json
import os
import time

import hf_hybrid_attn as hha

from .diagnostics import diagnose, is_hybrid
from .evaluation.report import render_markdown
from .loading import cli_load_model, display_name

PROMPT = "The history of the United States Congress"


def run_demo(args) -> int:
    t0 = time.time()
    model, tok = cli_load_model(args.model, args.dtype)
    name = display_name(args.model)
    print(f"[demo] model: {name}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{model.config.num_hidden_layers} layers, loaded in {time.time() - t0:.1f}s)", flush=True)
    if not is_hybrid(model):
        cfg = hha.HybridConfig(window=args.window, feature_map=args.feature_map, feature_dim=args.feature_dim,
                               layers=getattr(args, "layers", None))
        hha.convert(model, cfg)
        print(f"[demo] converted with {cfg}")
        print("[demo] note: the feature maps are at their identity-like init (untrained); "
              "train them with `hf-hybrid convert`.", flush=True)
    tasks = [t for t in args.tasks.split(",") if t]
    results = diagnose(
        model, tok, tasks=tasks, limit=args.limit, out_dir=args.out, model_name=name,
        perplexity_blocks=args.ppl_blocks, probe_distances=tuple(args.probe_distances) or None,
        probe_items=args.probe_items,
    )
    print()
    print(render_markdown(results))
    print(f"Greedy generations from {PROMPT!r} (a short prompt: it fits in the window):")
    enc = tok(PROMPT, return_tensors="pt").to(next(model.parameters()).device)
    results["generations"] = {}
    for mode in hha.COMPONENT_MODES:
        with hha.component_mode(model, mode):
            gen = model.generate(**enc, max_new_tokens=24, do_sample=False)
        text = tok.decode(gen[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        results["generations"][mode] = text
        print(f"  {mode:<12} {text!r}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "demo.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"[demo] wrote {args.out}/ (demo.json, diagnostics report and plots)")
    print(f"[demo] done in {time.time() - t0:.0f}s")
    return 0
