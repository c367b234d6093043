"""benchmarks/gpu_evidence.sh --dry-run: every tier at toy sizes on CPU (Triton interpreter), every
results file written and parsed, the summary lists every tier, CUDA-only parts named as skipped.

One run of the script (~2-3 min on 2 cores) is shared by the tests of this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_evidence.sh"
TIER_FILES = {1: "t1_correctness.json", 2: "t2_kernels.json", 3: "t3_generate.json", 4: "t4_conversion.json"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence-out")
    work = tmp_path_factory.mktemp("evidence-work")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PY"] = sys.executable
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    return run, out, work


def test_dry_run_exits_zero_and_writes_every_file(dry_run):
    run, out, _ = dry_run
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["summary.md", "summary.json", "logs.tar.gz", *TIER_FILES.values()]), names
    assert len(names) <= 8  # the GPU machine sends back at most 8 files
    for name in names:
        if name.endswith(".json"):
            json.loads((out / name).read_text())
    assert (out / "summary.md").read_text().startswith("# GPU evidence (DRY RUN")
    with tarfile.open(out / "logs.tar.gz") as tar:
        members = tar.getnames()
    assert "logs/meta.json" in members and any(m.startswith("logs/t4/results/diag_") for m in members)


def test_summary_lists_every_tier(dry_run):
    run, out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    tiers = {t["tier"]: t for t in summary["tiers"]}
    assert sorted(tiers) == [0, 1, 2, 3, 4]
    for n, name in TIER_FILES.items():
        assert tiers[n]["files"] == [name]
        assert tiers[n]["status"].startswith("pass"), tiers[n]
        assert isinstance(tiers[n]["seconds"], (int, float))
    md = (out / "summary.md").read_text()
    for label in ("0 setup", "1 correctness", "2 kernel benchmark", "3 long context and generation", "4 conversion"):
        assert f"| {label} |" in md
    printed = run.stdout[run.stdout.index("=== GPU evidence summary ==="):]
    for n in range(5):
        assert f"\n{n} " in printed


def test_cuda_only_parts_are_named_as_skipped_not_passed(dry_run):
    _, out, _ = dry_run
    t1 = json.loads((out / TIER_FILES[1]).read_text())
    # no CUDA: the gpu-marked tests all skip, and are reported as skipped
    assert t1["pytest"]["status"] == "skipped (needs CUDA)"
    assert t1["pytest"]["totals"]["passed"] == 0 and t1["pytest"]["totals"]["skipped"] > 0
    assert any("bfloat16: skipped" in s for s in t1["skipped"]) and any("float16: skipped" in s for s in t1["skipped"])
    fuzz = t1["fuzz"]
    assert fuzz["status"] == "pass" and fuzz["n_cases"] >= 4 and list(fuzz["max_errors"]) == ["float32"]
    assert set(fuzz["summary"]["float32"]) == {"hybrid", "hybrid+covers", "swa_only", "linear_only"}
    t2 = json.loads((out / TIER_FILES[2]).read_text())
    assert any("sdpa_flash" in s and "need CUDA" in s for s in t2["skipped"])
    assert any(s.startswith("fla rows: not available") for s in t2["skipped"])
    assert t2["gates"]["hybrid_triton"]["status"] == "pass"
    assert len(t2["ptxas_sm90_compile_check"]) == 4 and all("spill_bytes" in r for r in t2["ptxas_sm90_compile_check"])
    t3 = json.loads((out / TIER_FILES[3]).read_text())
    assert t3["generate"]["gate"]["passed"] and t3["generate"]["points"]
    assert t3["long_context"]["status"] == "not available" or (ROOT / "benchmarks" / "bench_long_context.py").exists()
    assert any("need CUDA" in s for s in t3["skipped"])
    t4 = json.loads((out / TIER_FILES[4]).read_text())
    assert set(t4["recipes"]) == {"lolcats", "ssd"}
    for rec in t4["recipes"].values():
        assert rec["convert"]["status"] == "ok" and rec["training_log_complete"]
        assert rec["diagnose"]["status"] == "ok" and rec["diagnostics"]["perplexity"]
    assert t4["plan"]["tokens_per_recipe"] > 0 and t4["summary_md"]
    summary = json.loads((out / "summary.json").read_text())
    skipped = {t["tier"]: " ".join(t["skipped"]) for t in summary["tiers"]}
    for n in (1, 2, 3, 4):
        assert "skipped" in skipped[n] or "not available" in skipped[n] or "dry run" in skipped[n], skipped[n]


def test_results_files_and_status_helpers(tmp_path):
    """The collectors' status logic without running anything."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_evidence as ev
    finally:
        sys.path.pop(0)
    assert ev._combine(["ok", "pass", "skipped (needs CUDA)"]) == "pass"
    assert ev._combine(["ok", "timeout"]) == "partial (timeout)"
    assert ev._combine(["pass", "FAIL", "timeout"]) == "FAIL"
    assert ev._combine(["error (exit 2)", "ok"]) == "error (exit 2)"
    assert ev._combine(["skipped: teacher not present (see benchmarks/README.md)"]).startswith("skipped: teacher")
    # a tier whose teacher is absent records the skip instead of failing
    logs = tmp_path / "logs"
    (logs / "t4").mkdir(parents=True)
    (logs / "t4" / "teacher_missing.txt").write_text("teacher not present (see benchmarks/README.md)\n")
    res = ev.collect_t4(logs, dry=False)
    assert res["status"] == "skipped: teacher not present (see benchmarks/README.md)"
