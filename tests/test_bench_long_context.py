"""benchmarks/bench_long_context.py on the real teacher cut to 2 layers (CPU, --smoke): the files are
written and parse, every point of the grid is measured with every field, a tiny teacher budget leaves
the teacher's later points 'not run' with their estimate, --resume keeps the measured points (their run
number and timestamp) and measures only the rest, a failing gate times nothing. Also the two
measuring pieces on their own: the CPU peak-RSS probe against a known allocation, and the step clock
(memory reads are not timed) against a fake clock."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from hf_hybrid_attn.assets import AssetMissingError, teacher_gguf_path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_long_context.py"
FIELDS = ("prefill_s", "ms_per_step", "decode_tokens_per_s", "resident_bytes", "prefill_peak_bytes",
          "decode_peak_bytes", "decode_step1_bytes", "decode_stepN_bytes", "decode_delta_bytes", "cache_bytes",
          "work_s", "wall_s", "load_s", "max_position_embeddings")
GRID = {(m, B, T) for m in ("hybrid", "teacher") for B in (1, 2) for T in (96, 160)}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # the workers' target is pickled by reference: the module must be importable under its name
    sys.modules["bench_long_context"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    try:
        teacher_gguf_path()
    except AssetMissingError as e:
        pytest.skip(f"SmolLM2 teacher asset missing: {e}")
    module = load_bench()
    yield module
    sys.modules.pop("bench_long_context", None)


@pytest.fixture(scope="module")
def runs(bench, tmp_path_factory):
    """Run 1: --smoke with a 1 ms teacher budget (only the teacher's first point runs). Run 2: --resume
    with the default budget and only the teacher: the missing teacher points are measured, nothing else."""
    out = tmp_path_factory.mktemp("long-context")
    rc1 = bench.main(["--smoke", "--device", "cpu", "--teacher-budget-s", "0.001", "--out", str(out)])
    (js,) = out.glob("long_context_cpu_*.json")
    first = json.loads(js.read_text())
    first_md = js.with_suffix(".md").read_text()
    rc2 = bench.main(["--smoke", "--device", "cpu", "--resume", "--models", "teacher", "--out", str(out)])
    second = json.loads(js.read_text())
    return {"out": out, "js": js, "rc": (rc1, rc2), "first": first, "first_md": first_md, "second": second,
            "second_md": js.with_suffix(".md").read_text()}


def by_key(res):
    return {(p["model"], p["batch"], p["context"]): p for p in res["points"]}


def test_budget_leaves_later_teacher_points_not_run(runs):
    assert runs["rc"][0] == 0
    res = runs["first"]
    assert res["gate"]["passed"] is True and "left-padded" in res["gate"]["what"]
    assert "first 2 layers" in res["model"] and res["settings"]["decode_steps"] == 8
    pts = by_key(res)
    assert set(pts) == GRID
    ok = {k for k, p in pts.items() if p["status"] == "ok"}
    assert ok == {k for k in GRID if k[0] == "hybrid"} | {("teacher", 1, 96)}
    for k in GRID - ok:
        assert pts[k]["status"] == "not run"
        m = re.fullmatch(r"estimated (\d+) s > budget 0\.001 s", pts[k]["reason"])
        assert m and int(m.group(1)) >= 0, pts[k]["reason"]
        assert f"teacher B={k[1]} T={k[2]}: not run: estimated" in runs["first_md"]
    assert [(r["batch"], r["context"]) for r in res["ratios"]] == [(1, 96)]


def test_resume_measures_only_the_missing_points(runs):
    assert runs["rc"][1] == 0
    first, second = by_key(runs["first"]), by_key(runs["second"])
    assert [r["run"] for r in runs["second"]["runs"]] == [1, 2]
    for k, p in first.items():
        if p["status"] == "ok":  # kept as measured in run 1, not measured again
            assert second[k] == p and second[k]["run"] == 1
        else:
            assert second[k]["run"] == 2 and second[k]["status"] == "ok"
    assert runs["second"]["gate"]["passed"] is True and runs["second"]["gate"]["run"] == 1  # run 2 timed no hybrid


def test_every_point_measured_with_every_field(runs):
    res = runs["second"]
    pts = by_key(res)
    assert set(pts) == GRID
    for k, p in pts.items():
        assert p["status"] == "ok", (k, p)
        for f in FIELDS:
            assert isinstance(p[f], (int, float)) and not isinstance(p[f], bool), (k, f, p.get(f))
        assert p["prefill_s"] > 0 and p["ms_per_step"] > 0 and p["prefill_peak_bytes"] > 0
        assert p["pad"] == (24 if k[1] > 1 else 0)
        assert p["cache_type"] == ("HybridCache" if k[0] == "hybrid" else "DynamicCache")
        assert isinstance(p["decode_delta_bytes"], int)
    for B in (1, 2):  # the hybrid cache does not grow with the context, the KV cache does
        assert pts[("hybrid", B, 96)]["cache_bytes"] == pts[("hybrid", B, 160)]["cache_bytes"]
        assert pts[("teacher", B, 160)]["cache_bytes"] > pts[("teacher", B, 96)]["cache_bytes"]
        for T in (96, 160):  # the hybrid's target: constant memory while decoding
            assert abs(pts[("hybrid", B, T)]["decode_delta_bytes"]) < 2**20
    assert sorted((r["batch"], r["context"]) for r in res["ratios"]) == [(1, 96), (1, 160), (2, 96), (2, 160)]
    for r in res["ratios"]:
        assert all(r[k] is not None and r[k] > 0 for k in ("prefill_s", "ms_per_step", "prefill_peak_bytes"))
    assert res["memory_method"].startswith("peak RSS (VmHWM")
    assert res["positions"]["native"] == 8192 and res["torch"] and res["transformers"] and res["git_commit"]


def test_markdown_report(runs):
    md = runs["second_md"]
    assert md.startswith("# Long context: SmolLM2-135M-Instruct")
    assert "gate: passed" in md and "untrained" in md and "RoPE extrapolates" in md
    n1 = sum(p["status"] == "ok" for p in runs["first"]["points"])  # a resumed file names what each run measured
    for r, n in ((1, n1), (2, len(GRID) - n1)):
        assert re.search(rf"- run {r}: started [^,]+, git [0-9a-f]+[^,]*, transformers [0-9.]+.*`--smoke .*`: {n} point\(s\)", md), md
    for B in (1, 2):
        section = md.split(f"## B = {B}\n")[1].split("\n## ")[0]
        rows = [ln for ln in section.splitlines() if ln.startswith("| 96 ") or ln.startswith("| 160 ")]
        assert len(rows) == 6, section  # per T: hybrid, teacher, hybrid / teacher
        assert sum("| hybrid / teacher |" in r for r in rows) == 2
    assert "Not run" not in md


def test_resume_refuses_other_settings(bench, runs):
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(["--smoke", "--device", "cpu", "--resume", "--decode-steps", "4", "--out", str(runs["out"])])


def test_failing_gate_times_nothing(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_gate_worker", lambda spec: {"passed": False, "what": "forced failure"})
    monkeypatch.setattr(bench, "run_worker", lambda spec: pytest.fail("a point was timed after a failed gate"))
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 1
    (js,) = tmp_path.glob("long_context_cpu_*.json")
    res = json.loads(js.read_text())
    assert res["points"] == [] and res["gate"]["passed"] is False
    assert "gate: FAILED" in js.with_suffix(".md").read_text()


def test_cpu_peak_probe_sees_a_known_allocation(bench):
    try:
        probe = bench.CpuMemory()
    except OSError as e:
        pytest.skip(f"no /proc/self/clear_refs here: {e}")
    base = probe.current()
    probe.reset_peak()
    x = torch.ones(50 * 2**20)  # 200 MiB of float32, every page touched
    del x
    grown = probe.peak() - base
    assert 195 * 2**20 < grown < 240 * 2**20, grown / 2**20
    assert probe.current() - base < 20 * 2**20  # freed and given back: not held any more
    probe.reset_peak()
    assert probe.peak() - base < 20 * 2**20  # the reset forgets the earlier peak


def test_step_clock_times_steps_without_the_memory_reads(bench, monkeypatch):
    """Prefill = start -> first logits; a step = from the clock's return to the next logits, so the probe's
    reads (which cost 1 s each on this fake clock) are not in any time."""
    now = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    class Probe:
        def current(self):
            now[0] += 1.0
            return 1000 * len(clock.stamps)

        def peak(self):
            now[0] += 1.0
            return 5000 + len(clock.stamps)

        def reset_peak(self):
            now[0] += 1.0

    steps = 4
    clock = bench.MemoryStepClock(torch.device("cpu"), Probe(), steps)
    t0 = now[0]
    now[0] += 5.0  # the prefill forward
    clock(None, None)
    for _ in range(steps):
        now[0] += 0.25  # a decode forward
        clock(None, None)
    assert clock.prefill_s(t0) == 5.0 and clock.step_s() == [0.25] * steps
    assert clock.mem == {"prefill_peak": 5001, "after_prefill": 1000, "step1": 2000, "stepN": 5000,
                         "decode_peak": 5005}


def test_chunked_prefill_run_has_its_own_file_and_gate(bench, tmp_path):
    """--prefill-chunk N: generate(prefill_chunk_size=N) for the points, the gate prefills in chunks too
    (at most a third of its prompt), and the results go to their own _prefillN file."""
    out = tmp_path / "lc"
    rc = bench.main(["--smoke", "--device", "cpu", "--models", "hybrid", "--batch", "1", "--context", "96",
                     "--prefill-chunk", "40", "--out", str(out)])
    assert rc == 0
    (js,) = out.glob("long_context_cpu_*.json")
    assert js.name.endswith("_prefill40.json")
    res = json.loads(js.read_text())
    assert res["settings"]["prefill_chunk"] == 40
    assert res["gate"]["passed"] is True and res["gate"]["what"].endswith("prefill in chunks of 32")
    (p,) = res["points"]
    assert p["status"] == "ok" and p["cache_type"] == "HybridCache" and p["prefill_peak_bytes"] > 0
    assert "`generate(prefill_chunk_size=40)`" in js.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="--prefill-chunk: expected an integer >= 1"):
        bench.main(["--smoke", "--device", "cpu", "--prefill-chunk", "0", "--out", str(out)])


MMAP_PROBE = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import torch
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI2
if sys.argv[2] == "fixed":
    import bench_long_context
    bench_long_context.set_mmap_threshold(128 * 1024)
a = torch.empty(2**20, dtype=torch.uint8)
del a  # glibc's default: freeing this mmapped block raises the threshold above its size
before = libc.mallinfo2().hblkhd
b = torch.empty(2**20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)  # bytes newly mapped for b
"""


@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_mmap_threshold_keeps_mid_size_tensors_out_of_the_heap(mode):
    """What --malloc-mmap-threshold relies on (glibc): by default, once a 1 MiB block has been freed the
    next one comes from the heap (where freed holes stay in the RSS); with the threshold set in the
    process it is its own mapping again, returned to the system when freed."""
    import subprocess

    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError) as e:
        pytest.skip(f"not glibc >= 2.33 (no mallinfo2): {e}")
    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, str(SCRIPT.parent), mode], capture_output=True,
                         text=True, check=True)
    mapped = int(out.stdout.split()[-1])
    if mode == "fixed":
        assert mapped >= 2**20, mapped
    else:
        assert mapped < 2**20, mapped


def test_mmap_threshold_run_has_its_own_file(bench, tmp_path):
    """--malloc-mmap-threshold N: recorded in the settings (a resume with another value is refused), said
    in the md, results in their own _mmapN file; refused off CPU and below 1."""
    out = tmp_path / "lc"
    args = ["--smoke", "--device", "cpu", "--models", "hybrid", "--batch", "1", "--context", "96", "--out", str(out)]
    assert bench.main([*args, "--malloc-mmap-threshold", "131072"]) == 0
    (js,) = out.glob("long_context_cpu_*.json")
    assert js.name.endswith("_mmap131072.json")
    res = json.loads(js.read_text())
    assert res["settings"]["malloc_mmap_threshold"] == 131072
    (p,) = res["points"]
    assert p["status"] == "ok" and p["prefill_peak_bytes"] > 0
    assert "mallopt(M_MMAP_THRESHOLD, 131072)" in js.with_suffix(".md").read_text()
    assert bench.main([*args, "--malloc-mmap-threshold", "131072", "--resume"]) == 0  # same settings: kept
    assert json.loads(js.read_text())["points"][0]["run"] == 1
    with pytest.raises(SystemExit, match="--malloc-mmap-threshold: expected bytes >= 1"):
        bench.main([*args, "--malloc-mmap-threshold", "0"])
    with pytest.raises(SystemExit, match="CPU only"):
        bench.main([*args[:2], "meta", *args[3:], "--malloc-mmap-threshold", "4096"])
