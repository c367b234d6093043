"""One layer's attention in a decode step, eager, on the real teacher's shapes: the hybrid layer
(ring cache, `hybrid_linear_swa`) against the teacher's (SDPA, transformers' DynamicCache).

    python benchmarks/bench_decode_step.py   # -> benchmarks/results/decode_step_<device>_<machine>.{json,md}

What it times is the attention module of decoder layer 0 as generate() calls it for one new token:
q/k/v/o projections, RoPE, the cache update and the attention itself. For the teacher the cache
holds T tokens (cropped back to T before every timed round, so the context stays within T..T+n);
the hybrid's cost does not depend on T. Both run interleaved, round by round, so they see the same
machine load; each figure is the minimum over rounds of the mean time per call (µs), with the
median beside it.

It also counts the top-level ATen ops of one call with torch.profiler, split into compute ops and
views (view, reshape, slicing, transposes, no-op casts): on CPU an eager decode step of a small
model is bound by dispatch, a few µs per op whatever its size, so the op count is what the
hybrid's eager step costs beyond the teacher's (see README, "compiled decoding"). `--smoke` runs
tiny sizes on the teacher's shapes (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg  # noqa: E402  (machine naming)

VIEW_OPS = {"view", "reshape", "_reshape_alias", "_unsafe_view", "narrow", "slice", "select", "unsqueeze", "squeeze",
            "expand", "unflatten", "flatten", "transpose", "t", "permute", "as_strided", "to", "contiguous",
            "alias", "detach", "lift_fresh"}


def attention_modules():
    """(teacher layer-0 attention, hybrid layer-0 attention, rotary embedding, config, hybrid config)."""
    import copy

    import hf_hybrid_attn as hha
    from hf_hybrid_attn.assets import load_teacher

    teacher, _ = load_teacher(dtype=torch.float32)
    teacher.eval()
    hybrid = hha.convert(copy.deepcopy(teacher), hha.HybridConfig(window=64))
    hybrid.eval()
    return (teacher.model.layers[0].self_attn, hybrid.model.layers[0].self_attn, teacher.model.rotary_emb,
            teacher.config, hybrid.config)


def make_step(attn, cache, rotary, hidden: int, context: int, batch: int, step_mask=None):
    """A callable running attn for one new token at position `context` with `cache`, after a prefill
    of `context` tokens into it. step_mask: the mask generate() passes the layer for that token (the
    teacher's SDPA gets None without padding; the hybrid gets its key padding [B, 1])."""
    from hf_hybrid_attn import compat

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, context, hidden, generator=g) * 0.5
    pos = torch.arange(context)[None].expand(batch, -1)
    kw = compat.cache_kwargs(cache, attn)
    with torch.no_grad():
        attn(x, position_embeddings=rotary(x, pos), attention_mask=None, **kw)
    x1 = torch.randn(batch, 1, hidden, generator=g) * 0.5
    pe1 = rotary(x1, torch.full((batch, 1), context))

    def step():
        return attn(x1, position_embeddings=pe1, attention_mask=step_mask, **kw)
    return step


def count_ops(fn) -> dict:
    with torch.no_grad(), torch.profiler.profile() as prof:
        fn()
    names = [e.name.removeprefix("aten::") for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    compute = [n for n in names if n not in VIEW_OPS]
    return {"compute_ops": len(compute), "view_ops": len(names) - len(compute), "compute_op_names": compute}


def time_rounds(fns: dict, calls: int, rounds: int, before_round=None) -> dict:
    """Interleaved: per round, each fn `calls` times; {name: [mean µs per call of each round]}."""
    out = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            for _ in range(min(calls, 20)):
                f()
        for _ in range(rounds):
            for name, f in fns.items():
                if before_round is not None:
                    before_round(name)
                t = time.perf_counter()
                for _ in range(calls):
                    f()
                out[name].append((time.perf_counter() - t) / calls * 1e6)
    return out


def render_md(res: dict) -> str:
    lines = [f"# Decode step, one layer's attention, eager: {res['model']}", "",
             f"- machine: **{res['machine']}**; torch {res['versions']['torch']}, transformers "
             f"{res['versions']['transformers']}; fp32, B={res['batch']}, {res['threads']} threads",
             f"- each figure: the minimum over {res['rounds']} interleaved rounds of the mean of {res['calls']} calls "
             "(median of the rounds in brackets); the teacher's cache is cropped back to T before each round",
             "- ops: top-level ATen ops of one call (torch.profiler), compute ops + views "
             "(view/reshape/slicing/transposes/no-op casts)", "",
             "| T | teacher µs/layer | hybrid µs/layer | hybrid / teacher time | teacher ops | hybrid ops |",
             "|---|---|---|---|---|---|"]
    for p in res["points"]:
        t, h = p["teacher_us"], p["hybrid_us"]
        lines.append(f"| {p['context']} | {t['min']:.1f} ({t['median']:.1f}) | {h['min']:.1f} ({h['median']:.1f}) "
                     f"| {h['min'] / t['min']:.2f}x | {p['teacher_ops']['compute_ops']} + {p['teacher_ops']['view_ops']} "
                     f"| {p['hybrid_ops']['compute_ops']} + {p['hybrid_ops']['view_ops']} |")
    p0 = res["points"][0]
    lines += ["", f"Hybrid compute ops of one call: `{' '.join(p0['hybrid_ops']['compute_op_names'])}`", "",
              f"Teacher compute ops of one call: `{' '.join(p0['teacher_ops']['compute_op_names'])}`", "",
              f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="CI: --context 16 40 --calls 5 --rounds 2")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.context, args.calls, args.rounds = [16, 40], 5, 2
    for name in ("batch", "calls", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.context) < 1:
        ap.error(f"--context must be >= 1, got {args.context}")

    import transformers
    from transformers import DynamicCache

    from hf_hybrid_attn.cache import HybridCache

    t_attn, h_attn, rotary, t_cfg, h_cfg = attention_modules()
    hidden = t_cfg.hidden_size
    points = []
    for T in args.context:
        t_cache, h_cache = DynamicCache(config=t_cfg), HybridCache(h_cfg)
        fns = {"teacher": make_step(t_attn, t_cache, rotary, hidden, T, args.batch),
               "hybrid": make_step(h_attn, h_cache, rotary, hidden, T, args.batch,
                                   step_mask=torch.ones(args.batch, 1, dtype=torch.bool))}
        with torch.no_grad():  # both layers work: a finite output
            for f in fns.values():
                y = f()[0]
                if not bool(torch.isfinite(y).all()):
                    raise RuntimeError("a decode step returned non-finite values")
        ops = {k: count_ops(f) for k, f in fns.items()}

        def crop(name, T=T, t_cache=t_cache):
            extra = t_cache.get_seq_length() - T
            if name == "teacher" and extra > 0:
                t_cache.crop(-extra)  # a negative count removes tokens (transformers 5.17 .. newest)
        times = time_rounds(fns, args.calls, args.rounds, before_round=crop)
        points.append({"context": T,
                       **{f"{k}_us": {"min": min(v), "median": statistics.median(v), "rounds": v} for k, v in times.items()},
                       **{f"{k}_ops": ops[k] for k in fns}})
        print(f"T={T}: teacher {min(times['teacher']):.1f} us, hybrid {min(times['hybrid']):.1f} us; ops "
              f"{ops['teacher']['compute_ops']}+{ops['teacher']['view_ops']} vs "
              f"{ops['hybrid']['compute_ops']}+{ops['hybrid']['view_ops']}", flush=True)
    device = torch.device("cpu")
    res = {"model": "SmolLM2-135M-Instruct layer 0 (teacher: sdpa + DynamicCache; hybrid: w=64, hedgehog F=64, "
                    "HybridCache)",
           "machine": bg.machine_name(device), "threads": torch.get_num_threads(), "batch": args.batch,
           "calls": args.calls, "rounds": args.rounds, "load_average_1min": os.getloadavg()[0],
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "command": "python benchmarks/bench_decode_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "points": points}
    stem = f"decode_step_cpu_{bg.slug(res['machine'])}" + ("_smoke" if args.smoke else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(render_md(res))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
