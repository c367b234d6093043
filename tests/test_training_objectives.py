"""Stage-1 objectives: chunked attention cross-entropy equals the dense definition (fp64)."""

import pytest
import torch

from hf_hybrid_attn.training.objectives import attn_ce_loss, output_mse


def _dense_attn_ce(q, k, phi_q, phi_k, scale, key_valid):
    """Direct T x T computation of -sum_j A_ij log P_ij, averaged over heads and valid queries."""
    B, H, T, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & key_valid[:, None, None, :]
    scores = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    teacher = torch.softmax(scores, -1).nan_to_num(0.0)
    lin = (phi_q @ phi_k.transpose(-1, -2)) * allowed
    student = lin / lin.sum(-1, keepdim=True).clamp_min(1e-300)  # padded rows: no key at all
    ce = -(teacher * torch.where(allowed, student, torch.ones_like(student)).log()).sum(-1)  # [B,H,T]
    w = key_valid[:, None, :].double()
    return (ce * w).sum() / (w.sum() * H)


def _inputs(B=2, H=4, Hkv=2, T=37, D=8, Fd=6, pad_left=5):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    phi_q = torch.randn(B, H, T, Fd, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    phi_k = torch.randn(B, H, T, Fd, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    key_valid = torch.ones(B, T, dtype=torch.bool)
    key_valid[-1, :pad_left] = False  # left padding on the last row
    return q, k, phi_q, phi_k, key_valid


def test_attn_ce_equals_dense_and_chunk_size_is_invisible():
    q, k, phi_q, phi_k, key_valid = _inputs()
    ref = _dense_attn_ce(q, k, phi_q, phi_k, 0.35, key_valid)
    g_ref = torch.autograd.grad(ref, (phi_q, phi_k))
    assert ref.item() > 0.1  # a real, non-trivial value
    for chunk in (1, 5, 16, 37, 64):
        val = attn_ce_loss(q, k, phi_q, phi_k, 0.35, key_valid, chunk_size=chunk)
        torch.testing.assert_close(val, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(val, (phi_q, phi_k))
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_attn_ce_equals_teacher_entropy_when_linear_weights_are_exact():
    """One-hot keys make exp(s q.k) factorise exactly: phi_q = exp(2q), phi_k_j = e_c(j). Then the
    linear weights equal the softmax weights and the CE is the teacher's entropy (its minimum)."""
    T, D = 12, 3
    q = torch.randn(1, 1, T, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.arange(T) % D, D).double()[None, None]
    k, phi_q, phi_k = 2.0 * onehot, torch.exp(2.0 * q), onehot
    ce = attn_ce_loss(q, k, phi_q, phi_k, 1.0, torch.ones(1, T, dtype=torch.bool), chunk_size=4)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf")).softmax(-1)
    entropy = -(a * a.clamp_min(1e-300).log()).sum(-1).mean()
    torch.testing.assert_close(ce, entropy, rtol=1e-10, atol=1e-12)
    # any other student is worse (Gibbs' inequality)
    worse = attn_ce_loss(q, k, phi_q.flip(-1), phi_k, 1.0, torch.ones(1, T, dtype=torch.bool))
    assert worse.item() > entropy.item() + 1e-3


def test_attn_ce_memory_is_chunked():
    """The backward keeps no T x T tensor: peak saved activations grow ~linearly in T."""
    def saved_elems(T):
        q, k, phi_q, phi_k, key_valid = _inputs(B=1, H=2, Hkv=1, T=T, D=4, Fd=4, pad_left=0)
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attn_ce_loss(q, k, phi_q, phi_k, 0.5, key_valid, chunk_size=16, recompute_budget=budget)
        return max(sizes), sum(sizes)

    budget = 0  # above the budget: chunks are recomputed in the backward
    biggest, total = saved_elems(512)
    assert biggest <= 2 * 512 * 16 * 2  # largest saved tensor is O(T * chunk), not T^2 (=262144)
    assert total < 2 * 512 * 512 / 2  # in all, less than one causal weight matrix is kept
    budget = 2**24  # at or below it: the chunks' weights are kept (no recompute), only causal prefixes
    biggest, total = saved_elems(512)
    assert biggest <= 2 * 512 * 16 and 2 * 512 * 512 / 2 < total < 2 * 512 * 512 * 4


def test_attn_ce_recompute_or_not_gives_the_same_value_and_gradients():
    q, k, phi_q, phi_k, key_valid = _inputs(T=53)
    ref = _dense_attn_ce(q, k, phi_q, phi_k, 0.35, key_valid)
    g_ref = torch.autograd.grad(ref, (phi_q, phi_k))
    for budget in (0, 2**24):
        for chunk in (7, 53):
            val = attn_ce_loss(q, k, phi_q, phi_k, 0.35, key_valid, chunk_size=chunk, recompute_budget=budget)
            torch.testing.assert_close(val, ref, rtol=1e-12, atol=1e-12)
            for a, b in zip(torch.autograd.grad(val, (phi_q, phi_k)), g_ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="recompute_budget"):
        attn_ce_loss(q, k, phi_q, phi_k, 0.35, key_valid, recompute_budget=-1)


def test_output_mse_ignores_padding_and_checks_shapes():
    y = torch.zeros(2, 3, 4, 5)
    t = torch.ones(2, 3, 4, 5)
    t[0, :, 0] = 100.0  # a padded position: must not count
    valid = torch.ones(2, 4, dtype=torch.bool)
    valid[0, 0] = False
    assert output_mse(y, t, valid).item() == pytest.approx(1.0)
    assert output_mse(y, torch.ones_like(y)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="y_student, y_teacher"):
        output_mse(y, t[:, :2])
    with pytest.raises(ValueError, match="valid"):
        output_mse(y, t, valid[:, :3])


def test_attn_ce_bad_inputs():
    q, k, phi_q, phi_k, key_valid = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        attn_ce_loss(q, k, phi_q, phi_k, 0.3, key_valid, chunk_size=0)
    with pytest.raises(ValueError, match="phi_q, phi_k"):
        attn_ce_loss(q, k, phi_q[:, :2], phi_k, 0.3, key_valid)
    with pytest.raises(ValueError, match="key_valid"):
        attn_ce_loss(q, k, phi_q, phi_k, 0.3, key_valid.long())
