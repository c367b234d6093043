"""generate()/cached decoding through the fused Triton decode-step kernel (`kernels/triton_decode.py`).

On CUDA the Triton backend is the default ("auto"); here it is forced (`backend="triton"`) and runs in
Triton's CPU interpreter (fp32), against the uncached forward of the PyTorch path. The kernel must
really run: its calls are counted.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_cache import left_padded  # noqa: E402

import hf_hybrid_attn as hha  # noqa: E402
import hf_hybrid_attn.kernels.triton_decode as triton_decode  # noqa: E402
from conftest import randomize_mixers, tiny_model  # noqa: E402
from hf_hybrid_attn.compat import cache_kwargs  # noqa: E402

if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes"):
        pytest.skip("Triton's interpreter is off and there is no GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = hha.convert(tiny_model(), window=5, feature_dim=8, num_sinks=2)
    randomize_mixers(m)
    return m


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = triton_decode.hybrid_decode_triton

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_decode, "hybrid_decode_triton", wrapper)
    return calls


def _set(model, backend: str, covers: bool = False) -> None:
    for _, attn in hha.iter_hybrid_attention(model):
        attn.hybrid.backend = backend
        attn.hybrid.linear_covers_window = covers


def _decode(model, ids, mask, pos, prefill):
    cache = hha.HybridCache(model.config)
    outs = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                  **cache_kwargs(cache), use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                          **cache_kwargs(cache), use_cache=True).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("prefill", [1, 3, 11])
@pytest.mark.parametrize("covers", [False, True])
def test_fused_decode_equals_uncached_forward(model, counted, mode, prefill, covers):
    ids, mask, pos = left_padded(T=16)
    try:
        with hha.component_mode(model, mode), torch.no_grad():
            _set(model, "torch", covers)
            full = model(ids, attention_mask=mask, position_ids=pos).logits
            _set(model, "triton", covers)
            inc, cache = _decode(model, ids, mask, pos, prefill)
    finally:
        _set(model, "auto")
    steps = ids.shape[1] - prefill + (prefill == 1)  # a 1-token prefill is a decode step too
    assert counted == [mode] * (steps * 2)  # every decode step of both layers ran the fused kernel
    assert (inc - full)[mask.bool()].abs().max().item() <= 1e-5
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 4 and layer.state[0].dtype == torch.float32  # w-1 raw keys + fp32 state


def test_modes_switched_mid_stream_keep_the_cache_exact(model, counted):
    """Fused steps (hybrid) must maintain everything the other modes read later: the state, the
    window buffer and the attention sinks (sinks_only, which the kernel does not run). The reference
    is the same schedule on the PyTorch path (whose cache test_cache checks against the uncached
    forward); a full forward in one mode is not, since earlier tokens were computed in another."""
    ids, mask, pos = left_padded(T=18)
    schedule = ["hybrid"] * 12 + ["sinks_only"] * 3 + ["linear_only"] * 3

    def run(backend):
        _set(model, backend)
        cache = hha.HybridCache(model.config)
        hha.set_component_mode(model, "hybrid")
        outs = [model(ids[:, :2], attention_mask=mask[:, :2], position_ids=pos[:, :2], **cache_kwargs(cache),
                      use_cache=True).logits]
        for t in range(2, 18):
            hha.set_component_mode(model, schedule[t])
            outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                              **cache_kwargs(cache), use_cache=True).logits)
        return torch.cat(outs, 1)

    try:
        with torch.no_grad():
            ref = run("torch")
            assert counted == []
            fused = run("triton")
    finally:
        _set(model, "auto")
        hha.set_component_mode(model, "hybrid")
    assert counted.count("hybrid") == 2 * 10 and counted.count("linear_only") == 2 * 3
    assert (fused - ref)[mask.bool()].abs().max().item() <= 1e-5


def test_generate_uses_the_fused_kernel_and_matches_the_torch_path(model, counted):
    ids, mask, _ = left_padded(T=9)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    try:
        _set(model, "torch")
        ref = model.generate(ids, **kw)
        assert counted == []
        _set(model, "triton")
        out = model.generate(ids, **kw)
    finally:
        _set(model, "auto")
    assert len(counted) == 2 * 7  # 8 new tokens: 1 from the prefill, 7 decode steps, 2 layers
    assert torch.equal(out, ref)


def test_training_and_stats_never_take_the_inference_kernel(model, counted):
    ids, mask, pos = left_padded(T=8)
    try:
        _set(model, "triton")
        cache = hha.HybridCache(model.config)
        with torch.no_grad():
            model(ids[:, :7], attention_mask=mask[:, :7], position_ids=pos[:, :7], **cache_kwargs(cache))
        q_grad = model(ids[:, 7:], attention_mask=mask, position_ids=pos[:, 7:], **cache_kwargs(cache)).logits
        assert q_grad.requires_grad and counted == []  # a step with autograd uses the differentiable path
    finally:
        _set(model, "auto")
