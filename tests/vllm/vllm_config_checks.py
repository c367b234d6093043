"""Bad input is refused with one clear error naming what is wrong, before any engine starts."""

from __future__ import annotations

import pytest
from harness import model_dir


def _config(name: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_dir(name), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                      **kwargs).create_engine_config()


def test_unsupported_family():
    with pytest.raises(Exception) as e:
        _config("bad_family", max_model_len=64)
    msg = str(e.value)
    assert "model_type 'hybrid_phi3'" in msg and "hybrid_llama" in msg and "hybrid_qwen3" in msg, msg


def test_unknown_feature_map():
    with pytest.raises(Exception) as e:
        _config("bad_feature_map", max_model_len=64)
    msg = str(e.value)
    assert "feature_map" in msg and "'no_such_map'" in msg and "hedgehog" in msg, msg


def test_max_model_len_below_window():
    with pytest.raises(Exception) as e:
        _config("tiny_llama", max_model_len=4)
    msg = str(e.value)
    assert "max_model_len" in msg and "window w=8" in msg and ">= 8" in msg, msg


def test_bad_override_is_named():
    with pytest.raises(Exception) as e:
        _config("tiny_llama", max_model_len=64, hf_overrides={"hybrid": {"component_mode": "bogus"}})
    msg = str(e.value)
    assert "component_mode" in msg and "'bogus'" in msg and "swa_only" in msg, msg


def test_a_good_config_passes_and_is_hybrid():
    cfg = _config("tiny_llama", max_model_len=64)
    assert cfg.model_config.architecture == "HybridLlamaForCausalLM"
    assert cfg.model_config.is_hybrid and cfg.cache_config.enable_prefix_caching is False
    assert cfg.cache_config.mamba_block_size == 64


def test_smollm2_state_is_constant_and_below_a_tenth_of_the_teacher_kv_at_32k():
    """Per sequence, as vLLM sizes its caches: the hybrid's state page (MambaSpec, all 30 layers)
    does not depend on max_model_len, and is < 1/10 of the teacher's paged KV cache for 32k tokens."""
    import torch
    from vllm.model_executor.models import ModelRegistry
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    sizes = []
    for max_len in (1024, 8192):
        cfg = _config("smollm2_hybrid", max_model_len=max_len)
        cls, _ = ModelRegistry.resolve_model_cls(cfg.model_config.architecture, model_config=cfg.model_config)
        spec = MambaSpec(shapes=cls.get_mamba_state_shape_from_config(cfg),
                         dtypes=cls.get_mamba_state_dtype_from_config(cfg), block_size=max_len)
        sizes.append(spec.page_size_bytes * cfg.model_config.hf_config.num_hidden_layers)
    assert sizes[0] == sizes[1]
    teacher = _config("smollm2_teacher", max_model_len=1024)
    hf = teacher.model_config.hf_config
    kv_token = FullAttentionSpec(block_size=1, num_kv_heads=hf.num_key_value_heads, head_size=64,
                                 dtype=torch.float32).page_size_bytes * hf.num_hidden_layers
    assert kv_token == 46080  # 2 (k, v) x 3 heads x 64 x 4 bytes x 30 layers
    print(f"\n[vllm] SmolLM2 hybrid state {sizes[0]} B/seq; teacher KV at 32k {kv_token * 32768} B "
          f"(ratio 1/{kv_token * 32768 / sizes[0]:.0f})")
    assert sizes[0] * 10 <= kv_token * 32768
    assert sizes[0] == 30 * 4 * (9 * 128 * 64 + 9 * 128 + 2 * 3 * 63 * 64 + 2 * 3 * 4 * 64)
