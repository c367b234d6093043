"""`hf-hybrid convert`: train a conversion with a recipe and save a normal `save_pretrained` folder.

    hf-hybrid convert --model smollm2 --recipe hedgecats --tokens 2M --out runs/hedgecats

The output folder holds the converted (LoRA-merged) model and tokenizer, loadable with
`AutoModelForCausalLM.from_pretrained(out)` after `import hf_hybrid_attn`, and `training_log.json`
(loss curves, wall time, tokens/s and peak memory per stage). Checkpoints live in
`out/checkpoints/`; `--resume` continues from them without redoing finished work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from .data import CORPORA, DEFAULT_SEED, DEFAULT_VAL_FRACTION
from .recipes import RECIPES, _write_json, get_recipe, run_recipe


def parse_tokens(text: str) -> int:
    """'2000000', '2M', '500k', '1.5e6' -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a token count like 2000000, 2M or 500k, got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return int(value)


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set: expected KEY=VALUE (e.g. finetune.lora_r=16), got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_convert_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a softmax LM to hybrid attention by training a recipe (stage 1 + stage 2)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline teacher), a model directory, or a .gguf file")
    p.add_argument("--recipe", default="hedgecats", help=f"one of {sorted(RECIPES)}")
    p.add_argument("--tokens", type=parse_tokens, default=None,
                   help="total training tokens over both stages (e.g. 2M); split by the recipe's transfer_token_fraction")
    p.add_argument("--out", required=True, help="output directory (save_pretrained folder + training_log.json)")
    p.add_argument("--data", default="sotu",
                   help=f"training text: {', '.join(CORPORA)}, a .txt/.jsonl file, a directory, hf:NAME or arrow:PATH")
    p.add_argument("--text-field", default="text", help="text column for datasets / jsonl sources")
    p.add_argument("--seq-len", type=int, default=1024, help="packed sequence length (must exceed --window)")
    p.add_argument("--window", type=int, default=None, help="sliding window (default: the recipe's, 64)")
    p.add_argument("--feature-map", default=None, help="feature map name (default hedgehog)")
    p.add_argument("--feature-dim", type=int, default=None, help="feature dimension F (default 64)")
    p.add_argument("--layers", default=None,
                   help="layers to convert: 'all' (default), 'global' (the teacher's global layers) or indices 0,3")
    p.add_argument("--lr", type=float, default=None, help="stage-1 (attention transfer) learning rate (default 1e-2)")
    p.add_argument("--finetune-lr", type=float, default=None, help="stage-2 (LoRA) learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (both stages)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (both stages)")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N steps (both stages)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="stage-1 checkpoint every N steps")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="documents held out for validation")
    p.add_argument("--max-val-blocks", type=int, default=64, help="validation blocks kept")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the teacher's first N layers (quick runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set finetune.lora_r=16 --set ssd.granularity=sample")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype of the loaded teacher and of the saved model; the hybrid parameters "
                        "train as fp32 master weights either way and are saved in this dtype")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both stages (CUDA)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="training seed (initialisation, order, SSD draws)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the train/validation document split (default: --seed); fix it to compare "
                        "training seeds on the same data")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA adapter separate (OUT/adapter)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_convert)
    return p


def _overrides(args) -> dict[str, Any]:
    o: dict[str, Any] = {}
    for name, key in (("window", "hybrid.window"), ("feature_map", "hybrid.feature_map"), ("feature_dim", "hybrid.feature_dim")):
        if getattr(args, name) is not None:
            o[key] = getattr(args, name)
    if args.layers:
        from ..config import parse_layers

        try:
            o["hybrid.layers"] = parse_layers(args.layers)
        except ValueError as e:
            raise SystemExit(f"--layers: {e}") from None
    if args.lr is not None:
        o["transfer.lr"] = args.lr
    if args.finetune_lr is not None:
        o["finetune.lr"] = args.finetune_lr
    for name in ("batch_size", "grad_accum", "eval_every"):
        if getattr(args, name) is not None:
            o[f"transfer.{name}"] = o[f"finetune.{name}"] = getattr(args, name)
    if args.checkpoint_every is not None:
        o["transfer.checkpoint_every"] = args.checkpoint_every
    if args.bf16:
        o["transfer.bf16"] = o["finetune.bf16"] = True
    o["transfer.seed"] = o["finetune.seed"] = args.seed
    if args.recipe in RECIPES and RECIPES[args.recipe]().ssd is not None:
        o["ssd.seed"] = args.seed  # the SSD drop draws follow --seed too
    if args.no_merge:
        o["finetune.merge"] = False
    o.update(_parse_set(args.set))
    return o


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA was requested but no CUDA device is available")
    return dev


@contextlib.contextmanager
def _interrupt_on_signals():
    """While a conversion trains, SIGTERM, and SIGINT even where it was ignored (a background job of a
    non-interactive shell starts with SIGINT ignored), raise KeyboardInterrupt in the main thread, so
    stage 1 saves its checkpoint (transfer.py) and `--resume` continues from the last finished step
    (stage 2 keeps the Trainer's checkpoints of every eval). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_convert(args) -> int:
    import torch

    from ..loading import cli_load_model
    from ..modeling import iter_hybrid_attention
    from .data import build_packed_data

    t0 = time.perf_counter()
    if args.recipe not in RECIPES:
        raise SystemExit(f"--recipe: unknown recipe {args.recipe!r}; expected one of {sorted(RECIPES)}")
    try:
        recipe = get_recipe(args.recipe, **_overrides(args))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--set / options: {e}") from None
    window = recipe.hybrid.get("window", 64)
    if args.seq_len <= window:
        raise SystemExit(f"--seq-len ({args.seq_len}) must be larger than --window ({window}): only positions beyond "
                         "the window use the linear branch")
    if not 0.0 < args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction: expected a fraction in (0, 1), got {args.val_fraction}")
    if args.tokens is None and (recipe.transfer and recipe.transfer.max_steps is None
                                or recipe.finetune and recipe.finetune.max_steps is None):
        raise SystemExit("--tokens: required (e.g. --tokens 2M) unless every stage has max_steps set via --set")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        if os.path.isdir(os.path.join(args.out, "checkpoints")):
            raise SystemExit(f"--out: {args.out!r} holds an earlier run's checkpoints; pass --resume to continue it "
                             "or choose an empty directory")
    torch.manual_seed(args.seed)
    device = _device(args.device)
    model, tok = cli_load_model(args.model, args.dtype, args.num_layers)
    if any(True for _ in iter_hybrid_attention(model)):
        raise SystemExit(f"--model: {args.model!r} is already a converted hybrid model; convert a softmax teacher")
    try:
        data = build_packed_data(
            tok, args.data, seq_len=args.seq_len, window=window, val_fraction=args.val_fraction,
            max_train_tokens=args.tokens, max_val_blocks=args.max_val_blocks,
            seed=args.seed if args.data_seed is None else args.data_seed, text_field=args.text_field,
        )
    except ValueError as e:
        raise SystemExit(f"--data {args.data!r}: {e}") from None
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    os.makedirs(args.out, exist_ok=True)
    print(f"[convert] recipe {recipe.name}: {recipe.description}", file=sys.stderr)
    print(f"[convert] data: {data.info['train_blocks']} train / {data.info['val_blocks']} val blocks of "
          f"{data.seq_len} tokens from {data.info['source']!r}", file=sys.stderr)
    try:
        with _interrupt_on_signals():
            model, log = run_recipe(model, recipe, data, args.out, tokens=args.tokens, resume=args.resume,
                                    progress=not args.no_progress)
    except KeyboardInterrupt as e:
        raise SystemExit(f"[convert] interrupted ({e}): the steps saved in {args.out!r}/checkpoints are kept; "
                         "run the same command with --resume to continue") from None
    if args.no_merge and hasattr(model, "get_base_model"):
        from ..modeling import quiet_base_config_probe

        with quiet_base_config_probe():
            model.save_pretrained(os.path.join(args.out, "adapter"))
        model = model.unload()  # the base model without the LoRA layers (not merged)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    log.update({
        "model": args.model, "num_layers": model.config.num_hidden_layers, "device": str(device),
        "dtype": args.dtype, "argv": sys.argv, "wall_s_including_load": time.perf_counter() - t0,
    })
    if device.type == "cuda":
        log["device_name"] = torch.cuda.get_device_name(device)
        log["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    _write_json(os.path.join(args.out, "training_log.json"), log)
    partial = os.path.join(args.out, "training_log.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    summary = {s: {k: v.get(k) for k in ("initial_val_loss", "final_val_loss", "tokens", "tokens_per_s", "wall_s")}
               for s, v in log["stages"].items()}
    print(json.dumps({"out": args.out, "recipe": recipe.name, "stages": summary,
                      "val_loss_by_mode": log.get("val_loss_by_mode")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m hf_hybrid_attn.training.cli convert ...)."""
    parser = argparse.ArgumentParser(prog="hf-hybrid")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_subparser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
