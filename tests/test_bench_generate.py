"""benchmarks/bench_generate.py end to end on the real teacher cut to 2 layers (CPU): the gate passes,
both caches are measured, and the hybrid cache does not grow with the context while the KV cache does."""

import importlib.util
import json
from pathlib import Path

import pytest

from hf_hybrid_attn.assets import AssetMissingError, teacher_gguf_path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


def test_bench_generate_smoke(tmp_path):
    try:
        teacher_gguf_path()
    except AssetMissingError as e:
        pytest.skip(f"SmolLM2 teacher asset missing: {e}")
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--num-layers", "2", "--batch", "1", "2", "--context", "80", "160", "--new-tokens", "3",
                     "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("generate_cpu_*.json")
    res = json.loads(js.read_text())
    assert res["gate"]["passed"] and "first 2 layers" in res["model"]
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().count("\n| ") == 1 + 4  # header + 4 points
    by = {(p["batch"], p["context"]): p for p in res["points"]}
    assert set(by) == {(1, 80), (1, 160), (2, 80), (2, 160)}
    for B in (1, 2):
        short, long = by[(B, 80)], by[(B, 160)]
        assert short["hybrid"]["cache_type"] == "HybridCache" and short["teacher"]["cache_type"] == "DynamicCache"
        assert short["hybrid"]["cache_bytes"] == long["hybrid"]["cache_bytes"]
        assert long["teacher"]["cache_bytes"] > short["teacher"]["cache_bytes"]
        for p in (short, long):
            assert p["hybrid"]["decode_tokens_per_s"] > 0 and p["teacher"]["decode_tokens_per_s"] > 0
    assert by[(2, 80)]["hybrid"]["cache_bytes"] == 2 * by[(1, 80)]["hybrid"]["cache_bytes"]
