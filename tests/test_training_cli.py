"""`hf-hybrid convert` on a tiny model saved with a word-level tokenizer: output, log, resume, errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_data import word_tokenizer
from transformers import AutoModelForCausalLM

import hf_hybrid_attn  # noqa: F401  (registers the hybrid classes for from_pretrained)
from conftest import tiny_model
from hf_hybrid_attn.training.cli import main, parse_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(90)]
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 120))) for _ in range(60)]
    (root / "text.txt").write_text("\n\n".join(paras))
    torch.manual_seed(0)
    model = tiny_model()
    model.save_pretrained(root / "tiny")
    word_tokenizer(paras).save_pretrained(root / "tiny")
    return root


def _argv(assets, out, *extra):
    return ["convert", "--model", str(assets / "tiny"), "--data", str(assets / "text.txt"), "--out", str(out),
            "--seq-len", "32", "--window", "8", "--feature-dim", "8", "--batch-size", "2", "--grad-accum", "1",
            "--eval-every", "3", "--val-fraction", "0.1", "--no-progress", *extra]


def test_parse_tokens():
    assert [parse_tokens(x) for x in ("2000", "2k", "1.5M", "1e6")] == [2000, 2000, 1_500_000, 1_000_000]
    with pytest.raises(Exception, match="token count"):
        parse_tokens("lots")


def test_convert_writes_a_loadable_checkpoint_and_a_training_log(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(assets, out, "--recipe", "hedgecats", "--tokens", "3000", "--set", "finetune.log_every=1")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "HybridLlamaForCausalLM"
    hyb = model.config.hybrid
    assert (hyb["window"], hyb["feature_dim"], hyb["component_mode"]) == (8, 8, "hybrid")
    assert hyb["training"]["recipe"] == "hedgecats"
    assert hyb["training"]["stages"]["transfer"]["tokens"] == (int(3000 * 0.8) // 64) * 64  # whole steps of 2x32
    log = json.loads((out / "training_log.json").read_text())
    for stage in ("transfer", "finetune"):
        s = log["stages"][stage]
        assert s["train_curve"] and s["wall_s"] > 0 and s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0
        assert s["initial_val_loss"] is not None and s["final_val_loss"] is not None
    assert log["data"]["train_blocks"] > 0 and log["data"]["val_documents"] == 6
    assert json.loads(capsys.readouterr().out)["recipe"] == "hedgecats"
    assert (out / "tokenizer.json").exists() and not (out / "training_log.partial.json").exists()

    # --resume on a finished run redoes nothing and reproduces the same weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SystemExit, match="--resume"):
        main(_argv(assets, out, "--recipe", "hedgecats", "--tokens", "3000"))
    assert main(_argv(assets, out, "--recipe", "hedgecats", "--tokens", "3000", "--resume")) == 0
    again = AutoModelForCausalLM.from_pretrained(out)
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    log2 = json.loads((out / "training_log.json").read_text())
    assert log2["stages"]["finetune"]["resumed_from"].endswith("final")
    assert log2["stages"]["finetune"]["steps_done"] == log["stages"]["finetune"]["steps_done"]
    assert log2["stages"]["transfer"]["train_curve"] == log["stages"]["transfer"]["train_curve"]


def test_data_seed_fixes_the_split_while_the_seed_changes_training(assets, tmp_path):
    """--data-seed keeps the same documents (split and packed blocks) for different --seed values."""
    from hf_hybrid_attn.training.data import build_packed_data

    logs = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        assert main(_argv(assets, out, "--recipe", "lolcats", "--tokens", "1200", "--seed", str(seed),
                          "--data-seed", "7")) == 0
        logs[seed] = json.loads((out / "training_log.json").read_text())
    assert logs[0]["data"]["seed"] == logs[1]["data"]["seed"] == 7
    assert logs[0]["recipe_config"]["transfer"]["seed"] == 0 and logs[1]["recipe_config"]["transfer"]["seed"] == 1
    assert logs[0]["stages"]["transfer"]["train_curve"] != logs[1]["stages"]["transfer"]["train_curve"]
    # the split is the data seed's, not the training seed's
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tiny")
    a = build_packed_data(tok, str(assets / "text.txt"), seq_len=32, val_fraction=0.1, seed=7)
    b = build_packed_data(tok, str(assets / "text.txt"), seq_len=32, val_fraction=0.1, seed=0)
    assert not torch.equal(a.val, b.val)
    assert logs[0]["data"]["val_documents"] == a.info["val_documents"]


def test_no_merge_keeps_the_adapter_separate(assets, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    assert main(_argv(assets, out, "--recipe", "hedgecats", "--tokens", "2000", "--no-merge",
                      "--set", "finetune.lr=0.05")) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k or "base_layer" in k for k in base.state_dict())  # a clean, unmerged base
    ids = torch.randint(3, 90, (2, 20))
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert (adapted - plain).abs().max() > 1e-4  # the adapter carries the stage-2 update
    assert json.loads((out / "training_log.json").read_text())["recipe_config"]["finetune"]["merge"] is False


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recipe", "mamba", "--tokens", "1000"], "--recipe: unknown recipe 'mamba'"),
        (["--recipe", "ssd", "--tokens", "1000", "--window", "32"], r"--seq-len \(32\) must be larger than --window \(32\)"),
        (["--recipe", "ssd"], "--tokens: required"),
        (["--recipe", "ssd", "--tokens", "1000", "--set", "finetune.lora_rank=4"], "has no field 'lora_rank'"),
        (["--recipe", "ssd", "--tokens", "1000", "--set", "oops"], "--set: expected KEY=VALUE"),
        (["--recipe", "ssd", "--tokens", "1000", "--val-fraction", "0.01", "--seq-len", "2000"], "too few tokens for a validation split"),
    ],
)
def test_convert_errors(assets, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(_argv(assets, tmp_path / "out", *extra))


def test_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="--model: .* is not 'smollm2', 'gemma3-270m', an existing model directory or a .gguf file"):
        main(["convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--tokens", "1k"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        main(["convert", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--tokens", "1k"])


def test_seed_reaches_the_ssd_draws(assets, tmp_path):
    out = tmp_path / "ssd"
    assert main(_argv(assets, out, "--recipe", "ssd", "--tokens", "1200", "--seed", "3")) == 0
    cfg = json.loads((out / "training_log.json").read_text())["recipe_config"]
    assert cfg["ssd"]["seed"] == 3 and cfg["finetune"]["seed"] == 3


def test_sigterm_and_an_ignored_sigint_save_stage1_and_name_resume(assets, tmp_path):
    """A conversion started in the background of a non-interactive shell has SIGINT ignored, and a
    session that ends sends SIGTERM: either way stage 1 must save its finished steps (its periodic
    checkpoint is set out of reach here) and the message must say how to continue."""
    out = tmp_path / "run"
    argv = _argv(assets, out, "--recipe", "hedgecats", "--tokens", "2M", "--checkpoint-every", "100000")
    for sig in (signal.SIGTERM, signal.SIGINT):
        err = tmp_path / f"err_{sig.name}.txt"
        with open(err, "w") as f:
            resume = ["--resume"] if sig == signal.SIGINT else []
            proc = subprocess.Popen([sys.executable, "-m", "hf_hybrid_attn.cli", *argv, *resume],
                                    stderr=f, stdout=subprocess.DEVNULL,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
            deadline = time.time() + 300
            while "[convert] data:" not in err.read_text() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            time.sleep(4)  # stage 1 runs: tiny steps, many of them
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        text = err.read_text()
        assert rc == 1, text[-3000:]
        assert f"interrupted ({sig.name})" in text and "--resume" in text, text[-3000:]
        state = torch.load(out / "checkpoints" / "stage1" / "stage1_state.pt", weights_only=False)
        assert 0 < state["step"] < state["steps"]
        if sig == signal.SIGTERM:
            first = state["step"]
        else:  # the second run resumed from the first one's checkpoint and went on
            assert state["step"] > first
