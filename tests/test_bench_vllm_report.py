"""benchmarks/bench_vllm.py's report: where the teacher stops is the tighter of its KV space and its
position limit (vLLM refuses a max_model_len above max_position_embeddings)."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vllm.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(SCRIPT), run_name="bench_vllm")  # imports only the standard library at the top


def _res(max_pos, kv_space_gib=4):
    kib = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, fp32: bytes of K and V per token over 30 layers
    return {"teacher": {"kv_bytes_per_token": kib}, "hybrid": {"state_bytes_per_seq": 2**20},
            "requests": 8, "new_tokens": 32, "kv_space_gib": kv_space_gib, "teacher_max_position_embeddings": max_pos}


def test_position_limit_binds_when_the_kv_space_holds_more(bench):
    line = bench["_where_teacher_stops"](_res(8192))
    # 4 GiB / (8 x 46080 B) = 11650 tokens - 32 new = 11618 in KV space; the position limit is tighter
    assert "contexts up to 8160 tokens each (+32 new), because its max_position_embeddings is 8192" in line
    assert "holds 11618 tokens each for 8 concurrent requests" in line  # named as the other limit
    assert "holds 4096 hybrid sequences" in line


def test_kv_space_binds_when_it_is_smaller(bench):
    line = bench["_where_teacher_stops"](_res(32768, kv_space_gib=1))
    assert "contexts up to 2880 tokens each (+32 new), because its paged KV cache in 1 GiB" in line
    assert "; the other limit: its max_position_embeddings is 32768" in line


def test_without_a_recorded_position_limit_only_the_kv_space_counts(bench):
    line = bench["_where_teacher_stops"](_res(None))
    assert "contexts up to 11618 tokens" in line and "max_position_embeddings" not in line


def test_max_positions_reads_the_config(bench, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert bench["_max_positions"](str(tmp_path)) == 8192
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert bench["_max_positions"](str(tmp_path)) == 4096
