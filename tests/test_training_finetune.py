"""Stage 2 (LoRA fine-tuning) on a tiny model: what trains, early stopping, merge, component mode."""

import shutil

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn.training.finetune import FinetuneConfig, finetune


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model():
    torch.manual_seed(0)
    m = hha.convert(tiny_model(), window=4, feature_dim=8)
    randomize_mixers(m)
    return m


def _data(n=24, T=24, seed=2):
    return torch.randint(3, 99, (n, T), generator=torch.Generator().manual_seed(seed))


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("train_feature_maps", [False, True])
def test_lora_trains_attention_projections_and_feature_maps_only_on_request(tmp_path, train_feature_maps):
    model = _model()
    before = _params(model)
    cfg = FinetuneConfig(max_steps=3, batch_size=2, grad_accum=1, lr=5e-2, eval_every=10,
                         train_feature_maps=train_feature_maps)
    merged, log = finetune(model, _data(), cfg, None, str(tmp_path), progress=False)
    after = _params(merged)
    assert set(after) == set(before)  # merged back into the plain hybrid model
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n.rsplit(".", 2)[-2] for n in changed if "proj" in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("mlp" in n or "embed" in n or "norm" in n for n in changed)
    hybrid_changed = {n for n in changed if ".hybrid." in n}
    assert bool(hybrid_changed) == train_feature_maps
    assert log["steps_done"] == 3 and log["tokens"] == 3 * 2 * 24


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    model = _model()
    data = _data()
    # a learning rate far too large: validation loss rises after the first evaluation
    cfg = FinetuneConfig(max_steps=40, batch_size=2, grad_accum=1, lr=0.5, eval_every=1, early_stopping_patience=2,
                         merge=False)
    peft_model, log = finetune(model, data[4:], cfg, data[:4], str(tmp_path), progress=False)
    assert isinstance(peft_model, PeftModel)
    assert log["stopped_early"] and log["steps_done"] < 40
    best = min(v["loss"] for v in log["val_curve"])
    assert log["best_val_loss"] == pytest.approx(best)
    assert log["final_val_loss"] == pytest.approx(best, rel=1e-5)  # the best adapter was reloaded
    assert log["val_curve"][-1]["loss"] > best  # ...and it was not the last one
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_train_mode_linear_only_then_final_mode(tmp_path):
    seen = []

    def probe(module, args):
        seen.append(module.hybrid.mode)

    model = _model()
    for _, attn in hha.iter_hybrid_attention(model):
        attn.register_forward_pre_hook(probe)
    cfg = FinetuneConfig(max_steps=2, batch_size=2, grad_accum=1, eval_every=10, train_mode="linear_only",
                         final_mode="hybrid")
    merged, _ = finetune(model, _data(), cfg, None, str(tmp_path), progress=False)
    assert set(seen) == {"linear_only"}
    assert hha.get_component_modes(merged) == {0: "hybrid", 1: "hybrid"}
    assert merged.config.hybrid["component_mode"] == "hybrid"


def test_finetune_errors(tmp_path):
    with pytest.raises(ValueError, match="train_mode"):
        finetune(_model(), _data(), FinetuneConfig(max_steps=1, train_mode="fast"), None, str(tmp_path))
    with pytest.raises(ValueError, match="tokens or max_steps"):
        finetune(_model(), _data(), FinetuneConfig(), None, str(tmp_path))


def test_adapter_saves_do_not_warn_about_the_base_config(tmp_path):
    """peft re-reads the teacher's config.json (model_type 'llama') through the hybrid config class
    on every adapter save; transformers' 'model of type llama to instantiate hybrid_llama' warning
    is expected there and must not reach the user, while other config warnings still do."""
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    tiny_model().save_pretrained(tmp_path / "teacher")
    model = hha.convert(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher"), window=4, feature_dim=8)
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = hf_logging.get_logger("transformers.configuration_utils")
    handler = Catch()
    log.addHandler(handler)
    try:
        cfg = FinetuneConfig(max_steps=2, batch_size=2, grad_accum=1, eval_every=1, merge=False)
        peft_model, _ = finetune(model, _data(), cfg, _data(4, seed=3), str(tmp_path / "out"), progress=False)
        log.warning("You are using a model of type `llama` to instantiate a model of type `llama2`.")  # not ours
    finally:
        log.removeHandler(handler)
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert not any("instantiate a model of type `hybrid_" in m for m in seen), seen
    assert any("`llama2`" in m for m in seen)  # the filter is gone after training and is narrow


def test_linear_share_is_logged_at_every_evaluation(tmp_path):
    """The stage log carries the LA share of the normaliser (hybrid mode) at each evaluation, and the
    last entry is the share of the returned model on the same blocks, measured independently here."""
    model = _model()
    data = _data()
    cfg = FinetuneConfig(max_steps=4, batch_size=2, grad_accum=1, lr=5e-2, eval_every=2, early_stopping_patience=None,
                         train_mode="linear_only", share_blocks=2)
    merged, log = finetune(model, data[4:], cfg, data[:4], str(tmp_path), progress=False)
    curve = log["linear_share_curve"]
    # the initial evaluation (step 0), steps 2 and 4, and the final evaluation
    assert [h["step"] for h in curve] == [0, 2, 4, 4]
    for h in curve:
        assert len(h["linear_share_per_layer"]) == len(list(hha.iter_hybrid_attention(merged)))
        assert 0.0 < h["linear_share"] < 1.0
    assert curve[0]["linear_share"] != curve[-1]["linear_share"]  # training moved it
    merged.eval()
    with hha.component_mode(merged, "hybrid"):
        expected = hha.collect_linear_share(merged, data[:2]).mean(1)
    assert curve[-1]["linear_share_per_layer"] == pytest.approx(expected.tolist(), abs=1e-4)
    assert hha.get_component_modes(merged) == {i: "hybrid" for i, _ in hha.iter_hybrid_attention(merged)}


def test_linear_share_curve_survives_resume(tmp_path):
    data = _data()
    cfg = FinetuneConfig(max_steps=4, batch_size=2, grad_accum=1, lr=5e-2, eval_every=2, early_stopping_patience=None,
                         merge=False)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    finetune(_model(), data[4:], cfg, data[:4], str(tmp_path), callbacks=[Stop()], progress=False)
    # the first run stopped after step 2 (its checkpoint-2 holds the share at steps 0 and 2);
    # remove its final marker so that the resumed run trains steps 3..4 from checkpoint-2
    shutil.rmtree(tmp_path / "final")
    _, log = finetune(_model(), data[4:], cfg, data[:4], str(tmp_path), resume=True, progress=False)
    assert log["resumed_from"].endswith("checkpoint-2")
    assert [h["step"] for h in log["linear_share_curve"]] == [0, 2, 4, 4]
