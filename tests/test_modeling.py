"""Conversion, component modes, save/load and errors on tiny models of every supported family."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def padded_batch(T=24, B=7, pad=2, side="left"):
    """transformers' backend-test pattern: batch 7, the last row padded by 2 tokens."""
    ids = torch.randint(3, 99, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if side == "left":
        mask[-1, :pad] = 0
    else:
        mask[-1, -pad:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_keeps_base_weights_and_inits_per_spec(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_cfg = model.config.to_dict()
    hha.convert(model, hha.HybridConfig(window=4, feature_dim=8))
    assert type(model).__name__.startswith("Hybrid") and model.config.model_type == f"hybrid_{family}"
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    new = [k for k in after if k not in before]
    assert len(new) == 2 * 3 and all(".self_attn.hybrid." in k for k in new)  # 2 layers x (W_q, W_k, logit)
    for _, attn in hha.iter_hybrid_attention(model):
        torch.testing.assert_close(attn.hybrid.gamma(), torch.full((4,), 0.1))
        torch.testing.assert_close(attn.hybrid.feature_map_q.weight[0], torch.eye(attn.head_dim, 8))
    # the teacher's attention layout is kept (its sdpa view is the teacher: tests/test_families.py)
    for key in ("sliding_window", "use_sliding_window", "layer_types"):
        assert getattr(model.config, key, None) == teacher_cfg.get(key), key
    expected_tw = 4096 if family == "mistral" else None  # Mistral's default window; Qwen2's is off by default
    assert [a.hybrid.teacher_window for _, a in hha.iter_hybrid_attention(model)] == [expected_tw] * 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_window_covering_sequence_equals_teacher(family, side):
    """window >= T: gamma cancels and the hybrid model is the softmax teacher (fp32 tolerance)."""
    model = tiny_model(family)
    ids, mask = padded_batch(side=side)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    hha.convert(model, window=64, feature_dim=8)
    randomize_mixers(model)
    for mode in ("hybrid", "swa_only"):
        with hha.component_mode(model, mode), torch.no_grad():
            out = model(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-4)


def _reference_attention_hook(mode):
    """A transfer hook computing the converted layer's attention from the readable definitions in
    float64: kernels/reference.py for hybrid / swa_only / linear_only, and, written out here, softmax
    over the first num_sinks keys j <= i for sinks_only (no padding in these inputs)."""
    from hf_hybrid_attn.kernels import expand_kv_heads, hybrid_attention_reference
    from hf_hybrid_attn.modeling import mixers_of

    def hook(module, q, k, v, key_valid, scaling):
        mixer = mixers_of(module)[0]
        q, k, v = q.double(), k.double(), v.double()
        H = q.shape[1]
        if mode == "sinks_only":
            kk, vv = expand_kv_heads(k, H), expand_kv_heads(v, H)
            T = q.shape[2]
            s = scaling * q @ kk.transpose(-1, -2)
            i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            s = s.masked_fill(~((j <= i) & (j < mixer.num_sinks)), float("-inf"))
            y = torch.softmax(s, -1) @ vv
        else:
            phi_q = mixer.feature_map_q(q)
            phi_k = mixer.feature_map_k(expand_kv_heads(k, H))
            y = hybrid_attention_reference(q, k, v, phi_q, phi_k, mixer.gamma().double(), mixer.alpha().double(),
                                           window=mixer.window, scale=scaling, mode=mode, key_valid=key_valid)
        return y.transpose(1, 2)

    return hook


def test_each_mode_equals_its_float64_reference():
    from hf_hybrid_attn.modeling import mixers_of

    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    randomize_mixers(model)
    model = model.double()
    ids = torch.randint(3, 99, (2, 30))
    outs = {}
    for mode in hha.COMPONENT_MODES:
        with hha.component_mode(model, mode), torch.no_grad():
            outs[mode] = model(ids).logits
        if mode == "none":
            continue
        mixers = [m for _, attn in hha.iter_hybrid_attention(model) for m in mixers_of(attn)]
        for m in mixers:
            m.transfer_hook = _reference_attention_hook(mode)
        try:
            with torch.no_grad():
                expected = model(ids).logits
        finally:
            for m in mixers:
                m.transfer_hook = None
        torch.testing.assert_close(outs[mode], expected, atol=1e-9, rtol=1e-9, msg=lambda e, mode=mode: f"{mode}: {e}")
    for a in outs:  # and the modes really compute different functions on these inputs
        for b in outs:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)
    model = model.float()
    outs["none"] = outs["none"].float()
    # `none`: the attention output is zero, i.e. the model without attention
    base = tiny_model()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".hybrid." not in k})
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: (torch.zeros_like(o[0]), o[1])) for layer in base.model.layers]
    with torch.no_grad():
        no_attn = base(ids).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(outs["none"], no_attn, atol=1e-6, rtol=1e-5)


def test_mode_per_layer_and_context_manager_restores():
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    hha.set_component_mode(model, "swa_only", layers=[1])
    assert hha.get_component_modes(model) == {0: "hybrid", 1: "swa_only"}
    with hha.component_mode(model, "none"):
        assert set(hha.get_component_modes(model).values()) == {"none"}
    assert hha.get_component_modes(model) == {0: "hybrid", 1: "swa_only"}
    with pytest.raises(ValueError, match="mode"):
        hha.set_component_mode(model, "linear")
    with pytest.raises(ValueError, match="layers"):
        hha.set_component_mode(model, "none", layers=[7])


def test_partial_conversion_leaves_other_layers_softmax():
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(3, 99, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    hha.convert(model, window=64, feature_dim=8, layers=[1])
    assert [i for i, _ in hha.iter_hybrid_attention(model)] == [1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-4)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)  # mixed cache: Dynamic + Hybrid layers
    with torch.no_grad():
        full = model(out).logits
    assert torch.equal(full[:, 19:-1].argmax(-1), out[:, 20:])


def test_save_load_round_trip(tmp_path):
    model = hha.convert(tiny_model("qwen2"), window=4, feature_dim=8, feature_map="hedgehog_exp")
    randomize_mixers(model)
    teacher_view = {k: v for k, v in model.state_dict().items() if ".hybrid." not in k}
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "hybrid_qwen2" and cfg["hybrid"]["window"] == 4

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config._attn_implementation == "hybrid_linear_swa"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, logits, rtol=0, atol=0)

    # the same folder through sdpa is the teacher (base weights, softmax)
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    teacher = tiny_model("qwen2")
    teacher.load_state_dict(teacher_view)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)


def test_bf16_conversion_keeps_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    hha.convert(model, window=4, feature_dim=8)
    for _, attn in hha.iter_hybrid_attention(model):
        assert all(p.dtype == torch.bfloat16 for p in attn.hybrid.parameters())
    with torch.no_grad():
        out = model(torch.randint(3, 99, (1, 10))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_unsupported_architecture_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99))
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        hha.convert(gpt2)
    with pytest.raises(ValueError, match="already converted"):
        hha.convert(hha.convert(tiny_model()))


def test_packed_masks_and_paged_cache_are_refused():
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 8)
    k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="paged attention / continuous batching"):
        hha.attention.hybrid_attention_forward(attn, q, k, v, None, cache=object())
    block = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    block[..., :3, :3] = True
    block[..., 3:, 3:] = True
    block &= torch.ones(6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="causal masks with padding only"):
        hha.attention.hybrid_attention_forward(attn, q, k, v, block)


def test_loading_without_the_package_says_what_to_import(tmp_path):
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    model.save_pretrained(tmp_path)
    code = (
        "import sys, transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "except Exception as e:\n"
        "    print('ERROR:', e)\n"
        "    sys.exit(0)\n"
        "print('LOADED', 'hf_hybrid_attn' in sys.modules)\n"
    )
    # 1) the package is not importable at all: a clear message saying what to install and import
    env = {**os.environ, "HF_HYBRID_ATTN_BLOCK_IMPORT": "1"}
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hf_hybrid_attn' or name.startswith('hf_hybrid_attn.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'hf_hybrid_attn'\")\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env["PYTHONPATH"] = str(blocker)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR:" in out.stdout, out.stdout + out.stderr
    assert "import hf_hybrid_attn" in out.stdout and "pip install hf-hybrid-attn" in out.stdout
    # 2) installed but not imported: trust_remote_code's loader shim imports it and loads as hybrid
    env.pop("PYTHONPATH")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "LOADED True" in out.stdout, out.stdout + out.stderr
    # 3) without trust_remote_code and without the import, transformers refuses and asks for it
    code2 = code.replace(", trust_remote_code=True", "")
    out = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert "LOADED" not in out.stdout and "trust_remote_code=True" in out.stdout + out.stderr


def test_from_pretrained_on_a_base_checkpoint_initialises_missing_hybrid_weights(tmp_path):
    """Loading a base checkpoint into the hybrid class: missing hybrid weights get the SPEC init
    (never uninitialised memory) and base weights load bit-identically."""
    from hf_hybrid_attn.modeling import HYBRID_CONFIGS, HYBRID_MODELS

    base = tiny_model()
    base.save_pretrained(tmp_path)
    d = {k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    cfg = HYBRID_CONFIGS["llama"](**d, hybrid=hha.HybridConfig(window=4, feature_dim=8, init_window_gamma=0.25).to_dict())
    model = HYBRID_MODELS["llama"].from_pretrained(tmp_path, config=cfg)
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for _, attn in hha.iter_hybrid_attention(model):
        torch.testing.assert_close(attn.hybrid.gamma(), torch.full((4,), 0.25))
        for fm in (attn.hybrid.feature_map_q, attn.hybrid.feature_map_k):
            torch.testing.assert_close(fm.weight, torch.eye(8, 8).expand(4, 8, 8))


def test_set_window_is_recorded_and_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    hha.set_window(model, 7)
    assert model.config.hybrid["window"] == 7
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [a.hybrid.window for _, a in hha.iter_hybrid_attention(again)] == [7, 7]
    hha.set_window(again, 3, layers=[0])  # a per-layer change is a run-time setting only
    assert again.config.hybrid["window"] == 7


def test_generate_cli_device_and_mode_choices(tmp_path, capsys):
    from hf_hybrid_attn.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--mode", "linear"])
    assert "invalid choice: 'linear'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--device"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--device", "tpu-9"])
