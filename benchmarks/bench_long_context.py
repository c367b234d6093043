"""Long context: prefill and decode speed and memory of the hybrid SmolLM2 against its softmax teacher.

For each batch B and context T, B prompts of T tokens (held-out State of the Union speeches, reused
cyclically; every row but the first LEFT-padded by --pad tokens, so padding is exercised) are
prefilled and decoded greedily for N steps (--decode-steps) inside one `model.generate(N+1)` call, for

  - `hybrid`: SmolLM2-135M-Instruct (Q4_1, dequantized) converted with the default HybridConfig
    (`hf_hybrid_attn.convert(model, HybridConfig())`: window 64, hedgehog F=64). It is untrained (the
    feature maps are at their init): speed and memory do not depend on training. It decodes through
    its constant-memory HybridCache (the fused Triton decode kernel on CUDA);
  - `teacher`: the same weights, unconverted, attn_implementation="sdpa", transformers' DynamicCache.

Positions: the teacher has 8192 (max_position_embeddings). Where T + N + 1 exceeds them, both models
get max_position_embeddings raised to T + N + 1: RoPE (default type, no scaling) then extrapolates
beyond 8192. That is fine for speed and memory; the outputs beyond 8192 positions are not judged.

Every point (and the gate) runs in its own fresh process, so each has its own memory peak and an
out-of-memory kill costs only that point. The processes are forked from a multiprocessing forkserver
that has only imported torch, transformers and the package (no model, no tensor op, no CUDA context):
a point pays for loading its model (the same dequantized weights for both models), not for ~5 s of
imports. The parent collects one record per point. Memory (bytes above what is resident before
generate() starts: the weights and the runtime):
  - CUDA: torch.cuda.memory_allocated / max_memory_allocated, with reset_peak_memory_stats at the start
    of each phase;
  - CPU (Linux): the kernel's own peak RSS (VmHWM in /proc/self/status), reset to the current RSS by
    writing 5 to /proc/self/clear_refs at the start of each phase, after gc.collect() and glibc's
    malloc_trim(0) (freed memory the allocator kept goes back to the OS, so RSS is live memory). The
    kernel tracks the peak exactly: no sampling interval misses a short spike. Elsewhere: not measured.
Phases: prefill = from the call to the first logits; decode = the N one-token steps after it. The
step 1 -> step N delta is the memory held after step N minus after step 1 (the hybrid target: under
1 MB plus allocator noise; the teacher's KV cache grows by 46 KB per token and row).

Times come from a logits processor (bench_generate's StepClock, extended): prefill = start to the
first logits; a decode step = from the processor returning to the next logits, so the memory reads
are not timed; ms/step is the median over the N steps, then the median over --repeats. Each worker
warms up with a short generate first.

Before anything is timed a correctness gate runs (in its own subprocess): the hybrid's cached greedy
generation equals the argmax of its uncached forward on a short left-padded batch. If it fails,
nothing is timed and the exit status is 1.

The teacher runs up to the largest T whose point fits --teacher-budget-s (default 600 s per point,
the point's whole process: start, load, warm-up, repeats): each next point's time is estimated from
the measured ones (prefill quadratic in T for sdpa, through the two largest measured T, else scaled
by (T/T0)^2; decode and the rest linear; linear in B) and points over budget are listed as not run
with their estimate. On CPU,
points whose estimated prefill peak exceeds --memory-limit-gb (default: 3/4 of MemAvailable) are not
run either.

    python3 benchmarks/bench_long_context.py                       # B 1, 4; T 1k..64k; 256 decode steps
    python3 benchmarks/bench_long_context.py --smoke --out /tmp/lc # tiny sizes (CI)
    python3 benchmarks/bench_long_context.py --resume              # continue an interrupted run
    python3 benchmarks/bench_long_context.py --prefill-chunk 2048  # generate(prefill_chunk_size=2048)

Results go to benchmarks/results/long_context_<device>_<machine>.json and .md, rewritten after every
point (an interrupted run keeps what it measured); --resume skips the points already measured there.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg  # noqa: E402  (machine naming, prompts, StepClock, cache size)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("hybrid", "teacher")
DEFAULTS = {"batch": [1, 4], "context": [1024, 4096, 16384, 32768, 65536], "decode_steps": 256, "pad": 100,
            "num_layers": None}
SMOKE = {"batch": [1, 2], "context": [96, 160], "decode_steps": 8, "pad": 24, "num_layers": 2}
GATE = {"batch": 2, "context": 96, "pad": 24, "new_tokens": 12}  # T > window: the state is used
RATIO_KEYS = ("prefill_s", "prefill_peak_bytes", "ms_per_step", "decode_peak_bytes")


# ----------------------------------------------------------------------------------------------------
# memory probes (used inside a worker)
# ----------------------------------------------------------------------------------------------------
class CudaMemory:
    method = ("torch.cuda.memory_allocated / max_memory_allocated (reset_peak_memory_stats at each phase "
              "start), minus what is allocated before generate(): the resident weights")

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class CpuMemory:
    """Process RSS from the kernel: VmHWM (peak) reset by /proc/self/clear_refs, after malloc_trim."""

    method = ("peak RSS (VmHWM, /proc/self/status) of a fresh process per point, reset to the current RSS "
              "(/proc/self/clear_refs = 5) after gc + malloc_trim(0) at each phase start, minus the RSS then")

    def __init__(self):
        import ctypes

        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self.reset_peak()  # raises OSError where the kernel has no clear_refs (not Linux >= 4.0)

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {field} in /proc/self/status")

    def current(self) -> int:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return self._status("VmHWM")


class NoMemory:
    method = "not measured (needs CUDA, or Linux's /proc/self/clear_refs)"

    def current(self):
        return None

    def reset_peak(self):
        pass

    def peak(self):
        return None


def memory_probe(device: torch.device):
    if device.type == "cuda":
        return CudaMemory(device)
    try:
        return CpuMemory()
    except OSError:
        return NoMemory()


def _minus(a, b):
    return None if a is None or b is None else int(a - b)


class MemoryStepClock(bg.StepClock):
    """bench_generate's StepClock (sync, then stamp after every forward of generate()) that also reads
    memory: the prefill peak at the first stamp (then the peak is reset for the decode), the memory held
    after step 1 and after the last step, and the decode peak at the last step. `resumed` holds the time
    each call returns, so a decode step is timed from there to the next stamp, without the reads."""

    def __init__(self, device: torch.device, probe, steps: int):
        super().__init__(device)
        self.probe, self.steps, self.resumed, self.mem = probe, steps, [], {}

    def __call__(self, input_ids, scores):
        super().__call__(input_ids, scores)
        k = len(self.stamps) - 1
        if k == 0:
            self.mem["prefill_peak"] = self.probe.peak()
            self.mem["after_prefill"] = self.probe.current()
            self.probe.reset_peak()
        if k == self.steps:
            self.mem["decode_peak"] = self.probe.peak()
        if k == 1:
            self.mem["step1"] = self.probe.current()
        if k == self.steps:
            self.mem["stepN"] = self.mem["step1"] if k == 1 else self.probe.current()
        self.resumed.append(time.perf_counter())
        return scores

    def prefill_s(self, t0: float) -> float:
        return self.stamps[0] - t0

    def step_s(self) -> list[float]:
        return [self.stamps[k] - self.resumed[k - 1] for k in range(1, len(self.stamps))]


# ----------------------------------------------------------------------------------------------------
# worker side: one model, one point (or the gate), in a fresh process
# ----------------------------------------------------------------------------------------------------
def padded_prompts(tok, batch: int, context: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, context] ids and attention mask: row 0 all real tokens, rows 1.. left-padded by `pad`."""
    ids = bg.prompt_ids(tok, batch, context)
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    ids[1:, :pad] = tok.pad_token_id
    return ids.to(device), mask.to(device)


def generate_clocked(model, ids, mask, new_tokens: int, clock, pad_id: int, prefill_chunk: int | None = None):
    """generate() with the step clock; prefill_chunk: transformers' chunked prefill (the prompt goes
    through the model that many tokens at a time), None: one prefill forward."""
    from transformers import LogitsProcessorList

    chunk = {} if prefill_chunk is None else {"prefill_chunk_size": prefill_chunk}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=pad_id,
                         logits_processor=LogitsProcessorList([clock]), **chunk)
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} generate steps, the clock saw {len(clock.stamps)}")
    return out


def load(spec: dict):
    """(model, tokenizer) for the spec's model on its device; max_position_embeddings raised to T + N + 1
    where that exceeds the teacher's (RoPE extrapolation)."""
    import hf_hybrid_attn as hha
    from hf_hybrid_attn import HybridConfig
    from hf_hybrid_attn.loading import load_model

    model, tok = load_model("smollm2", dtype=spec["dtype"], num_layers=spec["num_layers"])
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    if spec["model"] == "hybrid":
        model = hha.convert(model, HybridConfig())
    native = model.config.max_position_embeddings
    model.config.max_position_embeddings = max(native, spec.get("positions", 0))
    return model.to(spec["device"]).eval(), tok, native


@torch.no_grad()
def run_gate(model, tok, device, prefill_chunk: int | None = None) -> dict:
    """The hybrid's cached greedy generation == the argmax of its uncached forward (left-padded batch).
    With chunked prefill the gate prefills in chunks too, of at most a third of its prompt, so the
    chunks meet the padding and the window."""
    ids, mask = padded_prompts(tok, GATE["batch"], GATE["context"], GATE["pad"], device)
    clock = bg.StepClock(device)
    chunk = None if prefill_chunk is None else min(prefill_chunk, GATE["context"] // 3)
    seq = generate_clocked(model, ids, mask, GATE["new_tokens"], clock, tok.pad_token_id, chunk).sequences
    full = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], dim=1)
    logits = model(seq, attention_mask=full, position_ids=(full.cumsum(1) - 1).clamp(min=0), use_cache=False).logits
    pred = logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    return {"passed": bool(torch.equal(pred, seq[:, ids.shape[1]:])),
            "what": (f"greedy generate (HybridCache) == argmax of the uncached forward, B={GATE['batch']} "
                     f"(row 1 left-padded by {GATE['pad']}), T={GATE['context']}, {GATE['new_tokens']} tokens"
                     + ("" if chunk is None else f", prefill in chunks of {chunk}"))}


@torch.no_grad()
def measure_point(model, tok, spec: dict) -> dict:
    from hf_hybrid_attn.compat import output_cache

    device, steps, chunk = torch.device(spec["device"]), spec["decode_steps"], spec.get("prefill_chunk")
    probe = memory_probe(device)
    ids, mask = padded_prompts(tok, spec["batch"], spec["context"], spec["pad"], device)
    # warm-up, padded like the point: first calls pay for allocations, kernel compiles and autotuning
    warm = min(spec["context"], 2 * GATE["context"])
    w_ids, w_mask = padded_prompts(tok, spec["batch"], warm, min(spec["pad"], warm // 2), device)
    generate_clocked(model, w_ids, w_mask, 2, bg.StepClock(device), tok.pad_token_id, chunk)
    runs = []
    t_work = time.perf_counter()
    for _ in range(spec["repeats"]):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = probe.current()
        probe.reset_peak()
        clock = MemoryStepClock(device, probe, steps)
        bg.sync(device)
        t0 = time.perf_counter()
        out = generate_clocked(model, ids, mask, steps + 1, clock, tok.pad_token_id, chunk)
        m = clock.mem
        runs.append({"prefill_s": clock.prefill_s(t0), "ms_per_step": 1000 * statistics.median(clock.step_s()),
                     "resident_bytes": base,
                     "prefill_peak_bytes": _minus(m["prefill_peak"], base),
                     "after_prefill_bytes": _minus(m["after_prefill"], base),
                     "decode_peak_bytes": _minus(m["decode_peak"], base),
                     "decode_step1_bytes": _minus(m["step1"], base),
                     "decode_stepN_bytes": _minus(m["stepN"], base),
                     "decode_delta_bytes": _minus(m["stepN"], m["step1"])})
    rec = {"status": "ok", "work_s": round(time.perf_counter() - t_work, 3), "memory_method": probe.method}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        rec[key] = None if None in vals else statistics.median(vals)
        if isinstance(rec[key], float) and key.endswith("_bytes"):
            rec[key] = int(rec[key])
    rec["prefill_s"], rec["ms_per_step"] = round(rec["prefill_s"], 4), round(rec["ms_per_step"], 3)
    rec["decode_tokens_per_s"] = round(spec["batch"] * 1000 / rec["ms_per_step"], 2)
    cache = output_cache(out)
    rec["cache_bytes"], rec["cache_type"] = bg.cache_bytes(cache), type(cache).__name__
    return rec


def worker_compute(spec: dict) -> dict:
    """One point (or the gate) in this process: its record; an error (OOM included) is recorded."""
    t_start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, tok, native = load(spec)
        load_s = time.perf_counter() - t_start
        if spec["kind"] == "gate":
            rec = run_gate(model, tok, torch.device(spec["device"]), spec.get("prefill_chunk"))
        else:
            rec = measure_point(model, tok, spec)
        rec.update(load_s=round(load_s, 3), native_positions=native,
                   max_position_embeddings=model.config.max_position_embeddings)
    except torch.OutOfMemoryError as e:
        rec = {"status": "error", "error": f"OOM: {str(e).splitlines()[0]}"}
    except Exception as e:  # recorded, the parent carries on
        rec = {"status": "error", "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
    return rec


def set_mmap_threshold(nbytes: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD, nbytes): every allocation of at least nbytes is its own mmap,
    returned to the system when freed, and the threshold no longer rises as blocks are freed (by
    default it climbs to 32 MiB, after which mid-size tensors come from the heap, whose freed holes
    stay in the RSS). Then the RSS peak is close to the live allocations' peak."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)):
        raise OSError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def _worker_entry(spec: dict, conn) -> None:
    if spec.get("mmap_threshold") is not None:
        set_mmap_threshold(spec["mmap_threshold"])
    conn.send(worker_compute(spec))
    conn.close()


# ----------------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------------
# Each point runs in a fresh process, forked from a multiprocessing forkserver that has only imported
# these modules (no model, no tensor op, no CUDA context, no threads): a point pays for loading the
# model but not for ~5 s of imports, and its memory peak is its own.
PRELOAD = ["torch", "transformers", "transformers.generation.utils", "transformers.models.llama.modeling_llama",
           "hf_hybrid_attn", "hf_hybrid_attn.modeling", "hf_hybrid_attn.loading", "hf_hybrid_attn.assets",
           "bench_generate"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        import multiprocessing as mp

        if "forkserver" in mp.get_all_start_methods():
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(PRELOAD)
        else:
            _CTX = mp.get_context("spawn")
    return _CTX


def run_worker(spec: dict) -> dict:
    """Run `spec` in a fresh process (see PRELOAD): its record plus wall_s. A worker that dies (killed
    by the kernel for memory, say) is recorded as an error."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_entry, args=(spec, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    try:
        try:
            rec = recv.recv()
        except EOFError:
            rec = None
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if rec is None:
        code = proc.exitcode
        why = " (SIGKILL: out of memory?)" if code == -9 else ""
        rec = {"status": "error", "error": (f"worker killed by signal {-code}{why}" if code and code < 0
                                            else f"worker exited with status {code} and no result")}
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


def extrapolate(refs: list[tuple[int, int, float]], B: int, T: int, quadratic: bool) -> float | None:
    """y at (B, T) from measured (b, t, y): linear in B; in T quadratic (a*t + b*t^2 through the two
    largest measured t of the same B, else y * (T/t)^2 from the largest) or linear (y * T/t).
    None without a measured point."""
    if not refs:
        return None
    same = sorted((t, y) for b, t, y in refs if b == B)
    scale = 1.0
    if not same:  # another batch size: the nearest one, scaled by B
        b_ref = min({b for b, _, _ in refs}, key=lambda b: (abs(b - B), -b))
        same = sorted((t, y) for b, t, y in refs if b == b_ref)
        scale = B / b_ref
    if quadratic and len(same) >= 2 and same[-1][0] != same[-2][0]:
        (t1, y1), (t2, y2) = same[-2:]
        det = t1 * t2 * t2 - t2 * t1 * t1
        a, b = (y1 * t2 * t2 - y2 * t1 * t1) / det, (t1 * y2 - t2 * y1) / det
        if a >= 0 and b >= 0:
            return scale * (a * T + b * T * T)
    t0, y0 = same[-1]
    return scale * y0 * (T / t0) ** (2 if quadratic else 1)


def estimate(points: list[dict], model: str, B: int, T: int) -> dict:
    """Estimated seconds and prefill peak bytes of a point from the measured points of the same model:
    the teacher's prefill (time, peak) quadratic in T, the hybrid's linear; decode and the rest linear;
    the process overhead (start-up, load) constant."""
    ok = [p for p in points if p["model"] == model and p.get("status") == "ok"]
    quad = model == "teacher"
    prefill = [(p["batch"], p["context"], p["repeats"] * p["prefill_s"]) for p in ok]
    rest = [(p["batch"], p["context"], max(p["work_s"] - p["repeats"] * p["prefill_s"], 0.0)) for p in ok]
    peak = [(p["batch"], p["context"], p["prefill_peak_bytes"]) for p in ok if p.get("prefill_peak_bytes")]
    if not ok:
        return {"seconds": None, "peak_bytes": None}
    overhead = max(statistics.median(p["wall_s"] - p["work_s"] for p in ok), 0.0)
    secs = overhead + extrapolate(prefill, B, T, quad) + extrapolate(rest, B, T, False)
    return {"seconds": round(secs, 2), "peak_bytes": extrapolate(peak, B, T, quad)}


def memory_limit_bytes(arg_gb: float | None, device: torch.device) -> int | None:
    if arg_gb is not None:
        return int(arg_gb * 1e9) if arg_gb > 0 else None
    if device.type != "cpu":
        return None  # CUDA: an OOM is caught and recorded, nothing else is at risk
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(avail * 3 / 4)


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+uncommitted changes" if dirty else "")) if sha else None


def key_of(p: dict) -> tuple:
    return (p["model"], p["batch"], p["context"])


def ratios(points: list[dict]) -> list[dict]:
    """hybrid / teacher for every (B, T) where both were measured."""
    by = {key_of(p): p for p in points if p.get("status") == "ok"}
    out = []
    for (model, B, T), h in sorted(by.items(), key=lambda kv: kv[0][1:]):
        t = by.get(("teacher", B, T))
        if model != "hybrid" or t is None:
            continue
        r = {"batch": B, "context": T}
        for k in RATIO_KEYS:
            r[k] = round(h[k] / t[k], 4) if h.get(k) is not None and t.get(k) else None
        out.append(r)
    return out


def _mib(x, signed=False):
    if x is None:
        return "–"
    return f"{x / 2**20:+.2f}" if signed else f"{x / 2**20:.1f}"


MD_FOOTNOTE = (
    "Memory columns are bytes above what was resident before generate() (weights, runtime): prefill peak = the "
    "most during the prefill; decode peak = the most during the decode steps; step 1 -> N = held after the last "
    "step minus held after the first (the hybrid should stay within allocator noise; the teacher's KV cache "
    "grows). Cache = what the generation cache holds at the end. Ratios are hybrid / teacher (below 1: the "
    "hybrid is faster or smaller).")


def render_md(res: dict) -> str:
    s = res["settings"]
    gate = res["gate"]
    gate_txt = ("passed" if gate.get("passed") else ("not run" if gate.get("passed") is None else "FAILED"))
    pos = res.get("positions") or {}
    lines = [
        f"# Long context: {res['model']}",
        "",
        f"- machine: **{res['machine']}** ({res['device']}); dtype {s['dtype']}; torch {res['torch']}, "
        f"transformers {res['transformers']}; date {res['date']}; git {res['git_commit'] or 'unknown'}",
        f"- hybrid: `convert(model, HybridConfig())` (window {s['window']}, {s['feature_map']} F={s['feature_dim']}), "
        "untrained: speed and memory do not depend on training; decode path: "
        f"{res.get('hybrid_decode_path') or '–'}. teacher: the same weights, sdpa, DynamicCache",
        f"- B rows of T tokens, rows 1..B-1 left-padded by {s['pad']}; {s['decode_steps']} greedy decode steps in one "
        f"`generate()` call; medians over the steps and over {s['repeats']} repeat(s); prompts: held-out State of "
        "the Union speeches",
        "- prefill: " + ("one forward over the whole prompt" if not s.get("prefill_chunk") else
                         f"`generate(prefill_chunk_size={s['prefill_chunk']})`: the prompt goes through the model "
                         f"{s['prefill_chunk']} tokens at a time (transformers' chunked prefill), for both models"),
        f"- positions: the teacher has {pos.get('native', '–')}; both models get max_position_embeddings = T + N + 1 "
        f"where that is more (largest set: {pos.get('largest_set', '–')}): RoPE extrapolates beyond "
        f"{pos.get('native', '–')} (fine for speed and memory; outputs there are not judged)",
        f"- memory: {res.get('memory_method') or '–'}",
        "- allocator: " + ("glibc's default (a dynamic mmap threshold: freed mid-size blocks can stay in the RSS)"
                           if not s.get("malloc_mmap_threshold") else
                           f"each point's process sets mallopt(M_MMAP_THRESHOLD, {s['malloc_mmap_threshold']}): "
                           "allocations of that size or more go back to the system when freed, so the RSS peak "
                           "follows the live memory"),
        f"- teacher budget: {s['teacher_budget_s']} s per point; memory limit (at the start): "
        f"{format(s['memory_limit_bytes'] / 1e9, '.1f') + ' GB' if s.get('memory_limit_bytes') else 'none'}",
        f"- gate: {gate_txt} ({gate.get('what', '')}{', run ' + str(gate['run']) if 'run' in gate else ''})",
    ]
    if len(res.get("runs", [])) > 1:  # a resumed file: say which run measured what (date and git above: the last)
        for r in res["runs"]:
            n = sum(p.get("run") == r["run"] for p in res["points"])
            lines.append(f"- run {r['run']}: started {r['started']}, git {r.get('git_commit') or 'unknown'}, "
                         f"transformers {r.get('transformers') or '–'}, `{' '.join(r['argv'])}`: {n} point(s)")
    if res.get("interrupted"):
        lines.append(f"- **interrupted**: {res['interrupted']}")
    by = {key_of(p): p for p in res["points"]}
    rat = {(r["batch"], r["context"]): r for r in res["ratios"]}
    for B in sorted({p["batch"] for p in res["points"]}):
        lines += ["", f"## B = {B}", "",
                  "| T | model | prefill s | prefill peak MiB | decode ms/step | decode peak MiB "
                  "| step 1 -> N MiB | cache MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for T in sorted({p["context"] for p in res["points"] if p["batch"] == B}):
            for model in MODELS:
                p = by.get((model, B, T))
                if p is None:
                    continue
                if p.get("status") != "ok":
                    lines.append(f"| {T} | {model} | {p['status']}: {p.get('reason') or p.get('error')} | | | | | |")
                    continue
                lines.append(f"| {T} | {model} | {p['prefill_s']:.3f} | {_mib(p['prefill_peak_bytes'])} "
                             f"| {p['ms_per_step']:.2f} | {_mib(p['decode_peak_bytes'])} "
                             f"| {_mib(p['decode_delta_bytes'], signed=True)} | {_mib(p['cache_bytes'])} |")
            r = rat.get((B, T))
            if r:
                f = [f"{r[k]:.3f}x" if r[k] is not None else "–" for k in RATIO_KEYS]
                lines.append(f"| {T} | hybrid / teacher | {f[0]} | {f[1]} | {f[2]} | {f[3]} | | |")
    not_run = [p for p in res["points"] if p.get("status") != "ok"]
    if not_run:
        lines += ["", "## Not run / failed", ""]
        lines += [f"- {p['model']} B={p['batch']} T={p['context']}: {p['status']}: {p.get('reason') or p.get('error')}"
                  for p in not_run]
    return "\n".join([*lines, "", MD_FOOTNOTE]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=None, help=f"default {DEFAULTS['batch']}")
    ap.add_argument("--context", type=int, nargs="+", default=None, help=f"default {DEFAULTS['context']}")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--decode-steps", type=int, default=None, help=f"default {DEFAULTS['decode_steps']}")
    ap.add_argument("--pad", type=int, default=None,
                    help=f"left padding of rows 1..B-1 (default {DEFAULTS['pad']}; must be < every T)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--teacher-budget-s", type=float, default=600.0,
                    help="run a teacher point only if its estimated time is within this")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="skip points whose estimated prefill peak exceeds this (default: CPU 3/4 of "
                         "MemAvailable, CUDA none; 0 = none)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-layers", type=int, default=None, help="keep the first N layers (smoke tests only)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="generate(prefill_chunk_size=N): transformers' chunked prefill, the prompt N tokens at a "
                         "time (results file suffix _prefillN); default: one prefill forward")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="CPU (glibc): each point's process sets mallopt(M_MMAP_THRESHOLD, BYTES), so allocations "
                         "of at least BYTES are returned to the system when freed and the RSS peak follows the live "
                         "memory instead of what the allocator keeps (results file suffix _mmapBYTES); default: "
                         "glibc's own, dynamic threshold, as users run")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny sizes for CI: {SMOKE} (explicit options win)")
    ap.add_argument("--resume", action="store_true", help="keep the points already measured in the results file")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    for k in ("batch", "context", "decode_steps", "pad", "num_layers"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    for name in ("batch", "context"):
        if any(x < 1 for x in getattr(args, name)):
            raise SystemExit(f"--{name}: expected integers >= 1, got {getattr(args, name)}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise SystemExit(f"--prefill-chunk: expected an integer >= 1, got {args.prefill_chunk}")
    if args.malloc_mmap_threshold is not None and args.malloc_mmap_threshold < 1:
        raise SystemExit(f"--malloc-mmap-threshold: expected bytes >= 1, got {args.malloc_mmap_threshold}")
    if args.decode_steps < 1 or args.repeats < 1:
        raise SystemExit("--decode-steps and --repeats: expected integers >= 1")
    if max(args.batch) > 1 and not 0 <= args.pad < min(args.context):
        raise SystemExit(f"--pad: expected 0 <= pad < every context, got {args.pad} for {args.context}")

    import transformers

    from hf_hybrid_attn import HybridConfig
    from hf_hybrid_attn.kernels.dispatch import resolve_backend

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    hcfg = HybridConfig()
    settings = {"teacher": "smollm2", "num_layers": args.num_layers, "device": device.type, "dtype": dtype,
                "decode_steps": args.decode_steps, "pad": args.pad, "repeats": args.repeats,
                "window": hcfg.window, "feature_map": hcfg.feature_map, "feature_dim": hcfg.feature_dim,
                "prefill_chunk": args.prefill_chunk, "malloc_mmap_threshold": args.malloc_mmap_threshold}
    machine = bg.machine_name(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"long_context_{device.type}_{bg.slug(machine)}"
            + ("" if args.prefill_chunk is None else f"_prefill{args.prefill_chunk}")
            + ("" if args.malloc_mmap_threshold is None else f"_mmap{args.malloc_mmap_threshold}"))
    if args.malloc_mmap_threshold is not None and device.type != "cpu":
        raise SystemExit("--malloc-mmap-threshold: CPU only (it sets glibc's allocator; CUDA memory is counted by torch)")
    js_path = out / f"{stem}.json"
    run = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "argv": sys.argv[1:] if argv is None else list(argv), "git_commit": git_commit(),
           "torch": torch.__version__, "transformers": transformers.__version__}
    res = None
    if args.resume and js_path.exists():
        res = json.loads(js_path.read_text())
        old = {k: res["settings"].get(k) for k in settings}  # a key added since the file was written: None
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise SystemExit(f"--resume: {js_path} was measured with other settings (old, new): {diff}")
    if res is None:
        res = {"benchmark": "long_context", "points": [], "runs": []}
    run["run"] = len(res["runs"]) + 1
    res["runs"].append(run)
    res.update({
        "model": "SmolLM2-135M-Instruct (Q4_1, dequantized)" + (f", first {args.num_layers} layers" if args.num_layers else ""),
        "machine": machine, "device": device.type, "torch": run["torch"],
        "transformers": run["transformers"], "git_commit": run["git_commit"], "date": run["started"],
        "hybrid_decode_path": ("fused Triton decode kernel (kernels/triton_decode.py)"
                               if resolve_backend("auto", device) == "triton"
                               else "PyTorch (kernels/chunked.py prefill, HybridCache steps)"),
        "settings": {**settings, "teacher_budget_s": args.teacher_budget_s,
                     "memory_limit_bytes": memory_limit_bytes(args.memory_limit_gb, device),
                     "hybrid_config": hcfg.to_dict()},
    })
    res.pop("interrupted", None)

    def write() -> None:
        ok = [p for p in res["points"] if p.get("status") == "ok"]
        if ok:
            res["memory_method"] = ok[-1].get("memory_method")
            res["positions"] = {"native": ok[-1]["native_positions"],
                                "largest_set": max(p["max_position_embeddings"] for p in ok)}
        res["ratios"] = ratios(res["points"])
        tmp = js_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(js_path)
        (out / f"{stem}.md").write_text(render_md(res))

    common = {"device": str(device), "dtype": dtype, "num_layers": args.num_layers, "prefill_chunk": args.prefill_chunk,
              "mmap_threshold": args.malloc_mmap_threshold}
    try:
        if "hybrid" in args.models:
            res["gate"] = {**run_gate_worker({**common, "kind": "gate", "model": "hybrid"}), "run": run["run"]}
        elif "gate" not in res:  # a resumed file keeps the gate of the run that timed its hybrid points
            res["gate"] = {"passed": None, "what": "not run: the hybrid is not in --models"}
        print(f"[gate] {res['gate']}", flush=True)
        if res["gate"].get("passed") is False:
            write()
            print("[gate] FAILED: nothing is timed", file=sys.stderr)
            return 1
        write()
        for B in args.batch:
            for T in sorted(args.context):
                for model in args.models:
                    run_one(res, args, common, model, B, T, run["run"])
                    write()
    except KeyboardInterrupt:
        res["interrupted"] = f"run {run['run']} interrupted (SIGINT) after {len(res['points'])} points"
        write()
        print(f"[interrupted] results kept in {js_path}", file=sys.stderr)
        return 130
    write()
    print(render_md(res))
    print(f"wrote {js_path} and .md")
    return 0


def run_gate_worker(spec: dict) -> dict:
    rec = run_worker(spec)
    if rec.get("status") == "error":
        return {"passed": False, "what": f"the gate could not run: {rec['error']}"}
    return {"passed": rec["passed"], "what": rec["what"], "seconds": rec["wall_s"]}


def run_one(res: dict, args, common: dict, model: str, B: int, T: int, run_id: int) -> None:
    """Measure (model, B, T) unless it is measured already (--resume) or over the teacher's budget or the
    memory limit; the point replaces any earlier record of it in res['points']."""
    points = res["points"]
    old = next((p for p in points if key_of(p) == (model, B, T)), None)
    if old is not None and old.get("status") == "ok":
        print(f"[resume] {model} B={B} T={T}: measured in run {old.get('run')}, kept", flush=True)
        return
    point = {"model": model, "batch": B, "context": T, "pad": args.pad if B > 1 else 0}
    est = estimate(points, model, B, T)
    point["estimated_s"] = est["seconds"]
    limit = memory_limit_bytes(args.memory_limit_gb, torch.device(common["device"]))  # MemAvailable now
    failed = [p for p in points if p["model"] == model and p["batch"] == B and p["context"] < T
              and p.get("status") == "error"]
    if failed:
        point.update(status="not run", reason=f"a shorter context failed (T={failed[0]['context']}: {failed[0]['error']})")
    elif model == "teacher" and est["seconds"] is not None and est["seconds"] > args.teacher_budget_s:
        point.update(status="not run", reason=f"estimated {est['seconds']:.0f} s > budget {args.teacher_budget_s:g} s")
    elif limit and est["peak_bytes"] is not None and est["peak_bytes"] > limit:
        point.update(status="not run",
                     reason=f"estimated prefill peak {est['peak_bytes'] / 1e9:.1f} GB > memory limit {limit / 1e9:.1f} GB")
    else:
        spec = {**common, "kind": "point", "model": model, "batch": B, "context": T, "pad": point["pad"],
                "decode_steps": args.decode_steps, "repeats": args.repeats, "positions": T + args.decode_steps + 1}
        print(f"[{model}] B={B} T={T}: running (estimate {est['seconds']} s)", flush=True)
        point.update(run_worker(spec))
        point.update(repeats=args.repeats, decode_steps=args.decode_steps)
    point.update(run=run_id, measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    print(f"[{model}] B={B} T={T}: {point}", flush=True)
    if old is not None:
        points[points.index(old)] = point
    else:
        points.append(point)


if __name__ == "__main__":
    sys.exit(main())
