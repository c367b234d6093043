"""End-to-end generation with the real teacher: the converted hybrid model vs the softmax teacher.

For each batch B and context length T it prefills B real prompts of T tokens (held-out State of the
Union speeches, no BOS) and decodes N tokens greedily with `model.generate`, for

  - `teacher`: SmolLM2-135M-Instruct (Q4_1, dequantized), SDPA attention and transformers'
    DynamicCache (a KV cache that grows with the context);
  - `hybrid`: the same weights converted with `hf_hybrid_attn.convert` (window w, hedgehog F; the
    feature maps are at their init: speed and memory do not depend on training), decoding through
    its constant-memory HybridCache (and the fused Triton decode kernel on CUDA).

It reports prefill seconds, decode tokens/s (B*N new tokens over the decode time: the time of
`generate(N+1)` minus the time of `generate(1)`, medians of --repeats), the cache size after
generation, and on CUDA the peak memory. Before timing, a correctness gate checks that the hybrid
model's greedy generation equals the argmax of its own uncached forward over the generated text.

    python3 benchmarks/bench_generate.py                         # CPU defaults, ~10 min on 2 cores
    python3 benchmarks/bench_generate.py --batch 1 64 --context 4096 32768 --new-tokens 64   # GPU

Results go to benchmarks/results/generate_<device>.json and .md; both name the machine.
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


def prompt_ids(tok, batch: int, context: int) -> torch.Tensor:
    """[batch, context] token ids from the held-out speeches, one distinct slice per row."""
    from hf_hybrid_attn.assets import tokenize_for_lm
    from hf_hybrid_attn.evaluation.perplexity import held_out_documents

    ids: list[int] = []
    need = batch * context
    for doc in held_out_documents("sotu"):
        ids.extend(tokenize_for_lm(tok, doc))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"--batch/--context: the held-out speeches hold {len(ids)} tokens, fewer than "
                         f"batch*context = {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, context)


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


def timed_generate(model, ids: torch.Tensor, new_tokens: int):
    sync(ids.device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0)
    sync(ids.device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def gate(model, tok, device) -> dict:
    """The hybrid model's greedy generation equals the argmax of its uncached forward."""
    ids = prompt_ids(tok, 2, 96).to(device)  # longer than the window: the state is used
    _, out = timed_generate(model, ids, 12)
    seq = out.sequences
    logits = model(seq, use_cache=False).logits
    pred = logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    ok = bool(torch.equal(pred, seq[:, ids.shape[1]:]))
    return {"passed": ok, "what": "greedy generate (HybridCache) == argmax of the uncached forward, B=2, T=96, 12 tokens"}


@torch.no_grad()
def measure(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    device = ids.device
    prefill, full, out = [], [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t1, _ = timed_generate(model, ids, 1)
        tn, out = timed_generate(model, ids, new_tokens + 1)
        prefill.append(t1)
        full.append(tn)
    t1, tn = statistics.median(prefill), statistics.median(full)
    decode_s = max(tn - t1, 1e-9)
    rec = {
        "prefill_s": round(t1, 4),
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": round(ids.shape[0] * new_tokens / decode_s, 2),
        "ms_per_step": round(1000 * decode_s / new_tokens, 3),
        "cache_bytes": cache_bytes(out.past_key_values),
        "cache_type": type(out.past_key_values).__name__,
    }
    if device.type == "cuda":
        rec["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
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
        "| teacher prefill s | hybrid prefill s |",
        "|---|---|---|---|---|---|---|---|---|",
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
            f"| {g(t, 'prefill_s', '{:.2f}')} | {g(h, 'prefill_s', '{:.2f}')} |"
        )
    lines += ["", "Cache: bytes held by the generation cache after prefill + all new tokens (all layers). "
              "The teacher's KV cache grows with the context; the hybrid cache holds w-1 keys/values, "
              "their phi_k, the fp32 state (S, z) and the sinks per layer, whatever the context."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
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
    ap.add_argument("--models", nargs="+", default=["teacher", "hybrid"], choices=["teacher", "hybrid"])
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
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    res["gate"] = gate(hybrid, tok, device)
    print(f"[gate] {res['gate']}", flush=True)
    if not res["gate"]["passed"]:
        print("[gate] FAILED: not timing", file=sys.stderr)
    models = {"teacher": teacher, "hybrid": hybrid}
    res["points"] = []
    for B in args.batch:
        for T in args.context:
            if args.max_batch_tokens and B * T > args.max_batch_tokens:
                print(f"[skip] B={B} T={T}: batch*context > --max-batch-tokens {args.max_batch_tokens}")
                continue
            if T + args.new_tokens + 1 > teacher.config.max_position_embeddings:
                print(f"[skip] B={B} T={T}: beyond the teacher's {teacher.config.max_position_embeddings} positions")
                continue
            point = {"batch": B, "context": T}
            ids = prompt_ids(tok, B, T).to(device)
            for name in args.models:
                if name == "hybrid" and not res["gate"]["passed"]:
                    continue
                try:
                    point[name] = measure(models[name], ids, args.new_tokens, args.repeats)
                except torch.OutOfMemoryError as e:  # recorded, the run carries on
                    point[name] = {"error": f"OOM: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
                print(f"[{name}] B={B} T={T}: {point[name]}", flush=True)
            res["points"].append(point)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"generate_{device.type}_{slug(res['machine'])}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_md(res))
    print(render_md(res))
    print(f"wrote {out / stem}.json and .md")
    return 0 if res["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
