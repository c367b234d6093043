import pytest
import torch

import hf_hybrid_attn
from hf_hybrid_attn.feature_maps import FEATURE_MAPS, FeatureMap, build_feature_map

SIZES = {"hedgehog": 10, "hedgehog_exp": 10, "softmax": 5, "elu": 5, "relu": 5, "identity_elu": 8}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_output_size_and_positivity(name):
    fm = build_feature_map(name, num_heads=3, head_dim=8, feature_dim=5)
    x = torch.randn(2, 3, 7, 8)
    y = fm(x)
    assert y.shape == (2, 3, 7, SIZES[name])
    assert FEATURE_MAPS[name].output_dim(8, 5) == SIZES[name]
    assert bool((y >= 0).all())


def test_hedgehog_formula_and_identity_init():
    fm = build_feature_map("hedgehog", num_heads=2, head_dim=4, feature_dim=3)
    x = torch.randn(1, 2, 5, 4)
    u = x[..., :3]  # identity-like init: the first F coordinates
    expected = torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1).clamp(min=1e-12)
    torch.testing.assert_close(fm(x), expected)


def test_per_head_weights_are_independent():
    fm = build_feature_map("elu", num_heads=2, head_dim=4, feature_dim=4)
    with torch.no_grad():
        fm.weight[1].mul_(3)
    x = torch.randn(1, 1, 5, 4).expand(1, 2, 5, 4)
    y = fm(x)
    assert not torch.allclose(y[:, 0], y[:, 1])


def test_register_new_map_and_use_it():
    class Square(FeatureMap):
        name = "square_test"

        def forward(self, x):
            return self.project(x) ** 2

    hf_hybrid_attn.register_feature_map("square_test", Square)
    try:
        cfg = hf_hybrid_attn.HybridConfig(feature_map="square_test", feature_dim=4)
        assert cfg.feature_map == "square_test"
        with pytest.raises(ValueError, match="already registered"):
            hf_hybrid_attn.register_feature_map("square_test", Square)
    finally:
        FEATURE_MAPS.pop("square_test")
