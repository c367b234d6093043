"""benchmarks/bench_decode_step.py on the real teacher's layer 0 (CPU, --smoke sizes): it writes both
results files, times both layers at every context, and counts their ops. The hybrid layer's op count
is deterministic, and on CPU an eager decode step costs about a dispatch per op, so it is bounded
here: a change that adds ops to the step must raise the bound knowingly."""

import json

import pytest

from conftest import load_teacher_benchmark

#: top-level compute ops (views excluded) of one hybrid layer-0 attention call for one new token:
#: 60 when this test was written (4 projections, RoPE, the feature maps, the input check, the step)
MAX_HYBRID_COMPUTE_OPS = 64


@pytest.fixture
def bench():
    return load_teacher_benchmark("bench_decode_step")


def test_bench_decode_step_smoke(tmp_path, bench):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("decode_step_cpu_*_smoke.json")
    res = json.loads(js.read_text())
    assert [p["context"] for p in res["points"]] == [16, 40]
    for p in res["points"]:
        for who in ("teacher", "hybrid"):
            assert len(p[f"{who}_us"]["rounds"]) == 2 and p[f"{who}_us"]["min"] > 0
        t_ops, h_ops = p["teacher_ops"], p["hybrid_ops"]
        assert "scaled_dot_product_attention" in t_ops["compute_op_names"]
        assert "scaled_dot_product_attention" not in h_ops["compute_op_names"]
        assert h_ops["compute_op_names"].count("linear") == 4  # q, k, v, o: the step adds no projection
        assert h_ops["compute_ops"] <= MAX_HYBRID_COMPUTE_OPS, h_ops["compute_op_names"]
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert md.count("\n| ") == 1 + 2 and "Command: `python benchmarks/bench_decode_step.py --smoke" in md
