"""Scorer cost with and without `share_context` (contexts read once with the cache) on the real
SmolLM2 teacher converted to the hybrid (w=64), alternating the two so both see the same load.

    python benchmarks/bench_scorer.py   # -> benchmarks/results/scorer_share_context_cpu.{json,md}
"""

import json
import os
import time
from pathlib import Path

import torch

import hf_hybrid_attn as hha
from hf_hybrid_attn.assets import load_teacher
from hf_hybrid_attn.evaluation import probes, tasks
from hf_hybrid_attn.evaluation.scorer import LoglikelihoodScorer

OUT = Path(__file__).resolve().parent / "results" / "scorer_share_context_cpu"


def main() -> None:
    model, tok = load_teacher(dtype=torch.float32)
    hha.convert(model, hha.HybridConfig(window=64))
    model.eval()
    sets = {"passkey@256 (4 items x 5 choices)": [r for d in probes.passkey_docs(tok, 256, n_items=4) for r in d.requests],
            "hellaswag (12 items x 4)": [r for d in tasks.load_task("hellaswag", limit=12) for r in d.requests],
            "arc_easy (16 items x ~4)": [r for d in tasks.load_task("arc_easy", limit=16) for r in d.requests]}
    res = {}
    for name, reqs in sets.items():
        times, lls, tokens = {False: [], True: []}, {}, {}
        for share in (False, True, False, True):
            s = LoglikelihoodScorer(model, tok, batch_size=16, progress=False, share_context=share)
            t = time.perf_counter()
            lls[share] = [x for x, _ in s.loglikelihood(reqs)]
            times[share].append(time.perf_counter() - t)
            tokens[share] = s.stats["tokens"]
        res[name] = {"plain_s": min(times[False]), "shared_s": min(times[True]),
                     "speedup": min(times[False]) / min(times[True]),
                     "tokens_plain": tokens[False], "tokens_shared": tokens[True],
                     "max_abs_ll_diff": max(abs(a - b) for a, b in zip(lls[True], lls[False]))}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "cpu")
    meta = {"machine": f"{cpu}, {os.cpu_count()} cores", "load_average_1min": os.getloadavg()[0],
            "model": "SmolLM2-135M converted (untrained), hybrid mode, w=64, fp32", "results": res}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    lines = ["# Scorer: contexts read once (share_context) vs one full forward per request", "",
             f"Machine: {meta['machine']}, 1-min load {meta['load_average_1min']:.1f} (shared; the two ways alternate). "
             f"{meta['model']}. Best of 2 each.", "",
             "| requests | plain s | shared s | speed-up | tokens plain / shared | max abs log-lik diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['plain_s']:.2f} | {v['shared_s']:.2f} | {v['speedup']:.2f}x | {v['tokens_plain']} / "
              f"{v['tokens_shared']} | {v['max_abs_ll_diff']:.1e} |" for k, v in res.items()]
    lines += ["", "Command: `python benchmarks/bench_scorer.py`", ""]
    OUT.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
