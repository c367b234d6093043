"""The paper's component diagnostics (SPEC §4): is the linear branch of a hybrid actually used?

    from hf_hybrid_attn.diagnostics import diagnose
    results = diagnose(model, tok, tasks=("piqa", "mmlu"), limit=200, out_dir="runs/diag")

For a converted model, every component mode runs on the same tasks, the same perplexity blocks and
the same passkey probe; the unconverted base model is evaluated by the same code (the same weights
with exact softmax attention: `attn_implementation="sdpa"` ignores the hybrid parameters). The
headline numbers are hybrid − swa_only and hybrid − linear_only per task. A model that is not hybrid
runs once, as "base". Results go to `out_dir` as JSON, Markdown and PNG plots (`evaluation.report`).

CLI: `hf-hybrid diagnose MODEL [--limit N] [--tasks ...] [--out DIR]` (see `add_diagnose_subparser`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .config import COMPONENT_MODES
from .evaluation.perplexity import DEFAULT_HELD_OUT, corpus_blocks, perplexity_by_position
from .evaluation.probes import DEFAULT_DISTANCES, passkey_probe, prompt_lengths
from .evaluation.report import write_report
from .evaluation.scorer import LoglikelihoodScorer, evaluate_task
from .evaluation.tasks import DEFAULT_TASKS, load_task, task_info
from .loading import cli_load_model, display_name
from .modeling import collect_linear_share, component_mode, iter_hybrid_attention

SOFTMAX_IMPLEMENTATION = "sdpa"


def is_hybrid(model) -> bool:
    return any(True for _ in iter_hybrid_attention(model))


def model_window(model, default: int = 64) -> int:
    hybrid = getattr(model.config, "hybrid", None)
    return int(hybrid["window"]) if isinstance(hybrid, dict) and "window" in hybrid else default


@contextlib.contextmanager
def softmax_view(model) -> Iterator:
    """Run a converted model as its unconverted base: exact softmax attention, hybrid parts unused."""
    before = model.config._attn_implementation
    model.set_attn_implementation(SOFTMAX_IMPLEMENTATION)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def _run_contexts(model, modes: Sequence[str], include_base: bool) -> list[tuple[str, Callable]]:
    if not is_hybrid(model):
        return [("base", contextlib.nullcontext)]
    runs: list[tuple[str, Callable]] = [(m, lambda m=m: component_mode(model, m)) for m in modes]
    if include_base:
        runs.append(("base", lambda: softmax_view(model)))
    return runs


def _headline(tasks: dict, probes: dict) -> dict:
    def gaps(scores: dict) -> dict:
        h = scores.get("hybrid")
        return {f"hybrid_minus_{other}": (h - scores[other]) if h is not None and other in scores else None
                for other in ("swa_only", "linear_only")}

    head = {t: {"metric": task_info(t).primary_metric, **gaps(s)} for t, s in tasks.items()}
    head.update({p: {"metric": "acc", **gaps({k: v for k, v in s.items() if isinstance(v, float)})}
                 for p, s in probes.items()})
    return head if any(v["hybrid_minus_swa_only"] is not None for v in head.values()) else {}


def _display_name(model) -> str:
    name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    if "teacher_cache" in str(name) and "SmolLM2" in str(name):  # the dequantized-teacher cache folder
        from .families import TEACHER_DESCRIPTION

        return TEACHER_DESCRIPTION
    return str(name)


def _check_modes(modes: Sequence[str]) -> None:
    bad = [m for m in modes if m not in COMPONENT_MODES]
    if bad or not modes:
        raise ValueError(f"modes: expected a non-empty subset of {COMPONENT_MODES}, got {list(modes)!r}")


def _held_out_split(model, corpus) -> tuple[float, int]:
    """(val_fraction, seed) of the documents to score perplexity on: those the model's own training
    held out when it was trained on this corpus (config.hybrid['training']['data']), else the
    defaults of `hf-hybrid convert`."""
    record = (getattr(model.config, "hybrid", None) or {}).get("training") or {}
    data = record.get("data") or {}
    if isinstance(corpus, str) and data.get("source") == corpus and "val_fraction" in data:
        return float(data["val_fraction"]), int(data.get("seed", 0))
    return DEFAULT_HELD_OUT


def diagnose(
    model,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    modes: Sequence[str] = COMPONENT_MODES,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    *,
    include_base: bool = True,
    window: int | None = None,
    perplexity_corpus: str | Sequence[str] = "sotu",
    block_size: int = 512,
    perplexity_blocks: int = 4,
    probe_distances: Sequence[int] | None = DEFAULT_DISTANCES,
    probe_items: int = 20,
    batch_size: int = 16,
    model_name: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the diagnostics; returns the results dict (also written to `out_dir` when given).

    window: the w used to split positions for a non-hybrid model (a hybrid uses its own).
    probe_distances: passkey distances in tokens (None or () skips the probe).
    """
    _check_modes(modes)
    for t in tasks:
        task_info(t)
    log = log or (lambda msg: print(f"[diagnose] {msg}", file=sys.stderr, flush=True))
    hybrid = is_hybrid(model)
    w = model_window(model) if hybrid else (window or 64)
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, progress=progress)
    results: dict = {
        "model": model_name or _display_name(model),
        "hybrid": hybrid, "hybrid_config": getattr(model.config, "hybrid", None) if hybrid else None,
        "window": w, "limit": limit, "runs": [], "tasks": {t: {} for t in tasks}, "task_details": {},
        "perplexity": {}, "probes": {}, "prompt_lengths": {}, "timing_s": {},
        "perplexity_corpus": perplexity_corpus if isinstance(perplexity_corpus, str) else "custom documents",
    }
    for t in tasks:
        results["prompt_lengths"][t] = prompt_lengths(tokenizer, load_task(t, limit), w)
    held_out = _held_out_split(model, perplexity_corpus)
    blocks = (corpus_blocks(tokenizer, perplexity_corpus, block_size, perplexity_blocks, held_out=held_out)
              if perplexity_blocks else None)
    if isinstance(perplexity_corpus, str):
        results["perplexity_documents"] = {"held_out_of": perplexity_corpus, "val_fraction": held_out[0],
                                           "seed": held_out[1]}

    for run, ctx in _run_contexts(model, modes, include_base):
        start = time.time()
        log(f"run {run!r}")
        results["runs"].append(run)
        results["task_details"][run] = {}
        with ctx(), torch.no_grad():
            for t in tasks:
                res = evaluate_task(scorer, t, limit)
                results["task_details"][run][t] = res
                results["tasks"][t][run] = res["primary"]
                log(f"  {run:<11} {t:<14} {res['primary_metric']} = {res['primary']:.3f} (n={res['n']})")
            if blocks is not None:
                ppl = perplexity_by_position(model, window=w, blocks=blocks, batch_size=max(1, batch_size // 8))
                results["perplexity"][run] = ppl
                log(f"  {run:<11} perplexity inside {ppl['inside']:.2f} / beyond {ppl['beyond']:.2f}")
            for name, res in (passkey_probe(scorer, probe_distances, probe_items) if probe_distances else {}).items():
                entry = results["probes"].setdefault(name, {"n": res["n"], "distance_tokens": res["distance_tokens"],
                                                            "chance": res["chance"]})
                entry[run] = res["acc"]
                log(f"  {run:<11} {name:<14} acc = {res['acc']:.3f}")
        results["timing_s"][run] = round(time.time() - start, 1)

    if hybrid and blocks is not None and blocks.shape[1] > w:
        with component_mode(model, "hybrid"):
            share = collect_linear_share(model, blocks[:2].to(next(model.parameters()).device))
        results["linear_share"] = share.float().tolist()
        results["linear_share_per_layer"] = share.float().mean(1).tolist()
        results["linear_share_layers"] = [i for i, _ in iter_hybrid_attention(model)]
    results["headline"] = _headline(results["tasks"], results["probes"])
    if out_dir is not None:
        paths = write_report(results, out_dir)
        log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


# --- CLI ------------------------------------------------------------------------------------------


def add_diagnose_subparser(subparsers) -> argparse.ArgumentParser:
    """`hf-hybrid diagnose MODEL ...`; dispatches to `run_diagnose` through `func`."""
    p = subparsers.add_parser("diagnose", help="component diagnostics: task scores per mode, perplexity by "
                              "position, passkey probe, LA-share heatmap",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="'smollm2' (the offline teacher), a directory saved with save_pretrained or a .gguf file")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                   help=f"tasks (default: {' '.join(DEFAULT_TASKS)}; also mmlu_<subject>)")
    p.add_argument("--modes", nargs="+", default=list(COMPONENT_MODES), help="component modes to run")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (per subject for mmlu)")
    p.add_argument("--out", default="runs/diagnose", help="output folder (JSON, Markdown, PNG)")
    p.add_argument("--no-base", action="store_true", help="skip the softmax (unconverted) run of a hybrid model")
    p.add_argument("--window", type=int, default=64, help="position split for a non-hybrid model")
    p.add_argument("--ppl-blocks", type=int, default=4, help="perplexity blocks (0 skips perplexity)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--corpus", default="sotu", choices=["sotu", "austen", "boolq"])
    p.add_argument("--probe-distances", type=int, nargs="*", default=list(DEFAULT_DISTANCES),
                   help="passkey distances in tokens (none: skip the probe)")
    p.add_argument("--probe-items", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-layers", type=int, default=None, help="keep the first N layers (quick runs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.set_defaults(func=run_diagnose)
    return p


def run_diagnose(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit: expected an integer >= 1, got {args.limit}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = cli_load_model(args.model, args.dtype, args.num_layers, device, flag="MODEL")
    name = display_name(args.model)
    try:
        results = diagnose(
            model, tok, tasks=args.tasks, modes=args.modes, limit=args.limit, out_dir=args.out,
            include_base=not args.no_base, window=args.window, perplexity_corpus=args.corpus,
            block_size=args.block_size, perplexity_blocks=args.ppl_blocks,
            probe_distances=args.probe_distances or None, probe_items=args.probe_items,
            batch_size=args.batch_size, model_name=name,
        )
    except ValueError as e:
        raise SystemExit(str(e)) from e
    for task, gaps in results["headline"].items():
        print(f"{task:<16} hybrid - swa_only = {_signed(gaps['hybrid_minus_swa_only'])}   "
              f"hybrid - linear_only = {_signed(gaps['hybrid_minus_linear_only'])}")
    print(f"report: {Path(args.out) / 'diagnostics.md'}")
    return 0


def _signed(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_hybrid_attn.diagnostics MODEL ...` (the same as `hf-hybrid diagnose`)."""
    parser = argparse.ArgumentParser(prog="hf-hybrid")
    sub = parser.add_subparsers(dest="command", required=True)
    add_diagnose_subparser(sub)
    args = parser.parse_args(["diagnose", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
