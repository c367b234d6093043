"""`hf-hybrid`: command-line entry point.

  hf-hybrid demo      convert the SmolLM2 teacher (or --model gemma3-270m|DIR|.gguf) and print component diagnostics
  hf-hybrid generate  generate from a converted model in a chosen component mode
  hf-hybrid info      show a converted checkpoint's hybrid config
  hf-hybrid convert   train a conversion with a recipe (hf_hybrid_attn.training)
  hf-hybrid diagnose  the full component diagnostics (hf_hybrid_attn.diagnostics)
  hf-hybrid push      push a converted model or adapter with its card (hf_hybrid_attn.hub)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import COMPONENT_MODES

#: subcommands defined next to the code they run: name -> (module, add-subparser function, run
#: function, one-line help). Only the module of the subcommand being run is imported, so
#: `hf-hybrid info` (plain JSON) starts without torch or transformers.
SUBCOMMAND_MODULES = {
    "convert": ("hf_hybrid_attn.training.cli", "add_convert_subparser", "run_convert",
                "train a conversion with a recipe (lolcats, linear_only, hedgecats, ssd)"),
    "diagnose": ("hf_hybrid_attn.diagnostics", "add_diagnose_subparser", "run_diagnose",
                 "component diagnostics: task scores per mode, perplexity by position, LA share"),
    "push": ("hf_hybrid_attn.hub.cli", "add_push_subparser", "run_push",
             "push a converted model or adapter with its model card"),
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' or 'gemma3-270m' (the offline teachers), a model directory or a .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="convert SmolLM2 (default) and print its component diagnostics")
    _add_model_args(p)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--feature-map", default="hedgehog")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--layers", default="all",
                   help="layers to convert: 'all', 'global' (only the teacher's global-attention layers) or "
                        "comma-separated indices")
    p.add_argument("--limit", type=int, default=10, help="items per task (the full splits: --limit 0)")
    p.add_argument("--tasks", default="piqa,arc_easy,hellaswag", help="comma-separated tasks ('' for none)")
    p.add_argument("--ppl-blocks", type=int, default=2, help="512-token blocks of held-out prose for perplexity")
    p.add_argument("--probe-distances", type=int, nargs="*", default=[256], help="passkey distances (tokens)")
    p.add_argument("--probe-items", type=int, default=4)
    p.add_argument("--out", default="runs/demo", help="write JSON/Markdown/PNG reports here")
    p.set_defaults(func=lambda a: _demo(a))


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text in a component mode")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="hybrid", choices=COMPONENT_MODES)
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=lambda a: _generate(a))


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a converted checkpoint's hybrid config")
    p.add_argument("model")
    p.set_defaults(func=lambda a: _info(a))


def _generate(args) -> int:
    import torch

    import hf_hybrid_attn as hha

    from .loading import cli_load_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: {args.device!r} asked for CUDA, but no CUDA device is available")
    model, tok = cli_load_model(args.model, args.dtype, device=device)
    if not hasattr(model.config, "hybrid"):
        raise SystemExit(f"--model: {args.model!r} is not a converted hybrid model (run hf-hybrid convert first)")
    enc = tok(args.prompt, return_tensors="pt").to(device)
    with hha.component_mode(model, args.mode):
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True))
    return 0


def _info(args) -> int:
    path = os.path.join(args.model, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"model: no config.json in {args.model!r}")
    with open(path) as f:
        cfg = json.load(f)
    if "hybrid" not in cfg:
        raise SystemExit(f"model: {args.model!r} is not a converted hybrid checkpoint (no 'hybrid' in config.json)")
    print(json.dumps({"model_type": cfg.get("model_type"), "hybrid": cfg["hybrid"]}, indent=2))
    return 0


def _demo(args) -> int:
    from .config import parse_layers
    from .demo import run_demo

    try:
        args.layers = parse_layers(args.layers)
    except ValueError as e:
        raise SystemExit(f"--layers: {e}") from None
    if args.limit is not None and args.limit < 0:
        raise SystemExit(f"--limit: expected an integer >= 0, got {args.limit}")
    args.limit = args.limit or None
    return run_demo(args)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `hf-hybrid` parser. Of the subcommands in SUBCOMMAND_MODULES only the one named in
    `argv` (default: sys.argv[1:]) gets its real arguments (its module is imported); the others are
    listed with their help line."""
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="hf-hybrid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_generate(sub)
    _add_info(sub)
    for name, (mod_name, add_fn, run_fn, help_line) in SUBCOMMAND_MODULES.items():
        if name != chosen:
            sub.add_parser(name, help=help_line)
            continue
        mod = importlib.import_module(mod_name)
        before = set(sub.choices)
        getattr(mod, add_fn)(sub)
        run = getattr(mod, run_fn)
        for new in set(sub.choices) - before:
            sub.choices[new].set_defaults(func=run)
        if name not in sub.choices:
            raise RuntimeError(f"{mod_name}.{add_fn} did not add the '{name}' subcommand")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
