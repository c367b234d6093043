import pytest

from hf_hybrid_attn import FEATURE_MAPS, HybridConfig
from hf_hybrid_attn.config import FORMAT_VERSION


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(window=0), "window"),
        (dict(window=-3), "window"),
        (dict(window=2.5), "window"),
        (dict(feature_dim=0), "feature_dim"),
        (dict(feature_map="cosformer"), "feature_map"),
        (dict(component_mode="linear"), "component_mode"),
        (dict(init_window_gamma=1.0), "init_window_gamma"),
        (dict(num_sinks=0), "num_sinks"),
        (dict(layers=[0, -1]), "layers"),
        (dict(backend="cuda"), "backend"),
        (dict(affine_mix="yes"), "affine_mix"),
        (dict(chunk_size=8), "chunk_size"),
        (dict(chunk_size=48), "chunk_size must be a power of two >= 16"),
        (dict(layers="local"), "layers"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HybridConfig(**kwargs)


def test_round_trip_and_version_check():
    cfg = HybridConfig(window=32, feature_map="softmax", layers=[3, 1, 1], training={"recipe": "ssd"})
    assert cfg.layers == [1, 3]
    d = cfg.to_dict()
    assert d["format_version"] == FORMAT_VERSION
    assert HybridConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="format_version"):
        HybridConfig.from_dict({**d, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="unknown HybridConfig fields"):
        HybridConfig.from_dict({**d, "windw": 3})


def test_layer_indices():
    assert HybridConfig().layer_indices(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="layers"):
        HybridConfig(layers=[5]).layer_indices(3)


def test_all_spec_feature_maps_registered():
    assert {"hedgehog", "hedgehog_exp", "softmax", "elu", "relu", "identity_elu"} <= set(FEATURE_MAPS)


def test_parse_layers():
    from hf_hybrid_attn.config import parse_layers

    assert parse_layers("all") is None and parse_layers("global") == "global" and parse_layers("0, 3") == [0, 3]
    with pytest.raises(ValueError, match="comma-separated layer indices"):
        parse_layers("first")
