"""Stage-1 (attention transfer) step time on the real SmolLM2 teacher, this checkout against an
earlier commit's `attn_ce_loss`, interleaved in one process so that both see the same machine load.

    python benchmarks/bench_stage1_step.py --before-ref 6e44e1e --out benchmarks/results/stage1_step_cpu.json

One step = one teacher forward over a [1, seq] block with every converted layer's stage-1 loss
(`attn_ce`, the objective of hedgecats / linear_only / ssd) computed and back-propagated, as
`train_attention_transfer` does it. Writes JSON and Markdown with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import hf_hybrid_attn as hha
import hf_hybrid_attn.training.transfer as tr
from hf_hybrid_attn.assets import load_teacher
from hf_hybrid_attn.modeling import iter_hybrid_attention

ROOT = Path(__file__).resolve().parents[1]


def _old_attn_ce(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:hf_hybrid_attn/training/objectives.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    src = src.replace("from ..kernels import", "from hf_hybrid_attn.kernels import")
    ns: dict = {}
    exec(compile(src, f"{ref}:objectives.py", "exec"), ns)
    return ns["attn_ce_loss"]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-ref", required=True, help="git commit whose attn_ce_loss is the baseline")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage1_step_cpu.json"))
    args = ap.parse_args()
    impl = {f"before ({args.before_ref})": _old_attn_ce(args.before_ref), "after (this checkout)": tr.attn_ce_loss}
    model, _ = load_teacher(dtype=torch.float32)
    model = hha.convert(model, window=64, feature_dim=64)
    layers = list(iter_hybrid_attention(model))
    hook = tr.TransferHook({"attn_ce": 1.0}, 256, last_layer=max(i for i, _ in layers))
    hook.backward_scale = 1.0 / len(layers)
    ids = torch.randint(0, 49000, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in impl}
    grads = {}
    with tr._hooks_installed(layers, hook):
        for rep in range(args.reps + 1):  # the first round warms up
            for name, fn in impl.items():
                tr.attn_ce_loss = fn
                model.zero_grad(set_to_none=True)
                t = time.perf_counter()
                tr._run(model, hook, ids)
                dt = time.perf_counter() - t
                if rep:
                    times[name].append(dt)
                grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    a, b = grads.values()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    load = os.getloadavg()[0]
    res = {"machine": f"{_cpu()}, {os.cpu_count()} cores", "load_average_1min": load, "torch": torch.__version__,
           "seq_len": args.seq_len, "objective": "attn_ce", "step_s": times, "step_s_median": med,
           "tokens_per_s": {k: args.seq_len / v for k, v in med.items()},
           "speedup": list(med.values())[0] / list(med.values())[1],
           "grad_max_abs_diff": float((a - b).abs().max()), "grad_max_abs": float(a.abs().max())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    lines = [f"# Stage-1 step, SmolLM2-135M teacher, seq {args.seq_len}, attn_ce", "",
             f"Machine: {res['machine']} (1-min load average {load:.1f} at the end: other jobs shared it, so the "
             "two columns were interleaved step by step to see the same load).", "",
             "| attn_ce_loss | median step (s) | tokens/s |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.2f} | {res['tokens_per_s'][k]:.0f} |" for k in impl]
    lines += ["", f"Speed-up {res['speedup']:.2f}x; gradients of the trained parameters differ by at most "
              f"{res['grad_max_abs_diff']:.1e} (largest gradient {res['grad_max_abs']:.1e}).", "",
              f"Command: `python benchmarks/bench_stage1_step.py --before-ref {args.before_ref}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
