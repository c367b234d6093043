"""SSD (Scheduled Sliding-window Dropout): schedules, decisions, Trainer integration, resume."""

import math

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn.training.finetune import FinetuneConfig, finetune
from hf_hybrid_attn.training.ssd import (
    PAPER_STAGES,
    Schedule,
    SSDCallback,
    drop_decisions,
    drop_rows,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids OpenMP oversubscription on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(window=4):
    torch.manual_seed(0)
    m = hha.convert(tiny_model(), window=window, feature_dim=8)
    randomize_mixers(m)
    return m


def _data(n=40, T=24):
    return torch.randint(3, 99, (n, T), generator=torch.Generator().manual_seed(5))


# -- schedules -----------------------------------------------------------------------------------
def test_schedules_values():
    s = Schedule.stages()
    assert s.points == PAPER_STAGES
    assert [s(f) for f in (0.0, 0.3333, 1 / 3, 0.5, 2 / 3, 0.99, 1.0)] == [0.9, 0.9, 0.75, 0.75, 0.5, 0.5, 0.5]
    lin = Schedule.linear(0.9, 0.5)
    assert lin(0.0) == 0.9 and lin(1.0) == 0.5 and lin(0.5) == pytest.approx(0.7)
    assert Schedule.parse("stages:0.9,0.75,0.5") == s
    assert Schedule.parse("linear:0.9,0.5") == lin
    assert Schedule.parse("0.25")(0.7) == 0.25
    assert Schedule.parse("stages:0=16,0.5=64")(0.6) == 64
    for bad in ("stages:", "linear:1", "x:0.1", "stages:0.5=0.3"):
        with pytest.raises(ValueError, match="[Ss]chedule"):
            Schedule.parse(bad)
    with pytest.raises(ValueError, match="granularity"):
        SSDCallback(granularity="head")
    with pytest.raises(ValueError, match="drop_schedule"):
        SSDCallback(Schedule.constant(1.5))


def test_decisions_are_pure_and_frequencies_match_p():
    layers = list(range(6))
    a = [drop_decisions(7, s, layers, 0.3) for s in range(50)]
    assert a == [drop_decisions(7, s, layers, 0.3) for s in range(50)]  # pure function
    assert a != [drop_decisions(8, s, layers, 0.3) for s in range(50)]  # the seed matters
    for p in (0.9, 0.5, 0.1):
        n = 3000
        freq = sum(sum(drop_decisions(0, s, layers, p).values()) for s in range(n)) / (n * len(layers))
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / (n * len(layers)))
        model_level = [drop_decisions(0, s, layers, p, "model") for s in range(n)]
        assert all(len(set(d.values())) == 1 for d in model_level)  # all layers together
        freq = sum(d[0] for d in model_level) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)
        rows = torch.stack([drop_rows(0, s, 1, 0, 64, p) for s in range(200)]).float()
        assert abs(rows.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / rows.numel())


# -- inside the Trainer --------------------------------------------------------------------------
class _Probe(TrainerCallback):
    """Records the mode / window each converted layer runs with in every training forward."""

    def __init__(self):
        self.seen: dict[int, dict] = {}
        self.step = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        for idx, attn in hha.iter_hybrid_attention(model):
            attn.register_forward_pre_hook(self._hook(idx))

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kw):
        self.step = None

    def _hook(self, idx):
        def hook(module, args):
            if self.step is None:
                return
            mixer = [m for m in module.hybrid.modules() if isinstance(m, hha.HybridMixer)][-1]
            drop = None if mixer.swa_drop is None else mixer.swa_drop.tolist()
            self.seen.setdefault(self.step, {})[idx] = (mixer.mode, mixer.window, drop)

        return hook


def test_probabilities_and_windows_follow_the_schedule_at_every_step(tmp_path):
    model = _model()
    ssd = SSDCallback(window_schedule=Schedule.stages([(0.0, 2), (0.5, 6)]), seed=3, record=True)
    probe = _Probe()
    cfg = FinetuneConfig(max_steps=9, batch_size=2, grad_accum=2, eval_every=100, log_every=1, lr=1e-3)
    out, log = finetune(model, _data(), cfg, None, str(tmp_path), callbacks=[ssd, probe], progress=False)
    assert [ssd.history[s]["p"] for s in range(9)] == [0.9] * 3 + [0.75] * 3 + [0.5] * 3
    assert [ssd.history[s]["window"] for s in range(9)] == [2] * 5 + [6] * 4  # 4/9 < 0.5 <= 5/9
    for s in range(9):
        for layer, drop in ssd.history[s]["drop"].items():
            assert probe.seen[s][layer] == ("linear_only" if drop else "hybrid", ssd.history[s]["window"], None)
    assert any(d for s in range(9) for d in ssd.history[s]["drop"].values())
    assert not all(d for s in range(9) for d in ssd.history[s]["drop"].values())
    # logged with the losses, and everything restored after training
    assert [(h["step"], h["ssd_drop_p"], h["ssd_window"]) for h in log["train_curve"]] == [
        (s + 1, ssd.history[s]["p"], ssd.history[s]["window"]) for s in range(9)
    ]  # the entry logged after step s+1 shows what step s ran with
    assert hha.get_component_modes(out) == {0: "hybrid", 1: "hybrid"}
    assert {a.hybrid.window for _, a in hha.iter_hybrid_attention(out)} == {4}


def test_sample_granularity_masks_rows():
    model = _model()
    ids = _data(6, 20)
    cb = SSDCallback(Schedule.constant(0.5), granularity="sample", seed=11, record=True)
    args = TrainingArguments(output_dir="unused", report_to=[])
    state = TrainerState(global_step=4, max_steps=10)
    with torch.no_grad():
        hybrid_ref = model(ids).logits
    cb.on_train_begin(args, state, TrainerControl(), model=model)
    cb.on_step_begin(args, state, TrainerControl(), model=model)
    with torch.no_grad():
        out = model(ids).logits
    masks = {layer: torch.tensor(rows) for (layer, micro), rows in cb.history[4]["rows"].items()}
    assert set(masks) == {0, 1} and masks[0].shape == (6,)
    assert 0 < int(masks[0].sum() + masks[1].sum()) < 12  # a real mix of dropped and kept rows
    cb.on_step_end(args, state, TrainerControl(), model=model)
    assert all(a.hybrid.swa_drop is None for _, a in hha.iter_hybrid_attention(model))
    # every row equals the model run with that row's per-layer modes
    for r in range(6):
        for layer in (0, 1):
            hha.set_component_mode(model, "linear_only" if masks[layer][r] else "hybrid", layers=layer)
        with torch.no_grad():
            expected = model(ids[r : r + 1]).logits[0]
        torch.testing.assert_close(out[r], expected, rtol=1e-5, atol=1e-5)
    hha.set_component_mode(model, "hybrid")
    # rows with a dropped layer differ from the hybrid model; outside a training step nothing is dropped
    touched = masks[0] | masks[1]
    assert ((out - hybrid_ref).abs().amax((1, 2)) > 1e-4).tolist() == touched.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hybrid_ref, rtol=0, atol=0)
    cb.on_train_end(args, state, TrainerControl(), model=model)
    assert cb._hook is None


class _CrashAfterSave(TrainerCallback):
    """Simulates a killed job: raises right after the checkpoint of `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("granularity", ["layer", "sample"])
def test_resume_replays_decisions_and_gives_the_same_weights(tmp_path, granularity):
    cfg = FinetuneConfig(max_steps=6, batch_size=2, grad_accum=2, eval_every=3, lr=5e-3, merge=True)
    data = _data()

    def run(out_dir, resume=False, stop_at=None):
        torch.manual_seed(0)
        ssd = SSDCallback(Schedule.constant(0.5), granularity=granularity, seed=1, record=True)
        cbs = [ssd] + ([_CrashAfterSave(stop_at)] if stop_at else [])
        try:
            model, log = finetune(_model(), data, cfg, None, str(out_dir), resume=resume, callbacks=cbs, progress=False)
        except KeyboardInterrupt:
            return None, ssd.history, None
        return model, ssd.history, log

    full, hist_full, _ = run(tmp_path / "a")
    _, hist_first, _ = run(tmp_path / "b", stop_at=3)
    resumed, hist_rest, log = run(tmp_path / "b", resume=True)
    assert log["resumed_from"].endswith("checkpoint-3")
    assert sorted(hist_first) == [0, 1, 2] and sorted(hist_rest) == [3, 4, 5]
    assert {**hist_first, **hist_rest} == hist_full
    trained = dict(resumed.named_parameters())
    changed = 0
    for name, p in full.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=0, atol=1e-6)
        changed += int(not torch.equal(p, dict(_model().named_parameters())[name]))
    assert changed > 0  # training really changed the (merged) weights
