"""Triton hybrid kernels vs the float64 reference, in the Triton CPU interpreter (CI has no GPU).

fp32 only: bf16 is not emulated faithfully by the interpreter. Small D/F keep the run short; the
GPU sizes and bf16 live in test_triton_gpu.py.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

# The interpreter must be on before triton is first imported: see tests/_interpreter.py.
import _interpreter  # noqa: E402
import pytest
import torch

INTERPRETER_UNAVAILABLE = _interpreter.prepare()

triton = pytest.importorskip("triton")

from test_decode_torch import check_per_row_positions  # noqa: E402

from hf_hybrid_attn.kernels.reference import hybrid_attention_reference, linear_state  # noqa: E402
from hf_hybrid_attn.kernels.triton_decode import DecodeCache, hybrid_decode_triton  # noqa: E402
from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton  # noqa: E402

_in_process_interpreter, test_interpreter_suite_in_subprocess = _interpreter.subprocess_suite(
    __file__, "test_interpreter_suite_in_subprocess", INTERPRETER_UNAVAILABLE)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = F = 16
RTOL = 1e-4


def make_inputs(B=2, H=4, Hkv=2, Tq=200, Tk=None, pad=(0, 0), init=False, seed=0, Fdim=F):
    """Random inputs; `pad` = number of left-padded keys per batch row (key_valid False)."""
    Tk = Tq if Tk is None else Tk
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    x = dict(
        q=r(B, H, Tq, D),
        k=r(B, Hkv, Tk, D),
        v=r(B, Hkv, Tk, D),
        phi_q=torch.rand(B, H, Tq, Fdim, generator=g),  # positive, like real feature maps
        phi_k=torch.rand(B, H, Tk, Fdim, generator=g),
        gamma=torch.rand(H, generator=g) * 0.8 + 0.1,
        alpha=torch.rand(H, generator=g) + 0.5,
    )
    valid = torch.ones(B, Tk, dtype=torch.bool)
    for b, p in enumerate(pad[:B]):
        valid[b, :p] = False
    state = (torch.rand(B, H, Fdim, D, generator=g), torch.rand(B, H, Fdim, generator=g)) if init else None
    return x, valid, state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def run_both(x, valid, state, chunk_size=64, **kw):
    """(triton fp32 outputs, reference fp64 outputs) with stats."""
    dev = {n: t.to(DEVICE) for n, t in x.items()}
    st = None if state is None else tuple(s.to(DEVICE) for s in state)
    out = hybrid_attention_triton(**dev, key_valid=valid.to(DEVICE), initial_state=st, return_stats=True,
                                  chunk_size=chunk_size, **kw)
    ref = hybrid_attention_reference(
        **{n: t.double() for n, t in x.items()},
        key_valid=valid,
        initial_state=None if state is None else tuple(s.double() for s in state),
        return_stats=True,
        **kw,
    )
    return out, ref


def check_forward(x, valid, state, **kw):
    (y, lin_den, den), (y_r, lin_den_r, den_r) = run_both(x, valid, state, **kw)
    assert y.dtype == torch.float32 and y.shape == y_r.shape
    assert rel_err(y.cpu(), y_r) < RTOL
    assert rel_err(den.cpu(), den_r) < RTOL
    if kw.get("mode") != "swa_only":
        assert rel_err(lin_den.cpu(), lin_den_r) < RTOL
    else:
        assert lin_den.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("window", [1, 16, 64, 100])
def test_forward_modes_windows_gqa_padding(mode, window):
    x, valid, _ = make_inputs(Tq=200, pad=(0, 37))
    check_forward(x, valid, None, window=window, scale=D**-0.5, mode=mode)


@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("window", [16, 64, 100])
def test_forward_lengths(T, window):
    x, valid, _ = make_inputs(Tq=T, pad=(0, T // 3))
    check_forward(x, valid, None, window=window, scale=D**-0.5, mode="hybrid")


@pytest.mark.parametrize("window", [1, 64, 100])
def test_forward_linear_covers_window(window):
    x, valid, _ = make_inputs(Tq=200, pad=(70, 3))
    check_forward(x, valid, None, window=window, scale=D**-0.5, mode="hybrid", linear_covers_window=True)


@pytest.mark.parametrize("mode", ["hybrid", "linear_only"])
@pytest.mark.parametrize("Tq,Tk", [(1, 200), (37, 200), (65, 130)])
def test_forward_initial_state_and_suffix_queries(mode, Tq, Tk):
    x, valid, state = make_inputs(Tq=Tq, Tk=Tk, pad=(5, 0), init=True)
    check_forward(x, valid, state, window=64, scale=D**-0.5, mode=mode)


def test_forward_fully_padded_row_is_zero():
    x, valid, _ = make_inputs(Tq=70, pad=(70, 0))
    (y, _, den), (y_r, _, _) = run_both(x, valid, None, window=16, scale=D**-0.5, mode="hybrid")
    assert y[0].abs().max().item() == 0.0 and den[0].abs().max().item() == 0.0
    assert rel_err(y.cpu(), y_r) < RTOL


def test_forward_feature_dim_not_power_of_two_and_chunk_32():
    x, valid, state = make_inputs(Tq=90, pad=(4, 0), init=True, Fdim=24)
    check_forward(x, valid, state, window=40, scale=0.3, mode="hybrid", chunk_size=32)


@pytest.mark.parametrize("mode,window", [("hybrid", 64), ("swa_only", 16), ("linear_only", 100), ("hybrid", 1)])
@pytest.mark.parametrize("T", [63, 200])
def test_return_state_is_all_but_last_window_minus_one_keys(mode, window, T):
    x, valid, state = make_inputs(Tq=T, pad=(9, 0), init=True)
    y, (S, z) = hybrid_attention_triton(
        **{n: t.to(DEVICE) for n, t in x.items()}, key_valid=valid.to(DEVICE),
        initial_state=tuple(s.to(DEVICE) for s in state), window=window, scale=D**-0.5, mode=mode,
        return_state=True,
    )
    S_r, z_r = linear_state(x["phi_k"].double(), x["v"].double(), end=T - (window - 1), key_valid=valid,
                            initial_state=tuple(s.double() for s in state))
    assert S.dtype == torch.float32 and S.shape == S_r.shape and z.shape == z_r.shape
    assert rel_err(S.cpu(), S_r) < RTOL and rel_err(z.cpu(), z_r) < RTOL


def test_dispatch_backend_triton_calls_this_kernel():
    from hf_hybrid_attn.kernels.dispatch import hybrid_attention

    x, valid, state = make_inputs(Tq=50, Tk=90, pad=(3, 0), init=True)
    x, valid = {n: t.to(DEVICE) for n, t in x.items()}, valid.to(DEVICE)
    state = tuple(s.to(DEVICE) for s in state)
    kw = dict(window=16, scale=D**-0.5, key_valid=valid, initial_state=state, return_stats=True, chunk_size=32)
    got = hybrid_attention(**x, backend="triton", **kw)
    want = hybrid_attention_triton(**x, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_input_errors_name_the_argument():
    x, valid, _ = make_inputs(Tq=8)
    x, valid = {n: t.to(DEVICE) for n, t in x.items()}, valid.to(DEVICE)
    kw = dict(window=4, scale=0.25)
    with pytest.raises(ValueError, match="mode"):
        hybrid_attention_triton(**x, mode="sinks_only", **kw)
    with pytest.raises(ValueError, match="phi_k"):
        hybrid_attention_triton(**{**x, "phi_k": x["phi_k"][:, :, :4]}, **kw)
    with pytest.raises(ValueError, match="key_valid"):
        hybrid_attention_triton(**x, key_valid=valid[:, :3], **kw)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention_triton(**x, window=0, scale=0.25)
    with pytest.raises(ValueError, match="chunk_size"):
        hybrid_attention_triton(**x, chunk_size=48, **kw)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        hybrid_attention_triton(**{n: t.double() for n, t in x.items()}, **kw)


# ---------------------------------------------------------------------------------------------
# backward: gradients of y w.r.t. q, k, v, phi_q, phi_k, gamma, alpha against fp64 autograd
# ---------------------------------------------------------------------------------------------
GRAD_NAMES = ("q", "k", "v", "phi_q", "phi_k", "gamma", "alpha")


def check_backward(x, valid, state, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(*x["q"].shape[:3], x["v"].shape[-1], generator=g)
    xt = {n: x[n].to(DEVICE).requires_grad_() for n in GRAD_NAMES}
    st = None if state is None else tuple(s.to(DEVICE) for s in state)
    y = hybrid_attention_triton(**xt, key_valid=valid.to(DEVICE), initial_state=st, **kw)
    grads = torch.autograd.grad(y, list(xt.values()), dy.to(DEVICE), allow_unused=True)
    xr = {n: x[n].double().requires_grad_() for n in GRAD_NAMES}
    y_r = hybrid_attention_reference(
        **xr, key_valid=valid, initial_state=None if state is None else tuple(s.double() for s in state), **kw
    )
    grads_r = torch.autograd.grad(y_r, list(xr.values()), dy.double(), allow_unused=True)
    assert rel_err(y.detach().cpu(), y_r.detach()) < RTOL
    # Some gradients are exactly 0 (e.g. gamma in swa_only, q/k with window 1): measure errors
    # against the scale of the problem's gradients, max |dv|, as well as against their own size.
    scale = grads_r[2].abs().max().item()
    for name, got, want in zip(GRAD_NAMES, grads, grads_r):
        if want is None:  # input not used in this mode
            assert got is None or got.abs().max().item() == 0.0, name
            continue
        assert got is not None, f"missing gradient for {name}"
        assert got.shape == want.shape, name
        err = (got.cpu().double() - want).abs().max().item() / max(want.abs().max().item(), scale)
        assert err < RTOL, f"d{name}: error {err:.2e}"


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("window", [1, 16, 64, 100])
def test_backward_modes_windows_gqa_padding(mode, window):
    x, valid, _ = make_inputs(Tq=200, pad=(0, 37))
    check_backward(x, valid, None, window=window, scale=D**-0.5, mode=mode)


@pytest.mark.parametrize("T,window", [(1, 64), (63, 64), (65, 64), (65, 100), (63, 16)])
def test_backward_lengths(T, window):
    x, valid, _ = make_inputs(Tq=T, pad=(T // 3, 0))
    check_backward(x, valid, None, window=window, scale=D**-0.5, mode="hybrid")


@pytest.mark.parametrize("window", [1, 64])
def test_backward_linear_covers_window(window):
    x, valid, _ = make_inputs(Tq=200, pad=(70, 3))
    check_backward(x, valid, None, window=window, scale=D**-0.5, mode="hybrid", linear_covers_window=True)


@pytest.mark.parametrize("mode", ["hybrid", "linear_only"])
def test_backward_initial_state_and_suffix_queries(mode):
    x, valid, state = make_inputs(Tq=37, Tk=200, pad=(5, 0), init=True)
    check_backward(x, valid, state, window=64, scale=D**-0.5, mode=mode)


def test_backward_without_gqa_and_mha_heads():
    x, valid, state = make_inputs(H=2, Hkv=2, Tq=130, pad=(0, 20), init=True)
    check_backward(x, valid, state, window=33, scale=0.2, mode="hybrid")


@pytest.mark.parametrize("window", [1, 64])
def test_backward_with_its_own_chunk_size(window, monkeypatch):
    """The backward may block differently from the forward (BACKWARD_CHUNK): same gradients."""
    import hf_hybrid_attn.kernels.triton_hybrid as triton_hybrid

    monkeypatch.setattr(triton_hybrid, "BACKWARD_CHUNK", 32)
    x, valid, state = make_inputs(Tq=100, Tk=150, pad=(7, 0), init=True)
    check_backward(x, valid, state, window=window, scale=D**-0.5, mode="hybrid")


def test_backward_gradient_flows_through_the_window_max():
    """With one huge score per row the max term dominates: dropping dc_i would be visibly wrong."""
    x, valid, _ = make_inputs(B=1, H=2, Hkv=1, Tq=80)
    x["k"][0, 0, 10] *= 30.0
    check_backward(x, valid, None, window=64, scale=D**-0.5, mode="hybrid")


# ---------------------------------------------------------------------------------------------
# decode: token-by-token with the fused decode kernel == the uncached forward
# ---------------------------------------------------------------------------------------------
def decode_sequence(x, valid, state, *, prefill, window, modes, ring=True, linear_covers_window=False):
    """Prefill `prefill` tokens with the chunked kernel, then decode the rest one by one; `modes`
    gives the mode per decoded token (mode switches at run time share one cache)."""
    dev = {n: t.to(DEVICE) for n, t in x.items()}
    valid = valid.to(DEVICE)
    B, H, T, Dh = dev["q"].shape
    Hkv, Fd = dev["k"].shape[1], dev["phi_k"].shape[-1]
    st = (torch.zeros(B, H, Fd, Dh), torch.zeros(B, H, Fd)) if state is None else state
    st = tuple(s.to(DEVICE) for s in st)
    common = dict(scale=Dh**-0.5, linear_covers_window=linear_covers_window)
    if prefill > 0:
        cut = {n: t[:, :, :prefill] for n, t in dev.items() if n not in ("gamma", "alpha")}
        _, prefill_state = hybrid_attention_triton(
            **cut, gamma=dev["gamma"], alpha=dev["alpha"], window=window, mode=modes[0],
            key_valid=valid[:, :prefill], initial_state=st, return_state=True, **common,
        )
        cache = DecodeCache.from_prefill(cut["k"], cut["v"], prefill_state, window, key_valid=valid[:, :prefill],
                                         phi_k=cut["phi_k"] if ring else None)
    else:
        cache = DecodeCache.empty(B, H, Hkv, Dh, Fd, window, dtype=dev["q"].dtype, device=DEVICE, keep_phi_k=ring)
        cache.S.copy_(st[0])
        cache.z.copy_(st[1])
    outs = []
    for i, mode in zip(range(prefill, T), modes):
        step = {n: dev[n][:, :, i : i + 1] for n in ("q", "k", "v", "phi_q", "phi_k")}
        evicted = i - window + 1
        phi_k_evict = None
        if not ring:  # the caller supplies phi_k of the key leaving the window
            phi_k_evict = dev["phi_k"][:, :, evicted : evicted + 1] if evicted >= 0 else torch.zeros_like(step["phi_k"])
        outs.append(hybrid_decode_triton(**step, gamma=dev["gamma"], alpha=dev["alpha"], cache=cache, mode=mode,
                                         phi_k_evict=phi_k_evict, key_valid=valid[:, i], **common))
    assert cache.position.item() == T
    return torch.cat(outs, 2).cpu(), cache


def reference_rows(x, valid, state, mode, window, **kw):
    st = None if state is None else tuple(s.double() for s in state)
    return hybrid_attention_reference(**{n: t.double() for n, t in x.items()}, window=window, scale=D**-0.5,
                                      mode=mode, key_valid=valid, initial_state=st, **kw)


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "linear_only"])
@pytest.mark.parametrize("window", [1, 16, 64, 100])
def test_decode_matches_uncached_forward(mode, window):
    T, prefill = 72, 30  # the 63-slot ring (w=64) wraps during decoding
    x, valid, _ = make_inputs(Tq=T, pad=(0, 35), seed=window)
    y, _ = decode_sequence(x, valid, None, prefill=prefill, window=window, modes=[mode] * T)
    want = reference_rows(x, valid, None, mode, window)[:, :, prefill:]
    assert rel_err(y, want) < RTOL


@pytest.mark.parametrize("window,ring", [(16, True), (16, False), (100, False), (1, False)])
def test_decode_from_empty_cache_with_initial_state(window, ring):
    x, valid, state = make_inputs(Tq=40, pad=(5, 0), init=True)
    y, cache = decode_sequence(x, valid, state, prefill=0, window=window, modes=["hybrid"] * 40, ring=ring)
    assert rel_err(y, reference_rows(x, valid, state, "hybrid", window)) < RTOL
    # the state now covers every key but the last window-1
    S_r, z_r = linear_state(x["phi_k"].double(), x["v"].double(), end=40 - (window - 1), key_valid=valid,
                            initial_state=tuple(s.double() for s in state))
    assert rel_err(cache.S.cpu(), S_r) < RTOL and rel_err(cache.z.cpu(), z_r) < RTOL


@pytest.mark.parametrize("window", [1, 16])
def test_decode_linear_covers_window(window):
    x, valid, state = make_inputs(Tq=60, pad=(5, 0), init=True)
    y, _ = decode_sequence(x, valid, state, prefill=25, window=window, modes=["hybrid"] * 60,
                           linear_covers_window=True)
    want = reference_rows(x, valid, state, "hybrid", window, linear_covers_window=True)[:, :, 25:]
    assert rel_err(y, want) < RTOL


def test_decode_mode_switch_mid_stream_keeps_the_cache_valid():
    T, prefill, window = 60, 20, 16
    x, valid, _ = make_inputs(Tq=T, pad=(3, 0))
    modes = (["hybrid", "swa_only", "linear_only"] * T)[: T - prefill]
    y, _ = decode_sequence(x, valid, None, prefill=prefill, window=window, modes=modes)
    for i, mode in enumerate(modes):
        want = reference_rows(x, valid, None, mode, window)[:, :, prefill + i]
        assert rel_err(y[:, :, i], want) < RTOL, (i, mode)


@pytest.mark.parametrize("mode,covers", [("hybrid", False), ("hybrid", True), ("swa_only", False),
                                         ("linear_only", False)])
@pytest.mark.parametrize("w", [1, 5])
def test_decode_a_position_per_row_equals_each_row_alone(mode, covers, w):
    """Rows at different positions (vLLM's decode batch): the kernel evicts and writes each row's own slot."""
    check_per_row_positions(hybrid_decode_triton, mode, covers, w, device=DEVICE)


def test_decode_input_errors():
    x, _, _ = make_inputs(Tq=4)
    x = {n: t.to(DEVICE) for n, t in x.items()}
    cache = DecodeCache.empty(2, 4, 2, D, F, 8, dtype=torch.float32, device=DEVICE)
    step = {n: x[n][:, :, :1] for n in ("q", "k", "v", "phi_q", "phi_k")}
    kw = dict(gamma=x["gamma"], alpha=x["alpha"], cache=cache, scale=0.25)
    with pytest.raises(ValueError, match="phi_k_evict"):
        hybrid_decode_triton(**step, **kw)
    with pytest.raises(ValueError, match="reads phi_k of the window"):
        hybrid_decode_triton(**step, **kw, mode="linear_only")
    with pytest.raises(ValueError, match="one new token"):
        hybrid_decode_triton(**{**step, "q": x["q"][:, :, :2]}, **kw, phi_k_evict=step["phi_k"])
    with pytest.raises(ValueError, match=r"cache.position: expected an int64 tensor \[1\] or \[2\]"):
        hybrid_decode_triton(**step, **{**kw, "cache": dataclasses.replace(cache, position=cache.position.repeat(3))},
                             phi_k_evict=step["phi_k"])
    strided = dataclasses.replace(cache, k_win=torch.zeros(2, 2, 9, D, device=DEVICE)[:, :, :7])
    with pytest.raises(ValueError, match="cache.k_win: the Triton decode step needs contiguous cache tensors"):
        hybrid_decode_triton(**step, **{**kw, "cache": strided}, phi_k_evict=step["phi_k"])


def test_benchmark_script_smoke(tmp_path):
    """benchmarks/bench_kernels.py end to end on CPU (interpreter): gates pass, report written."""
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = tmp_path.glob("kernels_*.json")
    data = json.loads(result.read_text())
    assert {g["status"] for g in data["gate"].values()} == {"pass"}
    assert data["decode"]["gate"]["status"] == "pass"
    assert data["train"]["hybrid_triton|B=1|T=128|fwd_bwd"]["tokens_per_s"] > 0
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().startswith("# Kernel benchmark on")


def test_kernels_compile_for_h100_within_shared_memory():
    """The interpreter never compiles: build every kernel for sm_90 (no GPU needed) with bf16 at
    D = F = 128 and check that each fits the H100's 227 KiB of shared memory."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--compile-check", "--compile-dtypes", "bf16",
                          "--compile-warps", "8"], env=env, capture_output=True, text=True, timeout=1200)
    rows = [line for line in run.stdout.splitlines() if line.startswith("[compile sm_90]")]
    assert run.returncode == 0 and len(rows) == 4, run.stdout[-4000:] + run.stderr[-3000:]
