"""The LA share of the normaliser by query position, for converted checkpoints (issue 13 analysis).

The study's perplexities show every w=64 hybrid beating its window alone at positions the
training sequences had (w..511) and losing to it past them (>= 512). This measures the mechanism
that would explain it: the linear branch's weight in the shared normaliser, alpha phi_q.z / D_i
(SPEC §4), per position bin, in `hybrid` mode, on the same held-out SOTU blocks the study scores
(the documents every conversion held out; 1024 tokens, so positions past the training length 512
are included). z sums every key older than the window, so the share can grow with the position.

    python benchmarks/la_share_by_position.py runs/reproduction/ssd_w64_s0 [more model folders]

Results are merged into benchmarks/results/reproduction/la_share_by_position.{json,md} (one entry
per model folder name; rerunning a model replaces its entry), with the machine named.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "reproduction"
DATA_SEED = 0  # the study's fixed document split (examples/reproduce_paper.py)


def measure(folder: Path, blocks: int, block_size: int, bins: list[int], batch: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_hybrid_attn as hha
    from hf_hybrid_attn.documents import DEFAULT_VAL_FRACTION
    from hf_hybrid_attn.evaluation.perplexity import corpus_blocks

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    from hf_hybrid_attn.modeling import mixers_of

    window = {m.window for _, a in hha.iter_hybrid_attention(model) for m in mixers_of(a)}
    if len(window) != 1:
        raise SystemExit(f"{folder}: expected one window for all converted layers, got {sorted(window)}")
    (w,) = window
    edges = [b for b in bins if b >= w]
    if edges[0] != w:
        edges = [w] + edges
    ids = corpus_blocks(tok, "sotu", block_size, blocks, held_out=(DEFAULT_VAL_FRACTION, DATA_SEED))
    t0 = time.perf_counter()
    with hha.component_mode(model, "hybrid"):
        parts = [hha.collect_linear_share(model, ids[i : i + batch], position_bins=edges + [block_size])
                 for i in range(0, len(ids), batch)]
    share = torch.stack(parts).nanmean(0)  # [layers, H, bins]: each part weights its blocks alike
    per_layer = share.nanmean(1)  # [layers, bins]
    return {
        "model": folder.name, "window": w, "blocks": len(ids), "block_size": block_size,
        "bins": [[a, b] for a, b in zip(edges + [block_size], (edges + [block_size])[1:])],
        "mean": per_layer.mean(0).tolist(), "layer_min": per_layer.min(0).values.tolist(),
        "layer_max": per_layer.max(0).values.tolist(), "per_layer": per_layer.tolist(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def render(res: dict) -> str:
    lines = ["# LA share of the normaliser by query position (`hybrid` mode, held-out SOTU)", "",
             f"- machine: **{res['machine']}**; torch {res['torch']}",
             "- command: `python benchmarks/la_share_by_position.py <model folders>`; the mean over the converted "
             "layers and heads of alpha phi_q.z / D_i (SPEC §4) over the valid queries of each position bin; "
             "min / max: over layers (each layer averaged over its heads)",
             "- training sequences were 512 tokens long: bins from 512 on hold more keys in z than any "
             "training position did", ""]
    for name, r in sorted(res["models"].items()):
        lines += [f"## {name} (w = {r['window']}, {r['blocks']} blocks of {r['block_size']})", "",
                  "| positions | mean | layer min | layer max |", "|---|---|---|---|"]
        for (a, b), m, lo, hi in zip(r["bins"], r["mean"], r["layer_min"], r["layer_max"]):
            lines.append(f"| {a}..{b - 1} | {m:.3f} | {lo:.3f} | {hi:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="converted model folders (save_pretrained output)")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--bins", type=int, nargs="+", default=[64, 128, 256, 384, 512, 640, 768, 896])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    for folder in args.models:
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder}: not a model folder (no config.json)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_generate import machine_name

    path = args.out / "la_share_by_position.json"
    res = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    res.update(machine=machine_name(torch.device("cpu")), torch=torch.__version__, python=platform.python_version())
    for folder in args.models:
        r = measure(folder, args.blocks, args.block_size, args.bins, args.batch)
        res["models"][r["model"]] = r
        print(f"[{r['model']}] " + ", ".join(f"{a}..{b - 1}: {m:.3f}" for (a, b), m in zip(r["bins"], r["mean"])),
              flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "la_share_by_position.md").write_text(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
