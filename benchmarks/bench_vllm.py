"""Throughput and memory of the hybrid SmolLM2 vs its teacher, served by the same vLLM, side by side.

Run with the vLLM venv's python (scripts/setup_vllm_env.sh):
    .venv-vllm/bin/python benchmarks/bench_vllm.py [--hybrid DIR --teacher DIR] [--contexts 1024,4096]
        [--requests 8] [--new-tokens 32]
Defaults: the converted SmolLM2-135M-Instruct (Q4_1, dequantized; untrained conversion, w = 64) and its
teacher as scripts/run_vllm_tests.sh builds them (.venv-vllm/cache/models-*/); on CPU contexts 1k / 4k
with 8 concurrent requests, on CUDA 1k / 8k / 32k with 16. Each model runs in its own process (one
vLLM engine, fp32, eager, chunked prefill), contexts in turn; per context the requests are submitted
together twice, each time with fresh random prompts and prefix caching off in both engines (a
recurrent state cannot be prefix-cached, and the teacher must not reuse KV across the timed calls):
with 1 new token (prefill) and with --new-tokens (prefill + decode). Reported:
generated tokens/s end to end, decode tokens/s and ms per engine step (the prefill + decode call is
driven step by step through the engine: the tokens generated after every request has its first
token, over the time that took), prefill tokens/s, the cache the batch needs as vLLM sizes it (teacher: paged KV for
context + new tokens; hybrid: its fixed state), and the process's peak RSS.
Writes benchmarks/results/vllm_<machine>.json and .md. The CPU time other processes used during the
run (the machine's busy time less this benchmark's own engines', from /proc/stat and rusage) is
recorded: on a machine shared with other jobs the numbers are lower and noisier than they would be alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


def _default_models() -> tuple[str | None, str | None]:
    found = sorted(glob.glob(os.path.join(ROOT, ".venv-vllm", "cache", "models-*")), key=os.path.getmtime)
    if not found:
        return None, None
    return os.path.join(found[-1], "smollm2_hybrid"), os.path.join(found[-1], "smollm2_teacher")


def run_one(model: str, contexts: list[int], requests: int, new_tokens: int, out: str) -> None:
    """Child process: one engine, every context; writes a JSON list to `out`."""
    import random

    import torch
    from vllm import LLM, SamplingParams

    max_len = max(contexts) + new_tokens
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=max_len,
              max_num_seqs=requests, max_num_batched_tokens=2048, seed=0,
              enable_prefix_caching=False)  # the teacher would otherwise reuse the KV of repeated prompts

    hf = llm.llm_engine.model_config.hf_config
    vocab = hf.vocab_size
    rng = random.Random(0)
    state_per_seq = None
    if getattr(hf, "hybrid", None):
        from hf_hybrid_attn.serving.vllm import state_bytes_per_sequence

        state_per_seq = state_bytes_per_sequence(llm)
    kv_per_token = 2 * hf.num_key_value_heads * (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads) \
        * 4 * hf.num_hidden_layers

    def greedy(n):  # exactly n new tokens per request
        return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)

    def timed(prompts, n):
        sp = greedy(n)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt

    ids = iter(range(1 << 30))

    def stepped(prompts, n):
        """The same generation driven step by step through the engine: (total s, s until every request
        has its first token, decode tokens/s and median ms per step after that point)."""
        eng = llm.llm_engine
        sp = greedy(n)
        for p in prompts:
            eng.add_request(f"bench-{next(ids)}", {"prompt_token_ids": p}, sp)
        counts, first_all, steps, t0 = {}, None, [], time.perf_counter()
        while eng.has_unfinished_requests():
            ts = time.perf_counter()
            outs = eng.step()
            te = time.perf_counter()
            before = sum(counts.values())
            for o in outs:
                counts[o.request_id] = len(o.outputs[0].token_ids)
            if first_all is None:
                if len(counts) == len(prompts) and min(counts.values()) >= 1:
                    first_all, decoded_at_first = te, sum(counts.values())
            elif sum(counts.values()) > before:
                steps.append(te - ts)
        total = time.perf_counter() - t0
        assert len(counts) == len(prompts) and all(c == n for c in counts.values()), counts
        decoded = sum(counts.values()) - decoded_at_first
        tps = decoded / (t0 + total - first_all) if decoded and total > first_all - t0 else None
        return total, first_all - t0, tps, (statistics.median(steps) * 1000 if steps else None)

    rows = []
    timed([[rng.randrange(vocab) for _ in range(64)] for _ in range(requests)], 4)  # warm-up
    for ctx in contexts:
        def fresh(ctx=ctx):  # new random prompts for every timed call: nothing reusable across calls
            return [[rng.randrange(vocab) for _ in range(ctx)] for _ in range(requests)]

        timed(fresh()[:1], 1)  # warm-up at this length (one request: the same 2048-token chunk shapes)
        t1 = timed(fresh(), 1)
        tn, first_all, decode_tps, step_ms = stepped(fresh(), new_tokens)
        cache = state_per_seq * requests if state_per_seq is not None else kv_per_token * (ctx + new_tokens) * requests
        rows.append({
            "context": ctx, "requests": requests, "new_tokens": new_tokens,
            "prefill_s": round(t1, 3), "total_s": round(tn, 3),
            "generated_tok_per_s": round(requests * new_tokens / tn, 2),
            # decode: the steps after every request has its first token (prefills done), timed one by one
            "all_first_tokens_s": round(first_all, 3),
            "decode_tok_per_s": round(decode_tps, 2) if decode_tps else None,
            "decode_ms_per_step": round(step_ms, 2) if step_ms else None,
            "prefill_tok_per_s": round(requests * ctx / t1, 1),
            "cache_bytes_batch": int(cache),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        })
        print(f"[bench-vllm] {os.path.basename(model)} ctx {ctx}: {rows[-1]}", flush=True)
    with open(out, "w") as f:
        json.dump({"model": model, "torch": torch.__version__, "state_bytes_per_seq": state_per_seq,
                   "kv_bytes_per_token": kv_per_token, "rows": rows}, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    hyb, tea = _default_models()
    p.add_argument("--hybrid", default=hyb, help="converted checkpoint folder (default: the vLLM tests' SmolLM2 build)")
    p.add_argument("--teacher", default=tea, help="teacher checkpoint folder")
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (CPU 1024,4096; CUDA 1024,8192,32768)")
    p.add_argument("--requests", type=int, default=None, help="concurrent requests (CPU 8, CUDA 16)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--kv-space-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE for each engine (CPU)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--suffix", default="", help="appended to the results' file name, e.g. _11k for an extra point")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not all(c.isalnum() or c in "_-." for c in a.suffix):
        p.error(f"--suffix: expected letters, digits, '_', '-' or '.', got {a.suffix!r}")
    import torch

    cuda = torch.cuda.is_available()
    contexts = [int(x) for x in (a.contexts or ("1024,8192,32768" if cuda else "1024,4096")).split(",")]
    requests = a.requests or (16 if cuda else 8)
    if a._child:
        run_one(a._child[0], contexts, requests, a.new_tokens, a._child[1])
        return 0
    for name, path in (("--hybrid", a.hybrid), ("--teacher", a.teacher)):
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"{name}: expected a checkpoint folder with config.json, got {path!r} "
                             "(run scripts/run_vllm_tests.sh once to build the default ones)")
    os.makedirs(a.out_dir, exist_ok=True)  # the engines' children write their records there
    machine = machine_name()
    load_before = os.getloadavg()
    busy0, own0, t0 = _busy_cpu_s(), _children_cpu_s(), time.time()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(a.kv_space_gib),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    results = {}
    for label, path in (("teacher", a.teacher), ("hybrid", a.hybrid)):
        out = os.path.join(a.out_dir, f".bench_vllm_{label}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--contexts", ",".join(map(str, contexts)),
               "--requests", str(requests), "--new-tokens", str(a.new_tokens), "--_child", path, out]
        t = time.time()
        r = subprocess.run(cmd, env=env)
        if r.returncode != 0:
            raise SystemExit(f"[bench-vllm] the {label} engine failed (exit {r.returncode})")
        with open(out) as f:
            results[label] = json.load(f)
        os.remove(out)
        results[label]["wall_s"] = round(time.time() - t, 1)
    load_after = os.getloadavg()
    other_cores = None if busy0 is None else max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - own0)) / (time.time() - t0)
    import vllm

    res = {"machine": machine, "device": "cuda" if cuda else "cpu", "vllm": vllm.__version__,
           "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
           "other_jobs_cores": None if other_cores is None else round(other_cores, 2),
           # the engines' own load is excluded: shared when other jobs took a quarter of a core on average
           "shared_machine": load_before[0] > 1.0 if other_cores is None else other_cores > 0.25,
           "dtype": "float32", "enforce_eager": True, "contexts": contexts, "requests": requests,
           "new_tokens": a.new_tokens, "models": {k: os.path.basename(v["model"]) for k, v in results.items()},
           "kv_space_gib": None if cuda else a.kv_space_gib,
           "teacher_max_position_embeddings": _max_positions(a.teacher),
           "teacher": results["teacher"], "hybrid": results["hybrid"]}
    stem = os.path.join(a.out_dir, f"vllm_{slug(machine)}{a.suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(render(res))
    print(render(res))
    return 0


def _max_positions(checkpoint: str) -> int | None:
    """max_position_embeddings of a checkpoint's config.json (None if it has none): vLLM refuses a
    max_model_len above it unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("max_position_embeddings", cfg.get("text_config", {}).get("max_position_embeddings"))


def _where_teacher_stops(res: dict) -> str:
    """The largest context the teacher serves with these settings: the smaller of what its paged KV
    cache holds for `requests` sequences and its position limit (each minus the new tokens)."""
    t, h, n, new = res["teacher"], res["hybrid"], res["requests"], res["new_tokens"]
    space = res["kv_space_gib"] * 2**30
    kv_fit = int(space // (n * t["kv_bytes_per_token"])) - new
    limits = [(kv_fit, f"its paged KV cache in {res['kv_space_gib']} GiB (VLLM_CPU_KVCACHE_SPACE) holds {kv_fit} "
                       f"tokens each for {n} concurrent requests, as vLLM sizes it")]
    max_pos = res.get("teacher_max_position_embeddings")
    if max_pos:
        limits.append((max_pos - new, f"its max_position_embeddings is {max_pos} (vLLM refuses a longer "
                                      "max_model_len unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)"))
    stop, why = min(limits)
    other = "; ".join(w for c, w in limits if w != why)
    return (f"- where the teacher stops: contexts up to {stop} tokens each (+{new} new), because {why}"
            + (f"; the other limit: {other}" if other else "") + f". The hybrid's {n} states take "
            f"{n * h['state_bytes_per_seq'] / 2**20:.0f} MiB at any context, so the same KV space holds "
            f"{int(space // h['state_bytes_per_seq'])} hybrid sequences of any length")


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the engines) and their own children."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def render(res: dict) -> str:
    t, h = res["teacher"], res["hybrid"]
    lines = [
        f"# vLLM serving: hybrid SmolLM2 vs teacher ({res['device']})", "",
        f"- machine: **{res['machine']}**; vLLM {res['vllm']}, fp32, eager, chunked prefill (2048 tokens a step)",
        "- models: SmolLM2-135M-Instruct (Q4_1, dequantized) teacher vs its untrained hybrid conversion (w = 64, "
        "hedgehog F = 64), same engine settings, run one after the other in this run",
        f"- {res['requests']} concurrent requests, random prompts of the given context, {res['new_tokens']} new tokens "
        "each (greedy, ignore_eos)",
        f"- load average before / after: {res['load_avg_before']} / {res['load_avg_after']} (after: this benchmark's "
        "engines included); other processes used "
        + ("an unknown share of the CPUs" if res.get("other_jobs_cores") is None
           else f"{res['other_jobs_cores']:.2f} cores on average during the run")
        + (" — **the machine was shared with other jobs: absolute numbers are low and noisy; the ratio is "
           "the comparison**" if res["shared_machine"] else ""),
        f"- per sequence: hybrid state {h['state_bytes_per_seq'] / 2**20:.2f} MiB whatever the length; teacher KV "
        f"{t['kv_bytes_per_token'] / 1024:.1f} KiB per token ({t['kv_bytes_per_token'] * 32768 / 2**20:.0f} MiB at 32k, "
        f"{t['kv_bytes_per_token'] * 32768 / h['state_bytes_per_seq']:.0f}x the hybrid's)",
    ]
    if res.get("kv_space_gib"):
        lines.append(_where_teacher_stops(res))
    lines += [
        "",
        "| context | model | generated tok/s | decode tok/s | decode ms/step | prefill tok/s | prefill s | total s "
        "| cache for the batch (MiB) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rt, rh in zip(t["rows"], h["rows"]):
        for name, r in (("teacher", rt), ("hybrid", rh)):
            lines.append(f"| {r['context']} | {name} | {r['generated_tok_per_s']} | {r['decode_tok_per_s']} | "
                         f"{r.get('decode_ms_per_step', '–')} | {r['prefill_tok_per_s']} | {r['prefill_s']} | {r['total_s']} | "
                         f"{r['cache_bytes_batch'] / 2**20:.1f} | {r['peak_rss_mib']} |")
        ratio = rh["generated_tok_per_s"] / rt["generated_tok_per_s"]
        dratio = (f"{rh['decode_tok_per_s'] / rt['decode_tok_per_s']:.2f}x"
                  if rh["decode_tok_per_s"] and rt["decode_tok_per_s"] else "n/a (noise)")
        lines.append(f"| {rt['context']} | **hybrid / teacher** | **{ratio:.2f}x** | **{dratio}** | | "
                     f"{rh['prefill_tok_per_s'] / rt['prefill_tok_per_s']:.2f}x | | | | |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
