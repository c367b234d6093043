"""Beyond one machine: two CPU ranks (gloo) through accelerate + Trainer agree on every SSD decision."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_identical_ssd_decisions(tmp_path):
    pytest.importorskip("accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           os.path.join(HERE, "accelerate_ssd_check.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert (r["world_size"], r["backend"]) == (2, "gloo")  # a real two-process run
    for granularity in ("layer", "sample"):
        a, b = (r[granularity] for r in ranks)
        assert a["steps_done"] == b["steps_done"] == 4
        assert a["history"] == b["history"]  # the scheduled decisions
        assert a["observed"] == b["observed"]  # what the layers actually ran with
        assert a["lora_checksum"] == b["lora_checksum"]  # gradients were synchronised
        assert [a["history"][str(s)]["p"] for s in range(4)] == [0.9, 0.9, 0.5, 0.5]
    layer = ranks[0]["layer"]
    drops = [d for s in layer["history"].values() for d in s["drop"].values()]
    assert any(drops) and not all(drops)  # a real mix of dropped and kept layers
    for step, seen in layer["observed"].items():
        for idx, mode, swa_drop in seen:
            expected = "linear_only" if layer["history"][step]["drop"][str(idx)] else "hybrid"
            assert (mode, swa_drop) == (expected, None)
    sample = ranks[0]["sample"]
    for step, seen in sample["observed"].items():
        micro_of = {}
        for idx, mode, swa_drop in seen:  # forwards in order: micro-batch 0 then 1, layers 0 then 1
            micro = micro_of.setdefault(idx, 0)
            micro_of[idx] += 1
            assert mode == "hybrid" and swa_drop == sample["history"][step]["rows"][f"{idx}:{micro}"]
