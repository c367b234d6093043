"""benchmarks/bench_generate.py end to end on the real teacher cut to 2 layers (CPU): the gate passes,
both caches are measured, and the hybrid cache does not grow with the context while the KV cache does."""

import json

import pytest
import torch

from conftest import load_teacher_benchmark


@pytest.fixture
def bench():
    return load_teacher_benchmark("bench_generate")


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
            for name in ("hybrid", "teacher"):  # prefill and decode both timed inside one generate() call
                assert p[name]["decode_s"] > 0 and p[name]["prefill_s"] > 0 and "error" not in p[name]
    assert by[(2, 80)]["hybrid"]["cache_bytes"] == 2 * by[(1, 80)]["hybrid"]["cache_bytes"]


def test_timed_generate_splits_prefill_and_decode_inside_one_call(bench, monkeypatch):
    """The step clock: prefill = start -> first forward's logits, decode = first -> last logits
    (new_tokens - 1 steps), read off a fake clock that advances by known amounts."""
    now = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    seen = {}

    class FakeModel:
        def generate(self, ids, max_new_tokens, logits_processor, **kwargs):
            seen.update(kwargs, max_new_tokens=max_new_tokens)
            now[0] += 5.0  # the prefill forward
            for step in range(max_new_tokens):
                now[0] += 0.25 if step else 0.0  # each decode forward
                logits_processor[0](ids, None)
            return "out"

    prefill_s, decode_s, out = bench.timed_generate(FakeModel(), torch.ones(1, 3, dtype=torch.long), 9)
    assert (prefill_s, decode_s, out) == (5.0, 2.0, "out")
    assert seen["max_new_tokens"] == seen["min_new_tokens"] == 9 and seen["do_sample"] is False

    class ShortModel(FakeModel):  # stops early (EOS): the clock must notice, not report a shorter decode
        def generate(self, ids, max_new_tokens, logits_processor, **kwargs):
            return super().generate(ids, max_new_tokens - 1, logits_processor, **kwargs)

    with pytest.raises(RuntimeError, match="expected 9 generate steps"):
        bench.timed_generate(ShortModel(), torch.ones(1, 3, dtype=torch.long), 9)


def test_bench_generate_times_nothing_when_the_gate_fails(tmp_path, monkeypatch, bench):
    monkeypatch.setattr(bench, "gate", lambda *a, **k: {"passed": False, "what": "forced failure"})
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("a point was timed after a failed gate"))
    rc = bench.main(["--num-layers", "1", "--batch", "1", "--context", "80", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 1
    (js,) = tmp_path.glob("generate_cpu_*.json")
    res = json.loads(js.read_text())
    assert res["points"] == [] and res["gate"]["passed"] is False
    assert "gate: FAILED" in js.with_suffix(".md").read_text()


def test_bench_generate_compiled_models(tmp_path, bench):
    """The compiled variants (generate(cache_implementation='static') with a CompileConfig): gated
    against the eager hybrid, warmed up per point, timed, and reported in their own table and file.
    aot_eager here (inductor's C++ build would cost minutes on this CI's two cores)."""
    import torch._dynamo

    torch._dynamo.reset()
    rc = bench.main(["--num-layers", "2", "--batch", "1", "--context", "80", "--new-tokens", "6", "--device", "cpu",
                     "--models", "hybrid", "hybrid_compiled", "teacher_compiled", "--compile-backend", "aot_eager",
                     "--out", str(tmp_path)])
    torch._dynamo.reset()
    assert rc == 0
    (js,) = tmp_path.glob("generate_cpu_*_compiled.json")
    res = json.loads(js.read_text())
    assert res["gate"]["passed"] and "compiled generate" in res["gate"]["what"]
    assert res["compile_backend"] == "aot_eager"
    (p,) = res["points"]
    assert p["hybrid_compiled"]["cache_type"] == "HybridCache" and p["teacher_compiled"]["cache_type"] == "StaticCache"
    assert p["hybrid_compiled"]["cache_bytes"] == p["hybrid"]["cache_bytes"]
    assert all(p[name]["decode_s"] > 0 for name in ("hybrid", "hybrid_compiled", "teacher_compiled"))
    md = js.with_suffix(".md").read_text()
    assert "Compiled decoding" in md and "| 1 | 80 |" in md.split("Compiled decoding")[1]
