"""Recipes: presets, overrides, token split, each recipe end to end on a tiny model, saved record."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_hybrid_attn as hha
from conftest import tiny_model
from hf_hybrid_attn.training.data import PackedData
from hf_hybrid_attn.training.recipes import RECIPES, TRAINING_KEY, get_recipe, run_recipe, split_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_presets_follow_the_spec():
    assert set(RECIPES) == {"lolcats", "linear_only", "hedgecats", "ssd"}
    lol = get_recipe("lolcats")
    assert lol.transfer.objectives == {"output_mse_hybrid": 1000.0} and lol.transfer.lr == 1e-2
    assert lol.finetune.lr == 1e-4 and lol.finetune.train_mode == "hybrid" and lol.ssd is None
    assert (lol.finetune.lora_r, lol.finetune.lora_alpha, lol.finetune.lora_dropout) == (8, 16, 0.0)
    assert lol.finetune.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert not lol.finetune.train_feature_maps
    lin = get_recipe("linear_only")
    assert (lin.finetune.train_mode, lin.finetune.final_mode) == ("linear_only", "hybrid")
    hc = get_recipe("hedgecats")
    assert hc.transfer.objectives == {"attn_ce": 1.0} and hc.finetune.early_stopping_patience == 2
    assert hc.transfer_token_fraction > 0.5  # the hybrid LoRA stage is the short one
    ssd = get_recipe("ssd")
    assert ssd.ssd.drop_schedule == "stages:0.9,0.75,0.5" and ssd.ssd.granularity == "layer"
    assert ssd.ssd.callback().probability_at(0, 9) == 0.9


def test_overrides_and_errors():
    r = get_recipe("ssd", **{"transfer.lr": 3e-3, "finetune.lora_r": 4, "hybrid.window": 16, "ssd.granularity": "sample",
                             "finetune.target_modules": ["q_proj"], "transfer_token_fraction": 0.25})
    assert (r.transfer.lr, r.finetune.lora_r, r.hybrid["window"], r.ssd.granularity) == (3e-3, 4, 16, "sample")
    assert r.finetune.target_modules == ("q_proj",)
    assert get_recipe("ssd").transfer.lr == 1e-2  # presets are not mutated
    assert get_recipe("lolcats", **{"ssd.granularity": "model"}).ssd.granularity == "model"  # enables SSD
    assert get_recipe("hedgecats", transfer=None).transfer is None
    with pytest.raises(ValueError, match="unknown recipe 'mamba'"):
        get_recipe("mamba")
    with pytest.raises(ValueError, match="has no field 'lora_rank'"):
        get_recipe("lolcats", **{"finetune.lora_rank": 4})
    with pytest.raises(ValueError, match="HybridConfig has no field"):
        get_recipe("lolcats", **{"hybrid.win": 4})
    with pytest.raises(ValueError, match="transfer_token_fraction"):
        get_recipe("lolcats", transfer_token_fraction=2.0)
    s = split_tokens(get_recipe("hedgecats"), 1000)
    assert (s.transfer.tokens, s.finetune.tokens) == (800, 200)
    with pytest.raises(ValueError, match="tokens"):
        split_tokens(get_recipe("hedgecats"), 0)


class _ModeProbe(TrainerCallback):
    def __init__(self):
        self.modes = set()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.modes |= set(hha.get_component_modes(model).values())


def _data():
    g = torch.Generator().manual_seed(3)
    return PackedData(train=torch.randint(3, 99, (24, 24), generator=g), val=torch.randint(3, 99, (4, 24), generator=g),
                      seq_len=24, info={"source": "random"})


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_runs_and_is_recorded_in_the_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    recipe = get_recipe(name, **{
        "hybrid.window": 4, "hybrid.feature_dim": 8,
        "transfer.max_steps": 3, "transfer.batch_size": 2, "transfer.grad_accum": 1,
        "finetune.max_steps": 4, "finetune.batch_size": 2, "finetune.grad_accum": 1, "finetune.eval_every": 2,
        "finetune.lr": 1e-2, "finetune.log_every": 1,
    })
    probe = _ModeProbe()
    model, log = run_recipe(tiny_model(), recipe, _data(), str(tmp_path / "run"), progress=False, callbacks=[probe])
    assert type(model).__name__ == "HybridLlamaForCausalLM"  # merged: no PEFT wrapper left
    assert hha.get_component_modes(model) == {0: "hybrid", 1: "hybrid"}
    assert log["stages"]["transfer"]["steps_done"] == 3 and log["stages"]["finetune"]["steps_done"] <= 4
    # the modes the stage-2 steps ran in
    expected = {"linear_only"} if name == "linear_only" else ({"hybrid"} if name != "ssd" else {"hybrid", "linear_only"})
    assert probe.modes == expected  # SSD: layers dropped to linear_only in some steps (p = 0.9 at first)
    if name == "ssd":
        assert "ssd_drop_p" in log["stages"]["finetune"]["train_curve"][0]
    by_mode = log["val_loss_by_mode"]
    assert log["kernels"] == {"auto@cpu": "kernels/chunked.py (PyTorch chunked, autograd)"}  # which kernels ran
    assert set(by_mode) == {"hybrid", "swa_only", "linear_only"} and len(set(by_mode.values())) == 3
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    rec = loaded.config.hybrid[TRAINING_KEY]
    assert rec["recipe"] == name and rec["config"]["transfer"]["max_steps"] == 3
    assert rec["val_loss_by_mode"] == pytest.approx(by_mode)
    assert rec["stages"]["transfer"]["tokens"] == 3 * 2 * 24
    assert rec["stages"]["finetune"]["tokens"] == log["stages"]["finetune"]["steps_done"] * 2 * 24
    assert loaded.config.hybrid["component_mode"] == "hybrid"
    ids = torch.randint(3, 99, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
