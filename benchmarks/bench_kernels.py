"""Benchmark the Triton hybrid kernels on one GPU against the usual baselines, side by side.

Every variant first passes a correctness gate against the float64 reference (the same function
for ours and the chunked PyTorch path; plain window / causal softmax or normalised linear attention,
via the reference's modes, for the baselines). Then `triton.testing.do_bench` medians of
forward and forward+backward tokens/s for one layer (H=32, kv 8, D=128, F=128, w=64), and decode
tokens/s and cache memory. Results go to benchmarks/results/kernels_<device>.json and .md.

    python benchmarks/bench_kernels.py                       # the full grid (H100: ~10-15 min)
    python benchmarks/bench_kernels.py --batch 8 --seq 2048 8192 --append   # a piece, merged in
    python benchmarks/bench_kernels.py --smoke               # tiny CPU run of the script itself
                                                             # (Triton interpreter, no timings)
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_kernels():
    """This checkout's kernels/ as the package `hha_kernels`: no pip install needed on the GPU
    machine, and kernels/ never imports transformers. Returns (chunked, reference, triton_hybrid,
    triton_decode) modules."""
    if "hha_kernels" not in sys.modules:
        root = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location("hha_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["hha_kernels"] = module
        spec.loader.exec_module(module)
    return tuple(importlib.import_module(f"hha_kernels.{m}")
                 for m in ("chunked", "reference", "triton_hybrid", "triton_decode"))


_chunked, _reference, _triton_hybrid, _triton_decode = load_kernels()
hybrid_attention_chunked = _chunked.hybrid_attention_chunked
hybrid_attention_reference = _reference.hybrid_attention_reference
hybrid_attention_triton = _triton_hybrid.hybrid_attention_triton
DecodeCache, hybrid_decode_triton = _triton_decode.DecodeCache, _triton_decode.hybrid_decode_triton

# Limits of one H100 for one layer at H=32, D=F=128, w=C=64 (docs/KERNELS.md).
LIMITS = {
    "fwd_tokens_per_s": 92e6,  # memory bound, ~1 KiB per token per head
    "fwd_bwd_tokens_per_s": 30e6,
    "decode_seconds_per_step_per_seq": 1.8e-6,  # ~167 KB per head per step
}
GATE_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


class Unavailable(Exception):
    """A variant that cannot run here (missing package or backend); recorded as a note."""


# ---------------------------------------------------------------------------------------------
# inputs and variants
# ---------------------------------------------------------------------------------------------
def make_inputs(B, T, args, device, dtype, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(B * 1_000_003 + T)
    H, Hkv, D, Fd = args.heads, args.kv_heads, args.head_dim, args.feature_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    x = dict(
        q=rnd(B, H, T, D), k=rnd(B, Hkv, T, D), v=rnd(B, Hkv, T, D),
        # positive features of hedgehog-like size (softmax over F entries)
        phi_q=torch.softmax(rnd(B, H, T, Fd).float(), -1).to(dtype),
        phi_k=torch.softmax(rnd(B, H, T, Fd).float(), -1).to(dtype),
        gamma=torch.full((H,), 0.1, device=device), alpha=torch.ones(H, device=device),
    )
    if requires_grad:
        for n in ("q", "k", "v", "phi_q", "phi_k"):
            x[n].requires_grad_(True)
    return x


def expand_kv(t, H):
    return t.repeat_interleave(H // t.shape[1], dim=1)


def build_variants(args, device):
    """name -> (callable(x) -> y, reference kwargs describing the function it computes, grad names)."""
    W, scale = args.window, args.head_dim**-0.5
    hybrid_kw = dict(window=W, scale=scale, mode="hybrid")
    _triton_hybrid.BACKWARD_CHUNK = args.bwd_chunk
    window_kw = dict(window=W, scale=scale, mode="swa_only", gamma_one=True)
    causal_kw = dict(window=1 << 30, scale=scale, mode="swa_only", gamma_one=True)
    linear_kw = dict(window=W, scale=scale, mode="linear_only", alpha_one=True)
    grads_all = ("q", "k", "v", "phi_q", "phi_k")
    grads_qkv = ("q", "k", "v")
    out = {}

    def ours(x):
        return hybrid_attention_triton(**x, **hybrid_kw, chunk_size=args.chunk)

    out["hybrid_triton"] = (ours, hybrid_kw, grads_all)
    out["chunked_eager"] = (lambda x: hybrid_attention_chunked(**x, **hybrid_kw), hybrid_kw, grads_all)
    if not args.smoke:
        compiled = torch.compile(hybrid_attention_chunked, dynamic=False)
        out["chunked_compiled"] = (lambda x: compiled(**x, **hybrid_kw), hybrid_kw, grads_all)

    def sdpa(backend_name):
        def run(x):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, backend_name)
            with sdpa_kernel([backend]):
                try:
                    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, scale=scale,
                                                          enable_gqa=True)
                except RuntimeError:  # backend without native GQA: expand kv heads
                    H = x["q"].shape[1]
                    return F.scaled_dot_product_attention(x["q"], expand_kv(x["k"], H), expand_kv(x["v"], H),
                                                          is_causal=True, scale=scale)

        return run

    if args.smoke:
        out["sdpa_math"] = (sdpa("MATH"), causal_kw, grads_qkv)
    else:
        out["sdpa_flash"] = (sdpa("FLASH_ATTENTION"), causal_kw, grads_qkv)
        out["sdpa_cudnn"] = (sdpa("CUDNN_ATTENTION"), causal_kw, grads_qkv)
        out["flex_window"] = (flex_window(W, scale), window_kw, grads_qkv)
        fla = fla_ops()
        if fla is not None:
            chunk_linear_attn, parallel_attn = fla

            def fla_linear(x):
                H = x["q"].shape[1]
                o, _ = chunk_linear_attn(x["phi_q"].transpose(1, 2), x["phi_k"].transpose(1, 2),
                                         expand_kv(x["v"], H).transpose(1, 2), scale=1.0, normalize=True)
                return o.transpose(1, 2)

            def fla_window(x):
                o = parallel_attn(x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2),
                                  scale=scale, window_size=W)
                return o.transpose(1, 2)

            out["fla_linear"] = (fla_linear, linear_kw, ("phi_q", "phi_k", "v"))
            out["fla_window"] = (fla_window, window_kw, grads_qkv)
            # no shared normaliser: a speed reference for "two unfused ops", not our function
            out["fla_linear+window"] = (lambda x: fla_linear(x) + fla_window(x), None, grads_all)
    return out


def flex_window(W, scale):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:  # pragma: no cover - old torch
        raise Unavailable(f"FlexAttention unavailable: {e}") from e
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def window_mask(b, h, q_idx, kv_idx):  # w keys: q - kv in [0, W)
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    def run(x):
        T = x["q"].shape[2]
        if T not in masks:
            masks[T] = create_block_mask(window_mask, None, None, T, T, device=x["q"].device)
        return compiled(x["q"], x["k"], x["v"], block_mask=masks[T], scale=scale, enable_gqa=True)

    return run


_FLA_NOTE = ""


def fla_ops():
    global _FLA_NOTE
    try:
        from fla.ops.attn import parallel_attn
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        _FLA_NOTE = f"fla not importable ({type(e).__name__}: {e}); fla rows skipped"
        return None
    return chunk_linear_attn, parallel_attn


# ---------------------------------------------------------------------------------------------
# correctness gate
# ---------------------------------------------------------------------------------------------
def reference_for(x, ref_kw):
    kw = dict(ref_kw)
    gamma_one, alpha_one = kw.pop("gamma_one", False), kw.pop("alpha_one", False)
    xr = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in x.items()}
    if gamma_one:
        xr["gamma"] = torch.ones_like(xr["gamma"])
    if alpha_one:
        xr["alpha"] = torch.ones_like(xr["alpha"])
    return xr, hybrid_attention_reference(**xr, **kw)


def gate(name, fn, ref_kw, grad_names, args, device, dtype):
    """Max error relative to max |reference| for y and every gradient; fails above GATE_TOL."""
    if ref_kw is None:
        return {"status": "not gated (not the hybrid function: composition of two ops)"}
    T = args.gate_seq
    x = make_inputs(1, T, args, device, dtype, requires_grad=True)
    dy = torch.randn(1, args.heads, T, args.head_dim, device=device, dtype=dtype)
    y = fn(x)
    grads = torch.autograd.grad(y, [x[n] for n in grad_names], dy)
    xr, yr = reference_for(x, ref_kw)
    grads_r = torch.autograd.grad(yr, [xr[n] for n in grad_names], dy.double())
    errs = {"y": rel(y, yr)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(grad_names, grads, grads_r)})
    worst = max(errs.values())
    ok = worst <= GATE_TOL[dtype]
    return {"status": "pass" if ok else "FAIL", "max_rel_err": worst, "errors": errs}


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def bench_ms(fn, args, grad_to_none=None):
    if args.smoke:  # no GPU: one timed call so that the script's logic runs end to end
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none, return_mode="median")


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_variant(fn, grad_names, B, T, args, device, dtype, backward):
    x = make_inputs(B, T, args, device, dtype, requires_grad=backward)
    if not backward:
        def run():
            with torch.no_grad():
                return fn(x)
    else:
        dy = torch.randn(B, args.heads, T, args.head_dim, device=device, dtype=dtype)
        leaves = [x[n] for n in grad_names]

        def run():
            torch.autograd.backward(fn(x), dy, inputs=leaves)
    mem = peak_memory(run, device)
    ms = bench_ms(run, args, grad_to_none=[x[n] for n in grad_names] if backward else None)
    return {"ms": ms, "tokens_per_s": B * T / (ms * 1e-3), "peak_mem_bytes": mem}


def run_training_grid(args, device, dtype, results, notes):
    variants = build_variants(args, device)
    if _FLA_NOTE:
        notes.append(_FLA_NOTE)
    gates = results.setdefault("gate", {})
    for name, (fn, ref_kw, grad_names) in variants.items():
        if args.only and name not in args.only:
            continue
        try:
            gates[name] = gate(name, fn, ref_kw, grad_names, args, device, dtype)
        except Unavailable as e:
            gates[name] = {"status": f"unavailable: {e}"}
        except Exception as e:  # noqa: BLE001 - a broken baseline must not stop the run
            gates[name] = {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        print(f"[gate] {name}: {gates[name]}", flush=True)
        if gates[name]["status"] not in ("pass",) and not gates[name]["status"].startswith("not gated"):
            continue
        for B in args.batch:
            for T in args.seq:
                for backward in (False, True):
                    if backward and args.skip_backward:
                        continue
                    key = f"{name}|B={B}|T={T}|{'fwd_bwd' if backward else 'fwd'}"
                    try:
                        r = time_variant(fn, grad_names, B, T, args, device, dtype, backward)
                    except torch.cuda.OutOfMemoryError:
                        r = {"error": "OOM"}
                    except Exception as e:  # noqa: BLE001
                        r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    r.update(variant=name, B=B, T=T, pass_="fwd_bwd" if backward else "fwd")
                    limit = LIMITS["fwd_bwd_tokens_per_s" if backward else "fwd_tokens_per_s"]
                    if "tokens_per_s" in r and name == "hybrid_triton":
                        r["pct_of_h100_limit"] = 100 * r["tokens_per_s"] / limit
                    results.setdefault("train", {})[key] = r
                    print(f"[time] {key}: {fmt_rate(r)}", flush=True)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
def run_decode(args, device, dtype, results, notes):
    H, W, scale = args.heads, args.window, args.head_dim**-0.5
    gamma, alpha = torch.full((H,), 0.1, device=device), torch.ones(H, device=device)
    out = results.setdefault("decode", {})

    # correctness gate: decode the last tokens of a sequence == the uncached reference
    T, P = 96, 80
    x = make_inputs(1, T, args, device, dtype)
    _, state = _prefill(x, P, W, scale)
    cache = DecodeCache.from_prefill(x["k"][:, :, :P], x["v"][:, :, :P], state, W)
    want = hybrid_attention_reference(**{n: t.double() for n, t in x.items()}, window=W, scale=scale)
    worst = 0.0
    for i in range(P, T):
        s = {n: x[n][:, :, i : i + 1] for n in ("q", "k", "v", "phi_q", "phi_k")}
        ev = i - W + 1
        y = hybrid_decode_triton(**s, gamma=gamma, alpha=alpha, cache=cache, scale=scale,
                                 phi_k_evict=x["phi_k"][:, :, ev : ev + 1])
        worst = max(worst, rel(y, want[:, :, i : i + 1]))
    out["gate"] = {"status": "pass" if worst <= GATE_TOL[dtype] else "FAIL", "max_rel_err": worst}
    print(f"[gate] decode: {out['gate']}", flush=True)

    for B in args.decode_batch:
        for ctx in args.decode_context:
            rec = decode_point(B, ctx, args, device, dtype, gamma, alpha)
            out[f"B={B}|ctx={ctx}"] = rec
            print(f"[decode] B={B} ctx={ctx}: ours {fmt_rate(rec['ours_eager'])} / graph "
                  f"{fmt_rate(rec['ours_cuda_graph'])}; sdpa {fmt_rate(rec['sdpa_eager'])} / graph "
                  f"{fmt_rate(rec['sdpa_cuda_graph'])}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def decode_point(B, ctx, args, device, dtype, gamma, alpha):
    """One decode step of one layer at batch B after ctx tokens: ours vs SDPA with a KV cache."""
    H, Hkv, D, Fd, W = args.heads, args.kv_heads, args.head_dim, args.feature_dim, args.window
    scale = D**-0.5
    # ours: constant-size cache (ring of w-1 keys + fp32 state), independent of ctx
    cache = DecodeCache.empty(B, H, Hkv, D, Fd, W, dtype=dtype, device=device)
    cache.valid.fill_(True)
    cache.k_win.normal_()
    cache.v_win.normal_()
    cache.S.uniform_()
    cache.z.uniform_()
    cache.position.fill_(ctx)
    step = make_inputs(B, 1, args, device, dtype)
    step_in = {n: step[n] for n in ("q", "k", "v", "phi_q", "phi_k")}
    fk_ev = step["phi_k"].clone()

    def ours():
        return hybrid_decode_triton(**step_in, gamma=gamma, alpha=alpha, cache=cache, scale=scale,
                                    phi_k_evict=fk_ev)

    cache_bytes = sum(t.numel() * t.element_size() for t in (cache.k_win, cache.v_win, cache.valid, cache.S, cache.z))
    rec = {"B": B, "context": ctx, "cache_bytes_per_layer": cache_bytes}
    rec["ours_eager"] = decode_rate(ours, B, args)
    rec["ours_cuda_graph"] = graphed_rate(ours, B, args, device)
    limit = 1.0 / LIMITS["decode_seconds_per_step_per_seq"]  # memory bound: tokens/s, whatever B
    for k in ("ours_eager", "ours_cuda_graph"):
        if "tokens_per_s" in rec[k]:
            rec[k]["pct_of_h100_limit"] = 100 * rec[k]["tokens_per_s"] / limit
    # SDPA with a KV cache (preallocated, the new token written in place)
    k_cache = torch.randn(B, Hkv, ctx + 1, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    pos = torch.tensor([ctx], device=device)

    def sdpa_step():
        k_cache.index_copy_(2, pos, step_in["k"])
        v_cache.index_copy_(2, pos, step_in["v"])
        return F.scaled_dot_product_attention(step_in["q"], k_cache, v_cache, scale=scale, enable_gqa=True)

    rec["sdpa_kv_cache_bytes_per_layer"] = 2 * k_cache.numel() * k_cache.element_size()
    rec["sdpa_eager"] = decode_rate(sdpa_step, B, args)
    rec["sdpa_cuda_graph"] = graphed_rate(sdpa_step, B, args, device)
    return rec


def _prefill(x, P, W, scale):
    cut = {n: (t[:, :, :P] if t.dim() == 4 else t) for n, t in x.items()}
    return hybrid_attention_triton(**cut, window=W, scale=scale, return_state=True)


def decode_rate(fn, B, args):
    try:
        ms = bench_ms(fn, args)
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"ms": ms, "tokens_per_s": B / (ms * 1e-3)}


def graphed_rate(fn, B, args, device):
    """The step captured in a CUDA graph: small batches are bound by launch latency."""
    if device.type != "cuda":
        return {"error": "no CUDA"}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile + warm up outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return decode_rate(graph.replay, B, args)
    except Exception as e:  # noqa: BLE001
        return {"error": f"graph capture failed: {type(e).__name__}: {str(e)[:200]}"}


# ---------------------------------------------------------------------------------------------
# compile check: every kernel compiled for sm_90 without a GPU (shared memory, registers, spills)
# ---------------------------------------------------------------------------------------------
def compile_check(args, dtypes=("bf16", "fp32")):
    """Compile the kernels ahead of time for an H100 (sm_90) with the ptxas bundled with Triton and
    report shared memory (limit 227 KiB), registers and spill bytes per variant. Needs no GPU; run
    without TRITON_INTERPRET. Returns rows of dicts."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((str(p) for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    D, Fd = args.head_dim, args.feature_dim
    rows = []

    def build(kernel, types, constexprs, warps, stages):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        sig = {n: ("constexpr" if n in constexprs else types[n]) for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))

    def ptxas_info(compiled):
        if ptxas is None:
            return None, None
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        regs = re.findall(r"Used (\d+) registers", out.stderr)
        spill = re.findall(r"(\d+) bytes spill stores", out.stderr)
        return (int(regs[0]) if regs else None), (int(spill[0]) if spill else 0)

    scalars = dict(Tq="i32", Tk="i32", H="i32", HKV="i32", window="i32", shift="i32", state_end="i32", POS_STRIDE="i32",
                   qk_scale="fp32", scale="fp32")
    for dt in dtypes:
        p = "*" + dt
        ieee = dt == "fp32"
        chunk = 32 if ieee else args.chunk
        types = dict(Q=p, K=p, V=p, FQ=p, FK=p, VALID="*i8", GAMMA="*fp32", ALPHA="*fp32", S_IN="*fp32",
                     Z_IN="*fp32", Y=p, M_OUT="*fp32", IDX_OUT="*i32", DEN_OUT="*fp32", LDEN_OUT="*fp32",
                     S_OUT="*fp32", Z_OUT="*fp32", DY=p, M="*fp32", IDX="*i32", DEN="*fp32", DQ=p, DFQ=p,
                     DC="*fp32", DELTA="*fp32", R_WIN="*fp32", R_LIN="*fp32", DK_OUT="*fp32", DV_OUT="*fp32",
                     DFK=p, KN=p, VN=p, FKN=p, NVALID="*i8", KW=p, VW=p, WVALID="*i1", FKW=p, FKE=p,
                     S="*fp32", Z="*fp32", POS="*i64", **scalars)
        nt = 1 + math.ceil((args.window - 1) / chunk)
        common = dict(DK=D, DV=D, FD=Fd, BDK=D, BF=Fd, C=chunk, NT=nt, HAS_WIN=True, HAS_LIN=True, IEEE=ieee)
        bv = 32 if ieee else 64
        bwd_chunk = 32 if ieee else (args.bwd_chunk or args.chunk)
        bwd = {**common, "C": bwd_chunk, "NT": 1 + math.ceil((args.window - 1) / bwd_chunk), "BDV": D}
        variants = [
            ("forward", _triton_hybrid._hybrid_fwd_kernel,
             {**common, "BV": bv, "FOLD_STATE": True, "HAS_INIT": True, "RETURN_STATE": True}),
            ("backward dq", _triton_hybrid._hybrid_bwd_dq_kernel, {**bwd, "HAS_INIT": True}),
            ("backward dkv", _triton_hybrid._hybrid_bwd_dkv_kernel, bwd),
            ("decode", _triton_decode._hybrid_decode_kernel,
             dict(W1=args.window - 1, BW=max(2, 1 << (args.window - 2).bit_length()), DK=D, DV=D, FD=Fd, BDK=D,
                  BV=64, BF=Fd, HAS_WIN=True, HAS_LIN=True, LIN_WINDOW=False, HAS_FKW=False, FOLD=True)),
        ]
        for name, kernel, constexprs in variants:
            for warps in ((4,) if name == "decode" else tuple(args.compile_warps)):
                t0 = time.perf_counter()
                try:
                    compiled = build(kernel, types, constexprs, warps, 1)
                    regs, spill = ptxas_info(compiled)
                    row = dict(kernel=name, dtype=dt, warps=warps, shared_bytes=compiled.metadata.shared,
                               registers=regs, spill_bytes=spill, fits=compiled.metadata.shared <= 227 * 1024)
                except Exception as e:  # noqa: BLE001 - report every failure, keep going
                    row = dict(kernel=name, dtype=dt, warps=warps, error=f"{type(e).__name__}: {str(e)[:300]}")
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(f"[compile sm_90] {row}", flush=True)
    return rows


def compiled_kernels_metadata():
    """Registers, spill bytes and shared memory of every variant of our kernels that this process
    compiled and loaded on the GPU (Triton's compile metadata: n_regs / n_spills come from the loaded
    binary). {"<kernel>|<specialisation key>": row}; empty in the interpreter. Never raises."""
    kernels = {"forward": _triton_hybrid._hybrid_fwd_kernel, "backward dq": _triton_hybrid._hybrid_bwd_dq_kernel,
               "backward dkv": _triton_hybrid._hybrid_bwd_dkv_kernel, "decode": _triton_decode._hybrid_decode_kernel}
    rows = {}
    for name, kernel in kernels.items():
        fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
        try:
            best = {str(k): str(v) for k, v in getattr(kernel, "cache", {}).items()}  # autotuner: key -> best config
            for entry in list(getattr(fn, "device_caches", {}).values()):
                cache = entry[0] if isinstance(entry, tuple) else entry
                for key, compiled in list(cache.items()):
                    try:
                        compiled._init_handles()
                    except Exception:  # noqa: BLE001 - already loaded, or no driver: read what is there
                        pass
                    md = compiled.metadata
                    rows[f"{name}|{key}"[:400]] = dict(
                        kernel=name, num_warps=getattr(md, "num_warps", None), num_stages=getattr(md, "num_stages", None),
                        shared_bytes=getattr(md, "shared", None), registers=getattr(compiled, "n_regs", None),
                        spill_bytes=getattr(compiled, "n_spills", None), key=str(key)[:300])
            if best:
                rows[f"{name}|autotuner best configs"] = {"kernel": name, "best_configs": best}
        except Exception as e:  # noqa: BLE001 - Triton's internals move between versions
            rows[f"{name}|error"] = {"kernel": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_rate(r):
    if "error" in r:
        return r["error"]
    return f"{r['tokens_per_s'] / 1e6:.3g} M tok/s ({r['ms']:.3f} ms)"


def crossover(results, B, seqs, passname, baseline="sdpa_cudnn"):
    """Shortest T from which hybrid_triton beats the baseline (log-interpolated between measured T)."""
    train = results.get("train", {})

    def rate(name, T):
        return train.get(f"{name}|B={B}|T={T}|{passname}", {}).get("tokens_per_s")

    pts = [(T, rate("hybrid_triton", T), rate(baseline, T)) for T in sorted(seqs)]
    pts = [(T, a, b) for T, a, b in pts if a and b]
    if not pts:
        return "n/a"
    prev = None
    for T, a, b in pts:
        if a >= b:
            if prev is None:
                return f"<= {T}"
            T0, a0, b0 = prev
            r0, r1 = math.log(a0 / b0), math.log(a / b)
            frac = -r0 / (r1 - r0) if r1 != r0 else 1.0
            return f"~{round(math.exp(math.log(T0) + frac * (math.log(T) - math.log(T0))))}"
        prev = (T, a, b)
    return f"> {pts[-1][0]}"


def write_report(results, args, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = results["meta"]["device_name"]
    slug = "".join(c if c.isalnum() else "_" for c in dev).strip("_").lower() or "device"
    jpath, mpath = out_dir / f"kernels_{slug}.json", out_dir / f"kernels_{slug}.md"
    if args.append and jpath.exists():
        old = json.loads(jpath.read_text())
        for section in ("gate", "train", "decode", "compiled_kernels"):
            old.setdefault(section, {}).update(results.get(section, {}))
        old["notes"] = sorted(set(old.get("notes", []) + results.get("notes", [])))
        old["meta"] = results["meta"]
        results = old
    jpath.write_text(json.dumps(results, indent=1, default=str))
    m = results["meta"]
    lines = [
        f"# Kernel benchmark on {dev}",
        "",
        f"torch {m['torch']}, triton {m['triton']}, {m['dtype']}, H={m['heads']} (kv {m['kv_heads']}), "
        f"D={m['head_dim']}, F={m['feature_dim']}, w={m['window']}, chunk {m.get('chunk', 64)} (backward "
        f"{m.get('bwd_chunk', 64)}). Medians of triton.testing.do_bench"
        f"{' (SMOKE RUN: CPU interpreter, single calls, numbers meaningless)' if m['smoke'] else ''}.",
        f"H100 limits (docs/KERNELS.md): forward {LIMITS['fwd_tokens_per_s'] / 1e6:.0f} M tok/s, forward+backward "
        f"{LIMITS['fwd_bwd_tokens_per_s'] / 1e6:.0f} M tok/s, decode {LIMITS['decode_seconds_per_step_per_seq'] * 1e6:.1f} "
        "us per layer-step per sequence.",
        "",
        "## Correctness gate (max |err| / max |ref| against the float64 reference, y and gradients)",
        "",
        "| variant | status | max rel err |",
        "|---|---|---|",
    ]
    for name, g in results.get("gate", {}).items():
        err = g.get("max_rel_err")
        lines.append(f"| {name} | {g['status']} | {'' if err is None else f'{err:.2e}'} |")
    train = results.get("train", {})
    batches = sorted({r["B"] for r in train.values()})
    seqs = sorted({r["T"] for r in train.values()})
    names = list(dict.fromkeys(r["variant"] for r in train.values()))
    for passname, title in (("fwd", "Forward"), ("fwd_bwd", "Forward + backward")):
        for B in batches:
            lines += ["", f"## {title}, B={B}: M tokens/s (peak extra memory GiB)", "",
                      "| variant | " + " | ".join(f"T={T}" for T in seqs) + " |",
                      "|---|" + "---|" * len(seqs)]
            for name in names:
                cells = []
                for T in seqs:
                    r = train.get(f"{name}|B={B}|T={T}|{passname}")
                    if r is None:
                        cells.append("")
                    elif "error" in r:
                        cells.append(r["error"][:40])
                    else:
                        mem = r.get("peak_mem_bytes")
                        pct = f", {r['pct_of_h100_limit']:.0f}% of limit" if "pct_of_h100_limit" in r else ""
                        cells.append(f"{r['tokens_per_s'] / 1e6:.3g}{'' if mem is None else f' ({mem / 2**30:.2f})'}{pct}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            lines.append(f"Crossover against cuDNN (hybrid_triton faster from T): {crossover(results, B, seqs, passname)}")
    dec = {k: v for k, v in results.get("decode", {}).items() if k != "gate"}
    if dec:
        g = results["decode"].get("gate", {})
        lines += ["", "## Decode (one layer, one step per sequence)", "",
                  f"Decode gate vs the uncached reference: {g.get('status')} ({g.get('max_rel_err', float('nan')):.2e})", "",
                  "| B | context | ours eager | ours CUDA graph | SDPA + KV cache eager | SDPA CUDA graph | "
                  "cache MiB ours / SDPA |", "|---|---|---|---|---|---|---|"]
        for rec in dec.values():
            def cell(r):
                if "error" in r:
                    return r["error"][:40]
                pct = f", {r['pct_of_h100_limit']:.0f}%" if "pct_of_h100_limit" in r else ""
                return f"{r['tokens_per_s'] / 1e3:.3g} k tok/s ({r['ms'] * 1e3:.1f} us{pct})"

            lines.append(f"| {rec['B']} | {rec['context']} | {cell(rec['ours_eager'])} | {cell(rec['ours_cuda_graph'])} | "
                         f"{cell(rec['sdpa_eager'])} | {cell(rec['sdpa_cuda_graph'])} | "
                         f"{rec['cache_bytes_per_layer'] / 2**20:.2f} / {rec['sdpa_kv_cache_bytes_per_layer'] / 2**20:.1f} |")
    compiled = [r for r in results.get("compiled_kernels", {}).values() if "registers" in r]
    if compiled:
        lines += ["", "## Compiled kernels on this GPU (Triton metadata: registers, spills, shared memory)", "",
                  "| kernel | warps | stages | registers | spill bytes | shared KiB | specialisation |",
                  "|---|---|---|---|---|---|---|"]
        for r in compiled:
            shared = r.get("shared_bytes")
            lines.append(f"| {r['kernel']} | {r.get('num_warps')} | {r.get('num_stages')} | {r.get('registers')} | "
                         f"{r.get('spill_bytes')} | {'' if shared is None else f'{shared / 1024:.0f}'} | "
                         f"{r.get('key', '')[:120]} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    mpath.write_text("\n".join(lines) + "\n")
    print(f"wrote {jpath} and {mpath}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--chunk", type=int, default=64, help="chunk size of the Triton kernels")
    p.add_argument("--bwd-chunk", type=int, default=None, help="chunk of the backward kernels (default: --chunk)")
    p.add_argument("--gate-seq", type=int, default=1024, help="sequence length of the correctness gate")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--decode-context", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--only", nargs="+", help="run only these variants (e.g. hybrid_triton sdpa_cudnn)")
    p.add_argument("--skip-train", action="store_true", help="skip the forward / forward+backward grid")
    p.add_argument("--skip-backward", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--append", action="store_true", help="merge into an existing results file")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (Triton interpreter) to test this script")
    p.add_argument("--compile-check", action="store_true",
                   help="compile every kernel for sm_90 without a GPU; print shared memory, registers, spills")
    p.add_argument("--compile-dtypes", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--compile-warps", type=int, nargs="+", default=[4, 8])
    args = p.parse_args(argv)
    if args.compile_check:
        rows = compile_check(args, tuple(args.compile_dtypes))
        bad = [r for r in rows if "error" in r or not r["fits"]]
        sys.exit(1 if bad else 0)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke:
        device = torch.device("cpu")
        dtype = torch.float32  # the interpreter does not emulate bf16
        args.heads, args.kv_heads, args.head_dim, args.feature_dim, args.window = 4, 2, 16, 16, 16
        args.batch, args.seq, args.gate_seq = [1], [64, 128], 80
        args.decode_batch, args.decode_context = [2], [256]
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --smoke for a CPU check of the script)")
    else:
        device = torch.device("cuda")
    import triton

    results = {
        "meta": dict(
            device_name=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-smoke-{platform.machine()}",
            torch=torch.__version__, triton=triton.__version__, dtype=str(dtype).replace("torch.", ""),
            heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, feature_dim=args.feature_dim,
            window=args.window, chunk=args.chunk, bwd_chunk=args.bwd_chunk or args.chunk, smoke=args.smoke, python=platform.python_version(),
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
        ),
        "notes": [],
    }
    try:
        if not args.skip_train:
            run_training_grid(args, device, dtype, results, results["notes"])
        if not args.skip_decode:
            run_decode(args, device, dtype, results, results["notes"])
    finally:
        if device.type == "cuda":
            results["compiled_kernels"] = compiled_kernels_metadata()
        write_report(results, args, args.out)


if __name__ == "__main__":
    main()
