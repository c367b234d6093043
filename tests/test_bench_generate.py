"""benchmarks/bench_generate.py end to end on the real teacher cut to 2 layers (CPU): the gate passes,
both caches are measured, and the hybrid cache does not grow with the context while the KV cache does."""

import importlib.util
import json
from pathlib import Path

import pytest

from hf_hybrid_attn.assets import AssetMissingError, teacher_gguf_path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


@pytest.fixture
def bench():
    """The script as a fresh module (tests may monkeypatch it)."""
    try:
        teacher_gguf_path()
    except AssetMissingError as e:
        pytest.skip(f"SmolLM2 teacher asset missing: {e}")
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_smoke(tmp_path, bench):
    rc = bench.main(["--num-layers", "2", "--batch", "1", "2", "--context", "80", "160", "--new-tokens", "12", "--repeats", "3",
                     "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("generate_cpu_*.json")
    res = json.loads(js.read_text())
    assert res["gate"]["passed"] and "first 2 layers" in res["model"]
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert md.count("\n| ") == 1 + 4  # header + 4 points
    assert "skipped" not in res
    by = {(p["batch"], p["context"]): p for p in res["points"]}
    assert set(by) == {(1, 80), (1, 160), (2, 80), (2, 160)}
    for B in (1, 2):
        short, long = by[(B, 80)], by[(B, 160)]
        assert short["hybrid"]["cache_type"] == "HybridCache" and short["teacher"]["cache_type"] == "DynamicCache"
        assert short["hybrid"]["cache_bytes"] == long["hybrid"]["cache_bytes"]
        assert long["teacher"]["cache_bytes"] > short["teacher"]["cache_bytes"]
        for p in (short, long):
            for name in ("hybrid", "teacher"):  # decode_s is generate(N+1) - generate(1), not clamped
                assert p[name]["decode_s"] > 0 and "error" not in p[name]
                assert p[name]["decode_tokens_per_s"] == pytest.approx(p["batch"] * 12 / p[name]["decode_s"], rel=0.01)
    assert by[(2, 80)]["hybrid"]["cache_bytes"] == 2 * by[(1, 80)]["hybrid"]["cache_bytes"]


def test_bench_generate_times_nothing_when_the_gate_fails(tmp_path, monkeypatch, bench):
    monkeypatch.setattr(bench, "gate", lambda *a: {"passed": False, "what": "forced failure"})
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("a point was timed after a failed gate"))
    rc = bench.main(["--num-layers", "1", "--batch", "1", "--context", "80", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 1
    (js,) = tmp_path.glob("generate_cpu_*.json")
    res = json.loads(js.read_text())
    assert res["points"] == [] and res["gate"]["passed"] is False
    assert "gate: FAILED" in js.with_suffix(".md").read_text()
