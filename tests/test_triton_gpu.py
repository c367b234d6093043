"""Triton hybrid kernels on a real GPU: bf16, fp16 and fp32 at realistic sizes (D = F = 128, GQA 4:1).

Skipped without CUDA. Run on the GPU machine with `pytest -m gpu tests/test_triton_gpu.py`.
fp32 uses exact (IEEE) dots, so it is held to the interpreter's tolerance; bf16 is compared by
relative L2 error, as is fp16 (max-abs errors of 16-bit types are dominated by a few rounding outliers).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, H, HKV, D, FD = 2, 8, 2, 128, 128
NAMES = ("q", "k", "v", "phi_q", "phi_k", "gamma", "alpha")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def inputs(T, dtype, *, Tk=None, pad=(0, 0), init=False, seed=0):
    Tk = T if Tk is None else Tk
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, device="cuda")

    x = dict(
        q=rnd(B, H, T, D), k=rnd(B, HKV, Tk, D), v=rnd(B, HKV, Tk, D),
        phi_q=torch.softmax(rnd(B, H, T, FD), -1), phi_k=torch.softmax(rnd(B, H, Tk, FD), -1),
        gamma=torch.rand(H, generator=g, device="cuda") * 0.8 + 0.1,
        alpha=torch.rand(H, generator=g, device="cuda") + 0.5,
    )
    x = {n: (t.to(dtype) if t.dim() == 4 else t) for n, t in x.items()}
    valid = torch.ones(B, Tk, dtype=torch.bool, device="cuda")
    for b, p in enumerate(pad):
        valid[b, :p] = False
    state = (torch.rand(B, H, FD, D, device="cuda"), torch.rand(B, H, FD, device="cuda")) if init else None
    return x, valid, state


def l2_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_err(a, b, scale):
    return ((a.double() - b).abs().max() / max(b.abs().max().item(), scale)).item()


def compare(dtype, got, want, scale=0.0):
    err = max_err(got, want, scale) if dtype == torch.float32 else l2_err(got, want)
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,covers", [("hybrid", False), ("hybrid", True), ("swa_only", False), ("linear_only", False)])
def test_forward_backward_vs_float64_reference(dtype, mode, covers):
    from hf_hybrid_attn.kernels.reference import hybrid_attention_reference
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    T, window = 1000, 64
    x, valid, state = inputs(T, dtype, pad=(0, 123), init=True)
    kw = dict(window=window, scale=D**-0.5, mode=mode, linear_covers_window=covers, key_valid=valid)
    xt = {n: t.clone().requires_grad_() for n, t in x.items()}
    y = hybrid_attention_triton(**xt, initial_state=state, **kw)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(xt.values()), dy, allow_unused=True)
    xr = {n: t.double().requires_grad_() for n, t in x.items()}
    y_r = hybrid_attention_reference(**xr, initial_state=tuple(s.double() for s in state), **kw)
    grads_r = torch.autograd.grad(y_r, list(xr.values()), dy.double(), allow_unused=True)
    assert y.dtype == dtype
    compare(dtype, y, y_r)
    scale = grads_r[2].abs().max().item()
    for name, got, want in zip(NAMES, grads, grads_r):
        if want is None:
            assert got is None or got.abs().max().item() == 0.0, name
            continue
        if dtype != torch.float32 and name in ("gamma", "alpha"):
            # sums over B*T rows of terms that nearly cancel: compare against their own spread
            assert (got.double() - want).abs().max().item() < 5e-2 * max(want.abs().max().item(), 1.0), name
            continue
        compare(dtype, got, want, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_long_sequence_matches_chunked_torch(dtype):
    """T = 8192 with window 100 (three explicit tiles): against the chunked fp32 PyTorch path."""
    from hf_hybrid_attn.kernels.chunked import hybrid_attention_chunked
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    x, valid, _ = inputs(8192, dtype, pad=(0, 700))
    kw = dict(window=100, scale=D**-0.5, key_valid=valid, return_stats=True)
    y, lin_den, den = hybrid_attention_triton(**x, **kw)
    y_c, lin_den_c, den_c = hybrid_attention_chunked(**{n: t.double() for n, t in x.items()}, **kw)
    compare(dtype, y, y_c)
    compare(dtype, den, den_c)
    compare(dtype, lin_den, lin_den_c)


def test_backward_is_deterministic():
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    x, valid, _ = inputs(2048, torch.bfloat16, pad=(0, 5))
    runs = []
    for _ in range(2):
        xt = {n: t.clone().requires_grad_() for n, t in x.items()}
        y = hybrid_attention_triton(**xt, window=64, scale=D**-0.5, key_valid=valid)
        runs.append(torch.autograd.grad(y, list(xt.values()), torch.ones_like(y)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_steps_match_the_uncached_forward(dtype):
    from hf_hybrid_attn.kernels.reference import hybrid_attention_reference
    from hf_hybrid_attn.kernels.triton_decode import DecodeCache, hybrid_decode_triton
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    T, P, window = 700, 600, 64
    x, valid, state = inputs(T, dtype, pad=(40, 0), init=True)
    cut = {n: (t[:, :, :P] if t.dim() == 4 else t) for n, t in x.items()}
    _, prefill_state = hybrid_attention_triton(**cut, window=window, scale=D**-0.5, key_valid=valid[:, :P],
                                               initial_state=state, return_state=True)
    cache = DecodeCache.from_prefill(cut["k"], cut["v"], prefill_state, window, key_valid=valid[:, :P],
                                     phi_k=cut["phi_k"])
    ys = []
    for i in range(P, T):
        step = {n: x[n][:, :, i : i + 1] for n in ("q", "k", "v", "phi_q", "phi_k")}
        ys.append(hybrid_decode_triton(**step, gamma=x["gamma"], alpha=x["alpha"], cache=cache, scale=D**-0.5,
                                       key_valid=valid[:, i]))
    want = hybrid_attention_reference(**{n: t.double() for n, t in x.items()}, window=window, scale=D**-0.5,
                                      key_valid=valid, initial_state=tuple(s.double() for s in state))
    compare(dtype, torch.cat(ys, 2), want[:, :, P:])


def test_decode_step_replays_in_a_cuda_graph():
    from hf_hybrid_attn.kernels.triton_decode import DecodeCache, hybrid_decode_triton

    window, steps = 16, 40
    x, _, _ = inputs(steps, torch.bfloat16)
    static = {n: x[n][:, :, :1].clone() for n in ("q", "k", "v", "phi_q", "phi_k")}

    def fresh():
        return DecodeCache.empty(B, H, HKV, D, FD, window, dtype=torch.bfloat16, device="cuda", keep_phi_k=True)

    eager_cache, graph_cache = fresh(), fresh()
    eager = []
    for i in range(steps):
        step = {n: x[n][:, :, i : i + 1] for n in static}
        eager.append(hybrid_decode_triton(**step, gamma=x["gamma"], alpha=x["alpha"], cache=eager_cache,
                                          scale=D**-0.5))
    warm = fresh()  # compile outside the capture, on a throw-away cache
    hybrid_decode_triton(**static, gamma=x["gamma"], alpha=x["alpha"], cache=warm, scale=D**-0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = hybrid_decode_triton(**static, gamma=x["gamma"], alpha=x["alpha"], cache=graph_cache,
                                        scale=D**-0.5)
    assert graph_cache.position.item() == 0  # capturing records the step without running it
    for i in range(steps):
        for n in static:
            static[n].copy_(x[n][:, :, i : i + 1])
        graph.replay()
        assert torch.equal(y_static, eager[i]), i
    assert graph_cache.position.item() == steps


def test_dispatch_auto_uses_triton_on_cuda():
    from hf_hybrid_attn.kernels.dispatch import hybrid_attention, resolve_backend
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    x, valid, _ = inputs(300, torch.bfloat16, pad=(7, 0))
    kw = dict(window=64, scale=D**-0.5, key_valid=valid)
    assert torch.equal(hybrid_attention(**x, backend="auto", **kw), hybrid_attention_triton(**x, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_cuda_runs_the_fused_decode_kernel(dtype, monkeypatch):
    """generate() on CUDA (backend auto) decodes through kernels/triton_decode.py and matches the
    PyTorch path: fp32 token-exact greedy output, bf16 logits to bf16 tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_hybrid_attn as hha
    import hf_hybrid_attn.kernels.triton_decode as triton_decode

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    model = hha.convert(LlamaForCausalLM(cfg), window=16, feature_dim=64).to("cuda", dtype).eval()
    calls = []
    real = triton_decode.hybrid_decode_triton
    monkeypatch.setattr(triton_decode, "hybrid_decode_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 256, (3, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    out = model.generate(ids, **kw)
    assert len(calls) == 2 * 23
    for _, attn in hha.iter_hybrid_attention(model):
        attn.hybrid.backend = "torch"
    ref = model.generate(ids, **kw)
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences)
    first = min(i for i in range(24) if i == 23 or not torch.equal(out.sequences[:, 40 + i], ref.sequences[:, 40 + i]))
    for i in range(first + 1):  # logits agree up to the first token where the two paths pick differently
        compare(dtype, out.scores[i].float(), ref.scores[i].double(), scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_state_beyond_fp16_range_at_long_t(dtype):
    """Issue 11: the fp32 state S = sum phi_k v^T passes fp16's 65504 at T = 8192 (large features and
    values, small phi_q so both branches of the normaliser matter): the read-outs phi_q.S and g.S^T
    stay fp32 (TF32 dots on the GPU), so outputs and gradients are finite and match the chunked
    float64 path."""
    from hf_hybrid_attn.kernels.chunked import hybrid_attention_chunked
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    T = 8192
    x, valid, _ = inputs(T, torch.float32, pad=(0, 300))
    g = torch.Generator(device="cuda").manual_seed(5)
    x["v"] = 48.0 * torch.randn(x["v"].shape, generator=g, device="cuda")
    x["phi_k"] = 48.0 * torch.rand(x["phi_k"].shape, generator=g, device="cuda")
    x["phi_q"] = 4e-4 * torch.rand(x["phi_q"].shape, generator=g, device="cuda")
    x = {n: (t.to(dtype) if t.dim() == 4 else t) for n, t in x.items()}
    kw = dict(window=64, scale=D**-0.5, key_valid=valid)
    xt = {n: t.clone().requires_grad_() for n, t in x.items()}
    y, (S, _) = hybrid_attention_triton(**xt, return_state=True, **kw)
    assert S.abs().max().item() > torch.finfo(torch.float16).max
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(xt.values()), dy)
    xr = {n: t.double().requires_grad_() for n, t in x.items()}
    y_r = hybrid_attention_chunked(**xr, **kw)
    grads_r = torch.autograd.grad(y_r, list(xr.values()), dy.double())
    assert bool(torch.isfinite(y).all())
    compare(dtype, y, y_r)
    for name, got, want in zip(NAMES, grads, grads_r):
        assert bool(torch.isfinite(got).all()), name
        if name in ("gamma", "alpha"):
            assert (got.double() - want).abs().max().item() < 5e-2 * max(want.abs().max().item(), 1.0), name
            continue
        compare(dtype, got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    """Issue 11 (device_map="auto"): tensors on cuda:1 while cuda:0 is current give the results of
    the same call on cuda:0 (forward, backward, decode step)."""
    from hf_hybrid_attn.kernels.triton_decode import DecodeCache, hybrid_decode_triton
    from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton

    x, valid, state = inputs(300, torch.bfloat16, pad=(5, 0), init=True)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        xd = {n: t.to(dev).requires_grad_() for n, t in x.items()}
        st = tuple(s.to(dev) for s in state)
        y, prefill = hybrid_attention_triton(**{n: t[:, :, :299] if t.dim() == 4 else t for n, t in xd.items()},
                                             window=64, scale=D**-0.5, key_valid=valid[:, :299].to(dev),
                                             initial_state=st, return_state=True)
        grads = torch.autograd.grad(y, list(xd.values()), torch.ones_like(y), allow_unused=True)
        cache = DecodeCache.from_prefill(xd["k"][:, :, :299].detach(), xd["v"][:, :, :299].detach(), prefill, 64,
                                         phi_k=xd["phi_k"][:, :, :299].detach())
        step = {n: xd[n][:, :, 299:].detach() for n in ("q", "k", "v", "phi_q", "phi_k")}
        y_step = hybrid_decode_triton(**step, gamma=xd["gamma"].detach(), alpha=xd["alpha"].detach(), cache=cache,
                                      scale=D**-0.5)
        torch.cuda.synchronize(dev)
        results[dev] = [t.cpu() for t in (y, *[g for g in grads if g is not None], y_step, cache.S)]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        assert torch.equal(a, b)
