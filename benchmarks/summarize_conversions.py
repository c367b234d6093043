"""Summarise conversion runs (training logs + component diagnostics) into one Markdown table.

    python benchmarks/summarize_conversions.py benchmarks/results/cpu_smollm2 > benchmarks/results/cpu_smollm2/SUMMARY.md

Reads, in DIR, every `<recipe>.json` written by `hf-hybrid convert` (its training_log.json) and, when
present, `diag_<recipe>/diagnostics.json` written by `hf-hybrid diagnose`. Prints per recipe: tokens,
wall time, tokens/s and peak memory per stage, the stage-1/2 validation losses, the validation loss
per component mode, which kernels ran, and the diagnostics side by side (task scores, perplexity
inside/beyond the window, passkey accuracy, mean LA share, headline gaps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def training_rows(logs: dict[str, dict]) -> list[str]:
    out = ["| recipe | stage | steps | tokens | val loss (start → end) | tokens/s | wall s | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|"]
    for recipe, log in logs.items():
        for stage, s in log["stages"].items():
            out.append(f"| {recipe} | {stage} | {s.get('steps_done')} | {s.get('tokens')} | "
                       f"{_f(s.get('initial_val_loss'))} → {_f(s.get('final_val_loss'))} | {_f(s.get('tokens_per_s'), 0)} | "
                       f"{_f(s.get('wall_s'), 0)} | {_f(s.get('peak_rss_mb'), 0)} |")
    out += ["", "| recipe | next-token val loss: hybrid | swa_only | linear_only | kernels |", "|---|---|---|---|---|"]
    for recipe, log in logs.items():
        m = log.get("val_loss_by_mode") or {}
        kernels = "; ".join(f"{k}: {v}" for k, v in (log.get("kernels") or {}).items()) or "(not recorded)"
        out.append(f"| {recipe} | {_f(m.get('hybrid'))} | {_f(m.get('swa_only'))} | {_f(m.get('linear_only'))} | {kernels} |")
    return out


def diagnostics_rows(diags: dict[str, dict]) -> list[str]:
    out = []
    for recipe, d in diags.items():
        runs = d["runs"]
        out += [f"### {recipe}: {d['model']} (window {d['window']}, limit {d['limit']})", "",
                "| | " + " | ".join(f"`{r}`" for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for task, by_run in d["tasks"].items():
            out.append(f"| {task} | " + " | ".join(_f(by_run.get(r)) for r in runs) + " |")
        for where in ("inside", "beyond"):
            out.append(f"| ppl {where} w | " + " | ".join(_f((d['perplexity'].get(r) or {}).get(where), 2) for r in runs) + " |")
        for probe, res in d.get("probes", {}).items():
            out.append(f"| {probe} (n={res['n']}) | " + " | ".join(_f(res.get(r), 2) for r in runs) + " |")
        share = d.get("linear_share_per_layer") or []
        if share:
            out.append(f"\nMean LA share of the normaliser (hybrid): {sum(share) / len(share):.3f} "
                       f"(per layer {min(share):.2f}–{max(share):.2f}).")
        out += ["", "| headline | metric | hybrid − swa_only | hybrid − linear_only |", "|---|---|---|---|"]
        for task, h in d.get("headline", {}).items():
            out.append(f"| {task} | {h['metric']} | {h['hybrid_minus_swa_only']:+.3f} | {h['hybrid_minus_linear_only']:+.3f} |")
        out.append("")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    logs = {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))
            if "stages" in json.loads(p.read_text())}
    diags = {p.parent.name.removeprefix("diag_"): json.loads(p.read_text())
             for p in sorted(root.glob("diag_*/diagnostics.json"))}
    lines = ["## Training", ""] + training_rows(logs) + ["", "## Component diagnostics", ""] + diagnostics_rows(diags)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
