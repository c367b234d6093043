"""Stage 1 (attention transfer) on a tiny model: teacher pass-through, gradients, loss, resume."""

import pytest
import torch

import hf_hybrid_attn as hha
from conftest import tiny_model
from hf_hybrid_attn.training.objectives import attn_ce_loss, output_mse
from hf_hybrid_attn.training.transfer import (
    TransferConfig,
    TransferHook,
    _hooks_installed,
    evaluate_transfer,
    teacher_attention,
    train_attention_transfer,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _teacher(seed=0):
    """Tiny Llama whose q/k projections are scaled up, so its softmax attention is peaked (with the
    default 0.02 init it is nearly uniform, which any feature map already matches)."""
    torch.manual_seed(seed)
    base = tiny_model()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(15)
            layer.self_attn.k_proj.weight.mul_(15)
    return base


def _data(n=32, T=32):
    return torch.randint(3, 99, (n, T), generator=torch.Generator().manual_seed(7))


def test_hooked_forward_passes_teacher_hidden_states_through():
    teacher = _teacher()
    ids = _data(3, 20)
    mask = torch.ones_like(ids)
    mask[2, :5] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = teacher.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    model = hha.convert(teacher, window=4, feature_dim=8)
    layers = list(hha.iter_hybrid_attention(model))
    hook = TransferHook({"attn_ce": 1.0, "output_mse_hybrid": 1.0})
    with _hooks_installed(layers, hook), torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    with torch.no_grad():
        plain = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    assert (plain[keep] - ref[keep]).abs().max() > 1e-3  # without the hook the student runs
    assert hook.calls == 2 and set(hook.per_layer) == {0, 1} and hook.totals["attn_ce"] > 0


def test_teacher_attention_matches_sdpa_with_gqa_and_padding():
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    out = teacher_attention(q, k, v, valid, 0.3)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 0.3 * q @ ke.transpose(-1, -2)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    ref = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0) @ ve
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :, 3:], ref[1, :, 3:])
    assert torch.isfinite(out).all()


def test_in_hook_backward_equals_the_layer_loss_gradient():
    """The hook back-propagates each layer at once; that must equal d(loss_layer)/d(params)."""
    model = hha.convert(_teacher(), window=4, feature_dim=8)
    ids = _data(2, 24)
    captured = {}

    def capture(module, q, k, v, key_valid, scaling):
        captured[module.layer_idx] = (q.detach(), k.detach(), v.detach(), key_valid, scaling)
        return teacher_attention(q, k, v, key_valid, scaling).transpose(1, 2)

    layers = list(hha.iter_hybrid_attention(model))
    with _hooks_installed(layers, capture), torch.no_grad():
        model.model(input_ids=ids)
    attn0 = layers[0][1]
    q, k, v, valid, scaling = captured[0]
    with torch.enable_grad():
        phi_q, phi_k = attn0.hybrid.features(q, k)
        y = attn0.hybrid(q, k, v, valid, scaling, mode="hybrid")
        loss = 0.5 * attn_ce_loss(q, k, phi_q, phi_k, scaling, valid) + 3.0 * output_mse(y, teacher_attention(q, k, v, valid, scaling), valid)
    expected = torch.autograd.grad(loss, list(attn0.hybrid.parameters()))

    hook = TransferHook({"attn_ce": 0.5, "output_mse_hybrid": 3.0})
    hook.backward_scale = 1.0
    with _hooks_installed(layers, hook), torch.no_grad():
        model.model(input_ids=ids)
    for e, p in zip(expected, attn0.hybrid.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    assert hook.per_layer[0] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("objectives", [{"attn_ce": 1.0}, {"output_mse_hybrid": 1000.0}, {"output_mse_linear": 1000.0, "attn_ce": 1.0}])
def test_stage1_loss_falls_and_only_hybrid_parameters_change(objectives):
    model = hha.convert(_teacher(), window=4, feature_dim=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _data()
    cfg = TransferConfig(objectives=objectives, max_steps=25, batch_size=2, grad_accum=2, lr=1e-2, eval_every=10)
    log = train_attention_transfer(model, data[4:], cfg, val_blocks=data[:4], progress=False)
    assert log["final_val_loss"] < 0.97 * log["initial_val_loss"], log
    curve = [e["loss"] for e in log["train_curve"]]
    assert curve[-1] < curve[0] and min(curve) > 0  # every step trained, also after the validations
    assert all(e["grad_norm"] > 0 for e in log["train_curve"])
    vals = [e["loss"] for e in log["val_curve"]]
    assert [e["step"] for e in log["val_curve"]] == [0, 10, 20, 25] and vals[3] < vals[2] < vals[1] < vals[0]
    for n, p in model.named_parameters():
        if ".hybrid." in n:
            continue
        assert torch.equal(p, before[n]), n  # the base model is frozen, bit for bit
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".hybrid." in n)
    assert log["tokens"] == 25 * 2 * 2 * 32 and log["tokens_per_s"] > 0
    # the evaluation helper agrees with the value logged at the end
    again = evaluate_transfer(model, data[:4], cfg, per_layer=True)
    assert again["loss"] == pytest.approx(log["final_val_loss"], rel=1e-6)
    assert sum(again["per_layer"].values()) / 2 == pytest.approx(again["loss"], rel=1e-6)
    assert set(log["final_val_per_layer"]) == {"0", "1"}


class _Crash:
    """A forward pre-hook that raises KeyboardInterrupt at the n-th forward (simulated Ctrl-C)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, module, args, kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_resume_after_interrupt_loses_no_finished_step(tmp_path):
    cfg = TransferConfig(max_steps=6, batch_size=2, grad_accum=2, checkpoint_every=100, lr=1e-2)
    data = _data()
    full = hha.convert(_teacher(), window=4, feature_dim=8)
    log_full = train_attention_transfer(full, data, cfg, progress=False)

    part = hha.convert(_teacher(), window=4, feature_dim=8)
    handle = part.model.register_forward_pre_hook(_Crash(2 * 4 + 2), with_kwargs=True)  # inside step 5
    with pytest.raises(KeyboardInterrupt):
        train_attention_transfer(part, data, cfg, checkpoint_dir=str(tmp_path), progress=False)
    handle.remove()
    state = torch.load(tmp_path / "stage1_state.pt", weights_only=False)
    assert state["step"] == 4  # steps 1-4 finished and kept, the 5th was in progress

    resumed = hha.convert(_teacher(), window=4, feature_dim=8)  # a fresh process would start here
    log = train_attention_transfer(resumed, data, cfg, checkpoint_dir=str(tmp_path), resume=True, progress=False)
    assert [e["loss"] for e in log["train_curve"]] == pytest.approx([e["loss"] for e in log_full["train_curve"]], rel=1e-6)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="resume"):
        train_attention_transfer(resumed, data, TransferConfig(max_steps=9, batch_size=2, grad_accum=2),
                                 checkpoint_dir=str(tmp_path), resume=True, progress=False)


def test_early_stopping_restores_the_best_parameters():
    model = hha.convert(_teacher(), window=4, feature_dim=8)
    data = _data()
    # a learning rate far too large: validation gets worse, training stops after `patience` evals
    cfg = TransferConfig(max_steps=30, batch_size=2, grad_accum=1, lr=3.0, eval_every=2, early_stop_patience=2)
    log = train_attention_transfer(model, data[4:], cfg, val_blocks=data[:4], progress=False)
    assert log["stopped_early"] and log["steps_done"] < 30
    best = min(e["loss"] for e in log["val_curve"][:-1])
    assert log["final_val_loss"] == pytest.approx(best, rel=1e-6)


def test_stage1_errors():
    model = hha.convert(_teacher(), window=4, feature_dim=8)
    with pytest.raises(ValueError, match="objectives"):
        train_attention_transfer(model, _data(), TransferConfig(objectives={"mse": 1.0}, max_steps=1), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        train_attention_transfer(model, _data(4, 4), TransferConfig(max_steps=1), progress=False)
    with pytest.raises(ValueError, match="convert"):
        train_attention_transfer(_teacher(), _data(), TransferConfig(max_steps=1), progress=False)
