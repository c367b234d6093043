"""The chunked PyTorch path against the float64 reference, forward and backward (SPEC §2)."""

import itertools

import pytest
import torch

from hf_hybrid_attn.kernels import (
    KERNEL_MODES,
    hybrid_attention,
    hybrid_attention_chunked,
    hybrid_attention_reference,
    linear_state,
    sinks_attention,
)

DT = torch.float64


def make_inputs(B=2, H=4, Hkv=2, Tq=20, Tk=None, D=8, F=6, pad=3, requires_grad=True):
    Tk = Tq if Tk is None else Tk
    g = torch.Generator().manual_seed(Tq * 131 + Tk)
    t = lambda *s: torch.randn(*s, dtype=DT, generator=g).requires_grad_(requires_grad)  # noqa: E731
    r = lambda *s: torch.rand(*s, dtype=DT, generator=g).add(0.05).requires_grad_(requires_grad)  # noqa: E731
    valid = torch.ones(B, Tk, dtype=torch.bool)
    if B > 1:
        valid[1, : min(pad, Tk - 1)] = False  # left padding in row 1
    return (t(B, H, Tq, D), t(B, Hkv, Tk, D), t(B, Hkv, Tk, D), r(B, H, Tq, F), r(B, H, Tk, F), r(H), r(H)), valid


def grads(y, args, go):
    return torch.autograd.grad(y, args, go, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("T,w", list(itertools.product([1, 63, 64, 65, 200], [1, 16, 64])))
def test_chunked_matches_reference_all_modes(T, w):
    for mode, covers in [(m, False) for m in KERNEL_MODES] + [("hybrid", True)]:
        args, valid = make_inputs(Tq=T)
        kw = dict(window=w, scale=0.35, mode=mode, linear_covers_window=covers, key_valid=valid)
        y_ref = hybrid_attention_reference(*args, **kw)
        y = hybrid_attention_chunked(*args, **kw, chunk_size=16)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        go = torch.randn_like(y_ref)
        for a, b, name in zip(grads(y, args, go), grads(y_ref, args, go), "q k v phi_q phi_k gamma alpha".split()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name, md=mode: f"{md} d{n}: {m}")


@pytest.mark.parametrize("T,w,chunk", [(1, 1, 64), (63, 16, 64), (65, 64, 64), (200, 5, 64), (200, 64, 16),
                                         (1000, 64, 64), (130, 7, 3)])
def test_inference_path_matches_reference(T, w, chunk):
    """Without autograd the window branch takes its in-place path (`_window_branch_inference`, tiles
    of min(chunk, 16) queries; with autograd, tiles of min(chunk, 32)): the same function as the
    float64 reference at odd sizes, with GQA and left padding, in every mode; and the same as the
    autograd path's forward."""
    for mode, covers in [(m, False) for m in KERNEL_MODES] + [("hybrid", True)]:
        args, valid = make_inputs(Tq=T, pad=min(9, T), requires_grad=False)
        kw = dict(window=w, scale=0.35, mode=mode, linear_covers_window=covers, key_valid=valid, return_stats=True)
        ref = hybrid_attention_reference(*args, **kw)
        with torch.no_grad():
            out = hybrid_attention_chunked(*args, **kw, chunk_size=chunk)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, md=mode: f"{md}: {m}")
        graded = hybrid_attention_chunked(*(t.clone().requires_grad_(True) for t in args), **kw, chunk_size=chunk)
        for a, b in zip(out, graded):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 2), (1, 64), (1, 200), (3, 40), (16, 17), (16, 200), (17, 90)])
@pytest.mark.parametrize("w", [1, 5, 64])
def test_suffix_queries_match_reference_with_state(Tq, Tk, w):
    """The last Tq queries of Tk keys (cached decode: Tq <= chunk takes the direct path, Tq = 17 >
    chunk the padded one), with an fp64 initial state: y, the normaliser stats and every gradient."""
    for mode, covers in [(m, False) for m in KERNEL_MODES] + [("hybrid", True)]:
        args, valid = make_inputs(Tq=Tq, Tk=Tk)
        gen = torch.Generator().manual_seed(Tk)
        S = torch.rand(2, 4, 6, 8, dtype=DT, generator=gen).requires_grad_(True)
        z = torch.rand(2, 4, 6, dtype=DT, generator=gen).add(0.1).requires_grad_(True)
        kw = dict(window=w, scale=0.35, mode=mode, linear_covers_window=covers, key_valid=valid,
                  initial_state=(S, z), return_stats=True)
        ref = hybrid_attention_reference(*args, **kw)
        out = hybrid_attention_chunked(*args, **kw, chunk_size=16)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        go = torch.randn_like(ref[0])
        names = "q k v phi_q phi_k gamma alpha S z".split()
        for a, b, name in zip(grads(out[0], (*args, S, z), go), grads(ref[0], (*args, S, z), go), names):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name, md=mode: f"{md} d{n}: {m}")


def test_chunk_size_does_not_change_result():
    args, valid = make_inputs(Tq=77)
    outs = [hybrid_attention_chunked(*args, window=9, scale=0.3, key_valid=valid, chunk_size=c) for c in (1, 7, 16, 64, 128)]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_initial_state_and_suffix_queries_equal_full_forward(mode):
    """Splitting a sequence into (state prefix, window buffer, new queries) changes nothing."""
    (q, k, v, fq, fk, g, a), valid = make_inputs(Tq=50, requires_grad=False)
    w = 8
    kw = dict(window=w, scale=0.3, mode=mode)
    full = hybrid_attention_reference(q, k, v, fq, fk, g, a, key_valid=valid, **kw)
    split = 30  # keys [0, split-(w-1)) go to the state; the last w-1 before `split` stay raw
    start = split - (w - 1)
    state = linear_state(fk, v, end=start, key_valid=valid)
    for impl in (hybrid_attention_reference, hybrid_attention_chunked):
        y = impl(q[:, :, split:], k[:, :, start:], v[:, :, start:], fq[:, :, split:], fk[:, :, start:], g, a,
                 key_valid=valid[:, start:], initial_state=state, **kw)
        torch.testing.assert_close(y, full[:, :, split:], rtol=1e-7, atol=1e-7)  # fp32 state


def test_window_covering_everything_is_softmax():
    """window >= T: the gamma factor cancels and hybrid equals causal softmax attention."""
    (q, k, v, fq, fk, g, a), valid = make_inputs(Tq=40, requires_grad=False)
    y = hybrid_attention_chunked(q, k, v, fq, fk, g, a, window=40, scale=0.3, key_valid=valid)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = torch.ones(40, 40, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    s = (0.3 * q @ ke.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1) @ ve
    rows = valid  # padded query rows see no key: both give 0 / undefined; compare valid rows
    torch.testing.assert_close(y.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], rtol=1e-10, atol=1e-10)


def test_swa_only_is_windowed_softmax():
    (q, k, v, fq, fk, g, a), valid = make_inputs(Tq=70, requires_grad=False)
    w = 16
    y = hybrid_attention_chunked(q, k, v, fq, fk, g, a, window=w, scale=0.3, mode="swa_only", key_valid=valid)
    i = torch.arange(70)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)
    mask = band[None, None] & valid[:, None, None, :]
    s = (0.3 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(y.transpose(1, 2)[valid], ref.transpose(1, 2)[valid], rtol=1e-10, atol=1e-10)


def test_linear_only_is_normalised_linear_attention():
    (q, k, v, fq, fk, g, a), valid = make_inputs(Tq=33, requires_grad=False)
    y = hybrid_attention_chunked(q, k, v, fq, fk, g, a, window=4, scale=0.3, mode="linear_only", key_valid=valid)
    att = (fq @ fk.transpose(-1, -2)).tril() * valid[:, None, None, :]
    ref = (att / att.sum(-1, keepdim=True)) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(y.transpose(1, 2)[valid], ref.transpose(1, 2)[valid], rtol=1e-10, atol=1e-10)


def test_padded_keys_take_no_part():
    """Changing the content of padded keys/values changes no output."""
    (q, k, v, fq, fk, g, a), valid = make_inputs(Tq=30, pad=7, requires_grad=False)
    y = hybrid_attention_chunked(q, k, v, fq, fk, g, a, window=5, scale=0.3, key_valid=valid)
    k2, v2, fk2 = k.clone(), v.clone(), fk.clone()
    k2[1, :, :7] += 100
    v2[1, :, :7] -= 50
    fk2[1, :, :7] *= 9
    y2 = hybrid_attention_chunked(q, k2, v2, fq, fk2, g, a, window=5, scale=0.3, key_valid=valid)
    torch.testing.assert_close(y[1, :, 7:], y2[1, :, 7:], rtol=0, atol=0)


def test_sinks_attention_matches_dense():
    q = torch.randn(1, 2, 10, 4, dtype=DT)
    k = torch.randn(1, 1, 10, 4, dtype=DT)
    v = torch.randn(1, 1, 10, 4, dtype=DT)
    y = sinks_attention(q, k[:, :, :3], v[:, :, :3], torch.arange(3)[None], torch.arange(10), scale=0.5)
    i = torch.arange(10)
    mask = (i[None, :] < 3) & (i[None, :] <= i[:, None])
    s = (0.5 * q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(y, torch.softmax(s, -1) @ v)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(window=0), "window"),
        (dict(mode="sliding"), "mode"),
        (dict(k_dtype=torch.float32), "dtype"),
        (dict(k_short=True), "key length"),
        (dict(gamma_shape=True), "gamma"),
        (dict(nan=True), "NaN"),
    ],
)
def test_bad_inputs_raise_named_errors(change, match):
    (q, k, v, fq, fk, g, a), valid = make_inputs(Tq=10, requires_grad=False)
    kw = dict(window=change.get("window", 4), scale=0.3, mode=change.get("mode", "hybrid"))
    if "k_dtype" in change:
        k = k.float()
    if "k_short" in change:
        k, v, fk = k[:, :, :5], v[:, :, :5], fk[:, :, :5]
    if "gamma_shape" in change:
        g = g[:2]
    if "nan" in change:
        q = q.clone()
        q[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=match):
        hybrid_attention(q, k, v, fq, fk, g, a, **kw)


def test_finite_check_names_the_tensor_and_has_no_false_alarm():
    """check_finite (the inputs' NaN/Inf test: one reduction per tensor, one host sync): it names the
    first bad tensor, catches infinities of both signs that cancel in a sum, and does not refuse
    finite values whose sum overflows fp32 (the exact test then decides)."""
    from hf_hybrid_attn.kernels.validation import check_finite

    ok = torch.ones(2, 3)
    for name in ("q", "k", "v"):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = {n: ok.clone() for n in ("q", "k", "v")}
            t[name][1, 2] = bad
            with pytest.raises(ValueError, match=f"^{name}: contains NaN or Inf"):
                check_finite(**t)
    with pytest.raises(ValueError, match="^q: contains NaN or Inf"):  # +inf and -inf: the sum is NaN
        check_finite(q=torch.tensor([float("inf")]), k=torch.tensor([float("-inf")]), v=ok)
    big = torch.full((4,), 3e38)
    check_finite(q=big, k=big, v=-big)  # the fp32 sum overflows: no error
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        check_finite(q=ok.to(dtype), k=ok.to(dtype), v=ok.to(dtype))
        with pytest.raises(ValueError, match="^v: contains NaN or Inf"):
            check_finite(q=ok.to(dtype), k=ok.to(dtype), v=torch.tensor([1.0, float("nan")], dtype=dtype))
    check_finite(q=torch.tensor([1e300], dtype=torch.float64), k=ok, v=ok)  # finite in fp64, inf in fp32
