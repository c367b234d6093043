"""`collect_linear_share`: the LA share of the normaliser per layer and head (SPEC §4)."""

import torch

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn.kernels import hybrid_attention_reference


def test_share_is_zero_one_and_matches_direct_computation():
    model = hha.convert(tiny_model(num_hidden_layers=1), window=6, feature_dim=8)
    randomize_mixers(model)
    ids = torch.randint(3, 99, (2, 25))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with hha.component_mode(model, "swa_only"):
        assert torch.equal(hha.collect_linear_share(model, ids, mask), torch.zeros(1, 4))
    with hha.component_mode(model, "linear_only"):
        torch.testing.assert_close(hha.collect_linear_share(model, ids, mask), torch.ones(1, 4))
    share = hha.collect_linear_share(model, ids, mask)

    # direct: capture q, k after RoPE for layer 0 and evaluate the quadratic reference
    attn = model.model.layers[0].self_attn
    seen = {}

    def hook(module, q, k, v, key_valid, scaling):
        seen.update(q=q, k=k, v=v, valid=key_valid)
        return module.hybrid(q, k, v, key_valid, scaling).transpose(1, 2)

    attn.hybrid.transfer_hook = hook
    with torch.no_grad():
        model(ids, attention_mask=mask)
    attn.hybrid.transfer_hook = None
    mixer = attn.hybrid
    q, k, v, valid = (seen[n].double() if n != "valid" else seen[n] for n in ("q", "k", "v", "valid"))
    fq, fk = (t.double() for t in mixer.features(seen["q"], seen["k"]))
    _, lin, den = hybrid_attention_reference(q, k, v, fq, fk, mixer.gamma().double(), mixer.alpha().double(),
                                             window=6, scale=attn.scaling, key_valid=valid, return_stats=True)
    ratio = lin / den  # [B, H, T]
    expected = []
    for h in range(4):
        vals = [ratio[b, h, t] for b in range(2) for t in range(25) if valid[b, t] and (t - (5 if b else 0)) >= 6]
        expected.append(torch.stack(vals).mean())
    torch.testing.assert_close(share[0].double(), torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert 0 < float(share.min()) and float(share.max()) < 1
    # by position: bins of the row's valid positions, each the mean of its own queries
    binned = hha.collect_linear_share(model, ids, mask, position_bins=[6, 10, 17, 30])
    assert binned.shape == (1, 4, 3)
    for j, (lo, hi) in enumerate([(6, 10), (10, 17), (17, 30)]):
        for h in range(4):
            vals = [ratio[b, h, t] for b in range(2) for t in range(25)
                    if valid[b, t] and lo <= (t - (5 if b else 0)) < hi]
            torch.testing.assert_close(binned[0, h, j].double(), torch.stack(vals).mean(), rtol=1e-5, atol=1e-6)
    assert torch.isnan(hha.collect_linear_share(model, ids, mask, position_bins=[6, 25, 40])[0, :, 1]).all()


def test_position_bins_are_checked():
    import pytest

    model = hha.convert(tiny_model(num_hidden_layers=1), window=6, feature_dim=8)
    ids = torch.randint(3, 99, (1, 12))
    for bad in ([6], [10, 8], [-1, 4]):
        with pytest.raises(ValueError, match="position_bins: expected at least two increasing positions"):
            hha.collect_linear_share(model, ids, position_bins=bad)
    with pytest.raises(ValueError, match="inside position_bins"):
        hha.collect_linear_share(model, ids, position_bins=[20, 30])
