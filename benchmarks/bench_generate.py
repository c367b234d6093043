"""End-to-end generation with the real teacher: the converted hybrid model vs the softmax teacher.

For each batch B and context length T it prefills B real prompts of T tokens (held-out State of the
Union speeches, no BOS) and decodes N tokens greedily with `model.generate`, for

  - `teacher`: SmolLM2-135M-Instruct (Q4_1, dequantized), SDPA attention and transformers'
    DynamicCache (a KV cache that grows with the context);
  - `hybrid`: the same weights converted with `hf_hybrid_attn.convert` (window w, hedgehog F; the
    feature maps are at their init: speed and memory do not depend on training), decoding through
    its constant-memory HybridCache (and the fused Triton decode kernel on CUDA).

It reports prefill seconds, decode tokens/s (B*N new tokens over the decode time, both read inside
one `generate(N+1)` call by a logits processor that stamps the clock after every forward: prefill =
start to the first stamp, decode = first to last stamp; medians over --repeats), the cache size
after generation, and on CUDA the peak memory the generation adds on top of the resident weights.
Before timing, a correctness gate checks that the hybrid model's greedy generation equals the
argmax of its own uncached forward over the generated text; if it fails, nothing is timed.

Compiled decoding (`--models ... hybrid_compiled teacher_compiled`): the same generate() call with
`cache_implementation="static"` and a `CompileConfig` (`--compile-backend`, default inductor;
`--compile-mode`, default transformers' "reduce-overhead", i.e. CUDA graphs on CUDA), so
transformers compiles the decode step: for the hybrid a compileable HybridCache, for the teacher
transformers' StaticCache. Each compiled model is warmed up at every point's batch size and
length before it is timed (compilation is not timed), and gated: its greedy tokens on the gate
prompt equal the eager hybrid's. Results of runs with compiled models go to
generate_<device>_<machine>_compiled.{json,md}.
Both models are warmed up first. The teacher has 8192 positions: points with T + N + 1 > 8192 are
skipped. Prompts reuse the held-out speeches cyclically when B*T exceeds them (~115k tokens).

    python3 benchmarks/bench_generate.py                         # CPU defaults
    python3 benchmarks/bench_generate.py --batch 1 64 --context 4096 8000 --max-batch-tokens 0 --new-tokens 64  # GPU

Results go to benchmarks/results/generate_<device>_<machine>.json and .md (rewritten after every
point, so an interrupted run keeps what it measured); both name the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


_HELD_OUT_IDS: list[int] = []


def prompt_ids(tok, batch: int, context: int) -> torch.Tensor:
    """[batch, context] token ids from the held-out speeches, consecutive slices (reused cyclically
    when batch*context is larger than the held-out text)."""
    from hf_hybrid_attn.assets import tokenize_for_lm
    from hf_hybrid_attn.evaluation.perplexity import held_out_documents

    if not _HELD_OUT_IDS:
        for doc in held_out_documents("sotu"):
            _HELD_OUT_IDS.extend(tokenize_for_lm(tok, doc))
    base = torch.tensor(_HELD_OUT_IDS, dtype=torch.long)
    need = batch * context
    reps = -(-need // base.numel())
    return base.repeat(reps)[:need].view(batch, context)


def cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A logits processor that stamps the clock after every forward of generate() (the first stamp
    follows the prefill), so prefill and decode are timed inside one call."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


COMPILED = ("hybrid_compiled", "teacher_compiled")


def compile_kwargs(backend: str, mode: str | None) -> dict:
    """generate() kwargs that make transformers compile the decode step on any device."""
    from transformers.generation.configuration_utils import CompileConfig

    cc = CompileConfig(backend=backend, **({"mode": mode} if mode else {}))
    cc._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    return {"cache_implementation": "static", "compile_config": cc}


def timed_generate(model, ids: torch.Tensor, new_tokens: int, **generate_kwargs):
    """(prefill seconds, seconds of the new_tokens - 1 decode steps, generate output)."""
    from transformers import LogitsProcessorList

    clock = StepClock(ids.device)
    sync(ids.device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **generate_kwargs)
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} generate steps, the clock saw {len(clock.stamps)}")
    return clock.stamps[0] - t0, clock.stamps[-1] - clock.stamps[0], out


@torch.no_grad()
def gate(model, tok, device, compiled: dict | None = None) -> dict:
    """The hybrid model's greedy generation equals the argmax of its uncached forward (and, with
    `compiled` generate kwargs, the compiled generation equals the eager one)."""
    ids = prompt_ids(tok, 2, 96).to(device)  # longer than the window: the state is used
    _, _, out = timed_generate(model, ids, 12)
    seq = out.sequences
    logits = model(seq, use_cache=False).logits
    pred = logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    ok = bool(torch.equal(pred, seq[:, ids.shape[1]:]))
    what = "greedy generate (HybridCache) == argmax of the uncached forward, B=2, T=96, 12 tokens"
    if compiled is not None:
        _, _, out_c = timed_generate(model, ids, 12, **compiled)
        ok = ok and bool(torch.equal(out_c.sequences, seq))
        what += "; compiled generate (cache_implementation='static') == the eager one"
    return {"passed": ok, "what": what}


@torch.no_grad()
def measure(model, ids: torch.Tensor, new_tokens: int, repeats: int, **generate_kwargs) -> dict:
    device = ids.device
    prefill, decode, out = [], [], None
    if generate_kwargs:  # compiled: compile for this batch size and length before timing
        timed_generate(model, ids, 3, **generate_kwargs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        t_pre, t_dec, out = timed_generate(model, ids, new_tokens + 1, **generate_kwargs)
        prefill.append(t_pre)
        decode.append(t_dec)
    t1, decode_s = statistics.median(prefill), statistics.median(decode)
    rec = {"prefill_s": round(t1, 4), "decode_s": round(decode_s, 4)}
    rec["decode_tokens_per_s"] = round(ids.shape[0] * new_tokens / decode_s, 2)
    rec["ms_per_step"] = round(1000 * decode_s / new_tokens, 3)
    from hf_hybrid_attn.compat import output_cache

    rec["cache_bytes"] = cache_bytes(output_cache(out))
    rec["cache_type"] = type(output_cache(out)).__name__
    if device.type == "cuda":
        rec["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated(device) - resident)
    return rec


def render_md(res: dict) -> str:
    lines = [
        f"# End-to-end generation: {res['model']}",
        "",
        f"- machine: **{res['machine']}**; torch {res['torch']}, transformers {res['transformers']}; dtype {res['dtype']}",
        f"- hybrid: window {res['window']}, feature map {res['feature_map']} (F={res['feature_dim']}), "
        f"decode path: {res['hybrid_decode_path']}",
        f"- {res['new_tokens']} new tokens per sequence, greedy `model.generate`, median of {res['repeats']}; "
        "prompts are held-out State of the Union speeches",
        f"- gate: {'passed' if res['gate']['passed'] else 'FAILED'} ({res['gate']['what']})",
        "",
        "| B | context | teacher decode tok/s | hybrid decode tok/s | hybrid / teacher | teacher cache | hybrid cache "
        "| teacher prefill s | hybrid prefill s | peak extra, teacher / hybrid |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["points"]:
        t, h = p.get("teacher", {}), p.get("hybrid", {})

        def g(r, k, fmt="{:.1f}"):
            return fmt.format(r[k]) if k in r else r.get("error", "–")

        ratio = (f"{h['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x"
                 if "decode_tokens_per_s" in h and "decode_tokens_per_s" in t else "–")
        mib = "{:.2f} MiB"
        lines.append(
            f"| {p['batch']} | {p['context']} | {g(t, 'decode_tokens_per_s')} | {g(h, 'decode_tokens_per_s')} | {ratio} "
            f"| {mib.format(t['cache_bytes'] / 2**20) if 'cache_bytes' in t else '–'} "
            f"| {mib.format(h['cache_bytes'] / 2**20) if 'cache_bytes' in h else '–'} "
            f"| {g(t, 'prefill_s', '{:.2f}')} | {g(h, 'prefill_s', '{:.2f}')} "
            f"| {' / '.join(mib.format(r['peak_extra_bytes'] / 2**20) if 'peak_extra_bytes' in r else '–' for r in (t, h))} |"
        )
    compiled = [p for p in res["points"] if any(name in p for name in COMPILED)]
    if compiled:
        lines += ["", f"Compiled decoding (generate(cache_implementation='static'), backend {res.get('compile_backend')}, "
                  f"mode {res.get('compile_mode') or 'transformers default (reduce-overhead)'}; compilation not timed):", "",
                  "| B | context | hybrid eager tok/s | hybrid compiled tok/s | compiled / eager | teacher compiled tok/s "
                  "| hybrid compiled / teacher compiled | hybrid compiled ms/step |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in compiled:
            h, hc, tc = (p.get(k, {}) for k in ("hybrid", "hybrid_compiled", "teacher_compiled"))

            def tps(r):
                return f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else r.get("error", "–")

            def ratio(a, b):
                ok = "decode_tokens_per_s" in a and "decode_tokens_per_s" in b
                return f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x" if ok else "–"

            lines.append(f"| {p['batch']} | {p['context']} | {tps(h)} | {tps(hc)} | {ratio(hc, h)} | {tps(tc)} "
                         f"| {ratio(hc, tc)} | {hc.get('ms_per_step', '–')} |")
    for note in res.get("skipped", []):
        lines.append(f"\nSkipped: {note}")
    lines += ["", "Peak extra (CUDA only): the most memory the generation allocated on top of the resident weights "
              "(both models stay on the device). Cache: bytes held by the generation cache after prefill + all new tokens (all layers). "
              "The teacher's KV cache grows with the context; the hybrid cache holds w-1 keys/values, "
              "their phi_k, the fp32 state (S, z) and the sinks per layer, whatever the context."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8000])
    ap.add_argument("--max-batch-tokens", type=int, default=16384,
                    help="skip points with batch*context above this (CPU time); 0 = no limit")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--feature-map", default="hedgehog")
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", nargs="+", default=["teacher", "hybrid"], choices=["teacher", "hybrid", *COMPILED])
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled models")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the compiled models (default: transformers' reduce-overhead)")
    ap.add_argument("--num-layers", type=int, default=None, help="keep the first N layers (smoke tests only)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    for name in ("batch", "context"):
        if any(x < 1 for x in getattr(args, name)):
            raise SystemExit(f"--{name}: expected integers >= 1, got {getattr(args, name)}")
    if args.new_tokens < 1 or args.repeats < 1:
        raise SystemExit("--new-tokens and --repeats: expected integers >= 1")

    import transformers

    import hf_hybrid_attn as hha
    from hf_hybrid_attn.assets import load_teacher
    from hf_hybrid_attn.kernels.dispatch import resolve_backend

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    teacher, tok = load_teacher(dtype=dtype, attn_implementation="sdpa", num_layers=args.num_layers)
    teacher.to(device)
    hybrid = hha.convert(copy.deepcopy(teacher), window=args.window, feature_map=args.feature_map,
                         feature_dim=args.feature_dim).to(device).eval()
    backend = resolve_backend("auto", device)
    res = {
        "model": "SmolLM2-135M-Instruct (Q4_1, dequantized)"
                 + (f", first {args.num_layers} layers" if args.num_layers else ""),
        "machine": machine_name(device), "device": device.type, "dtype": dtype_name,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "window": args.window, "feature_map": args.feature_map, "feature_dim": args.feature_dim,
        "hybrid_decode_path": ("fused Triton decode kernel (kernels/triton_decode.py)" if backend == "triton"
                               else "PyTorch (kernels/chunked.py prefill, HybridCache steps)"),
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "models": args.models,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    compiled = compile_kwargs(args.compile_backend, args.compile_mode)
    any_compiled = any(name in COMPILED for name in args.models)
    if any_compiled:
        res.update(compile_backend=args.compile_backend, compile_mode=args.compile_mode)
    res["gate"] = gate(hybrid, tok, device, compiled if "hybrid_compiled" in args.models else None)
    print(f"[gate] {res['gate']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"generate_{device.type}_{slug(res['machine'])}" + ("_compiled" if any_compiled else "")

    def write() -> None:
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / f"{stem}.md").write_text(render_md(res))

    res["points"] = []
    if not res["gate"]["passed"]:
        write()
        print("[gate] FAILED: nothing is timed", file=sys.stderr)
        return 1
    models = {"teacher": teacher, "hybrid": hybrid, "teacher_compiled": teacher, "hybrid_compiled": hybrid}
    kwargs_of = {name: (compiled if name in COMPILED else {}) for name in models}
    with torch.no_grad():  # warm-up: first calls pay for allocations, kernel compilation, caches
        warm = prompt_ids(tok, 1, 16).to(device)
        for name in args.models:
            timed_generate(models[name], warm, 2, **kwargs_of[name])
    for B in args.batch:
        for T in args.context:
            if args.max_batch_tokens and B * T > args.max_batch_tokens:
                res.setdefault("skipped", []).append(f"B={B} T={T}: batch*context > --max-batch-tokens {args.max_batch_tokens}")
                print(f"[skip] {res['skipped'][-1]}")
                continue
            if T + args.new_tokens + 1 > teacher.config.max_position_embeddings:
                res.setdefault("skipped", []).append(
                    f"B={B} T={T}: T + new tokens + 1 is beyond the teacher's {teacher.config.max_position_embeddings} positions")
                print(f"[skip] {res['skipped'][-1]}")
                continue
            point = {"batch": B, "context": T}
            ids = prompt_ids(tok, B, T).to(device)
            for name in args.models:
                try:
                    point[name] = measure(models[name], ids, args.new_tokens, args.repeats, **kwargs_of[name])
                except torch.OutOfMemoryError as e:  # recorded, the run carries on
                    point[name] = {"error": f"OOM: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
                print(f"[{name}] B={B} T={T}: {point[name]}", flush=True)
            res["points"].append(point)
            write()
    write()
    print(render_md(res))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
