"""Render diagnostics results (the dict `diagnose` returns) as JSON, Markdown and PNG plots.

    write_report(results, "runs/diag")   # diagnostics.json, diagnostics.md, la_share.png,
                                         # modes.png, perplexity_by_position.png
Everything is rendered from the JSON-able dict alone, so `render_markdown(json.load(...))` redraws a
report from a saved run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RUN_ORDER = ("base", "hybrid", "swa_only", "linear_only", "sinks_only", "none")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _delta(value) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _runs(results: dict) -> list[str]:
    return [r for r in RUN_ORDER if r in results.get("runs", [])]


def render_markdown(results: dict, images: dict[str, str] | None = None) -> str:
    runs = _runs(results)
    lines = [f"# Component diagnostics: {results.get('model', 'model')}", ""]
    desc = [f"window w = {results.get('window')}"]
    if results.get("limit") is not None:
        desc.append(f"first {results['limit']} items per task (per subject for MMLU)")
    else:
        desc.append("full evaluation splits")
    lines += ["- " + "; ".join(desc), f"- runs: {', '.join(f'`{r}`' for r in runs)}"
              + (" (`base` = the same weights with exact softmax attention)" if "base" in runs else ""), ""]

    if results.get("headline"):
        lines += ["## Headline: is the linear branch used?", "",
                  "A `hybrid` − `swa_only` gap near zero means the linear branch is bypassed (the paper's key number).", ""]
        header = ["task", "metric", *runs, "hybrid − swa_only", "hybrid − linear_only"]
        rows = []
        for task, h in results["headline"].items():
            scores = results["tasks"].get(task, {}) if task in results.get("tasks", {}) else results["probes"].get(task, {})
            rows.append([task, h.get("metric", ""), *(_fmt(scores.get(r)) for r in runs),
                         _delta(h.get("hybrid_minus_swa_only")), _delta(h.get("hybrid_minus_linear_only"))])
        lines += _table(header, rows) + [""]

    if results.get("task_details"):
        lines += ["## Task scores per run", ""]
        tasks = list(results.get("tasks", {}))
        header = ["run", *(f"{t} ({results['task_details'][runs[0]][t]['primary_metric']}, n={results['task_details'][runs[0]][t]['n']})"
                           for t in tasks)]
        rows = [[f"`{r}`", *(_fmt(results["task_details"][r][t]["primary"]) for t in tasks)] for r in runs]
        lines += _table(header, rows) + [""]
        full = []
        for r in runs:
            for t in tasks:
                d = results["task_details"][r][t]
                full.append([f"`{r}`", t, str(d["n"]), _fmt(d.get("acc")), _fmt(d.get("acc_stderr")),
                             _fmt(d.get("acc_norm")), _fmt(d.get("acc_norm_stderr")), _fmt(d.get("acc_norm_cont"))])
        lines += ["<details><summary>all metrics</summary>", "",
                  *_table(["run", "task", "n", "acc", "± stderr", "acc_norm", "± stderr", "acc_norm_cont"], full),
                  "", "acc_norm: lm-eval's (per character of the choice); acc_norm_cont: per byte of the continuation "
                  "including its leading space.", "", "</details>", ""]

    if results.get("perplexity"):
        p0 = next(iter(results["perplexity"].values()))
        lines += ["## Perplexity by position", "",
                  f"{results.get('perplexity_corpus', '')}: {p0['blocks']} blocks × {p0['block_size']} tokens. "
                  f"*inside* = query positions < w (the window holds the whole prefix), *beyond* = positions ≥ w.", ""]
        rows = [[f"`{r}`", _fmt(results["perplexity"][r]["inside"], 2), _fmt(results["perplexity"][r]["beyond"], 2),
                 _fmt(results["perplexity"][r]["all"], 2)] for r in runs if r in results["perplexity"]]
        lines += _table(["run", "inside", "beyond", "all"], rows) + [""]

    if results.get("probes"):
        lines += ["## Long-context probe: passkey retrieval", "",
                  "Key stated once, then filler; the key is chosen among 5 candidates by log-likelihood (chance 0.2).", ""]
        header = ["probe", "key distance (tokens)", "n", *runs]
        rows = [[name, str(v.get("distance_tokens", "")), str(v.get("n", "")), *(_fmt(v.get(r)) for r in runs)]
                for name, v in results["probes"].items()]
        lines += _table(header, rows) + [""]

    if results.get("prompt_lengths"):
        lines += ["## Prompt lengths vs the window", "",
                  "Tokens the model reads per request (longest choice of each document).", ""]
        rows = [[t, str(s["n"]), str(s["min"]), _fmt(float(s["median"]), 1), str(s["p90"]), str(s["max"]),
                 f"{100 * s['fraction_longer_than_window']:.0f}%"] for t, s in results["prompt_lengths"].items()]
        lines += _table(["task", "n", "min", "median", "p90", "max", f"> w={results.get('window')}"], rows) + [""]

    if results.get("linear_share"):
        per_layer = results["linear_share_per_layer"]
        lines += ["## LA share of the normaliser", "",
                  "Per layer and head, the mean over query positions ≥ w of α φq·z / D (hybrid mode): the "
                  "attention mass the linear branch carries.", "",
                  *_table(["layer", *(str(i) for i in results["linear_share_layers"])],
                          [["mean over heads", *(f"{x:.3f}" for x in per_layer)]]), ""]
    for title, path in (images or {}).items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def _plot_share(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    share = results["linear_share"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(share[0]), 1.0 + 0.3 * len(share)))
    im = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(share)), [str(i) for i in results["linear_share_layers"]])
    ax.set_xticks(range(len(share[0])))
    ax.set_title("LA share of the normaliser (positions ≥ w)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_modes(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = _runs(results)
    items = [(t, results["tasks"][t]) for t in results.get("tasks", {})]
    items += [(p, v) for p, v in results.get("probes", {}).items()]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(items)), 4.6))
    width = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(items))]
        ax.bar(xs, [v.get(run) or 0.0 for _, v in items], width, label=run)
    ax.set_xticks(range(len(items)), [name for name, _ in items], rotation=20, ha="right")
    ax.set_ylabel("accuracy (primary metric)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=min(len(runs), 6), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    ax.set_title("Scores per component mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_perplexity(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for run in _runs(results):
        if run in results["perplexity"]:
            curve = results["perplexity"][run]["curve"]
            ax.plot([(c["start"] + c["end"]) / 2 for c in curve], [c["ppl"] for c in curve], marker="o", label=run)
    ax.axvline(results.get("window", 0), color="grey", linestyle="--", label="window w")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("query position (bin centre)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.set_title("Perplexity by position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write diagnostics.json, diagnostics.md and the plots into `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or the GPU machine
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"json": out / "diagnostics.json"}
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=True))
    images = {}
    if results.get("linear_share"):
        paths["la_share"] = out / "la_share.png"
        _plot_share(results, paths["la_share"])
        images["LA share per layer and head"] = paths["la_share"].name
    if results.get("tasks") or results.get("probes"):
        paths["modes"] = out / "modes.png"
        _plot_modes(results, paths["modes"])
        images["scores per component mode"] = paths["modes"].name
    if results.get("perplexity"):
        paths["perplexity"] = out / "perplexity_by_position.png"
        _plot_perplexity(results, paths["perplexity"])
        images["perplexity by position"] = paths["perplexity"].name
    paths["markdown"] = out / "diagnostics.md"
    paths["markdown"].write_text(render_markdown(results, images))
    return paths
