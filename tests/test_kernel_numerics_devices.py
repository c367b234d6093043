"""Issue 11 ("long context for real"), kernel and training items, on CPU.

- every Triton launch runs under `device_guard(<its tensors' device>)` (multi-GPU `device_map`), and
  a converted model dispatched with a per-layer `device_map` equals the undispatched one;
- the state read-outs stay fp32: fp16 inputs whose state S exceeds fp16's 65504 give finite,
  correct outputs and gradients (the interpreter's fp16 dots are faithful: fp16 operands, fp32
  accumulation; its bf16 is not, see KERNELS.md);
- NT (explicit key tiles, a constexpr) is rounded up to a power of two: exact for windows that share
  a rounded NT, and a window sweep compiles one NT per power of two;
- the Triton entry validates once (the shared `validation.validate_inputs` when called directly);
- stage 1 trains a bf16 model's hybrid parameters as fp32 master weights.

Triton runs in its CPU interpreter here (fp32 and fp16 only), as in test_triton_kernels.py.
"""

from __future__ import annotations

import contextlib
import copy
import math

import _interpreter  # noqa: E402  (first: the interpreter must be on before triton is imported)
import pytest
import torch

INTERPRETER_UNAVAILABLE = _interpreter.prepare()

triton = pytest.importorskip("triton")

from test_triton_kernels import DEVICE, RTOL, D, check_backward, check_forward, make_inputs, rel_err, run_both  # noqa: E402

import hf_hybrid_attn as hha  # noqa: E402
import hf_hybrid_attn.kernels.dispatch as dispatch  # noqa: E402
import hf_hybrid_attn.kernels.triton_common as triton_common  # noqa: E402
import hf_hybrid_attn.kernels.triton_decode as triton_decode  # noqa: E402
import hf_hybrid_attn.kernels.triton_hybrid as triton_hybrid  # noqa: E402
from conftest import randomize_mixers, tiny_model  # noqa: E402
from hf_hybrid_attn.kernels.reference import hybrid_attention_reference, linear_state  # noqa: E402
from hf_hybrid_attn.kernels.triton_decode import DecodeCache, hybrid_decode_triton  # noqa: E402
from hf_hybrid_attn.kernels.triton_hybrid import hybrid_attention_triton  # noqa: E402

FP16_MAX = torch.finfo(torch.float16).max  # 65504


_in_process_interpreter, test_suite_in_subprocess = _interpreter.subprocess_suite(
    __file__, "test_suite_in_subprocess", INTERPRETER_UNAVAILABLE)


# ---------------------------------------------------------------------------------------------
# launch recorder: which kernel ran, on which tensors' device, under which device guard, with which NT
# ---------------------------------------------------------------------------------------------
KERNELS = {
    triton_hybrid: ("_hybrid_fwd_kernel", "_hybrid_bwd_dq_kernel", "_hybrid_bwd_dkv_kernel"),
    triton_decode: ("_hybrid_decode_kernel",),
}


class _Kernel:
    """Stands in for a Triton kernel: `kernel[grid](*args, **constexprs)` is recorded, then run
    (unless dry: the outputs stay uninitialised, enough to count what would be compiled)."""

    def __init__(self, launches: Launches, name: str, real, dry: bool):
        self.launches, self.name, self.real, self.dry = launches, name, real, dry

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            active = self.launches.active[-1] if self.launches.active else None
            self.launches.rows.append(dict(kernel=self.name, device=device, guard=active, NT=kwargs.get("NT")))
            if not self.dry:
                self.real[grid](*args, **kwargs)

        return launch


class Launches:
    def __init__(self, monkeypatch, dry: bool = False, guards: bool = True):
        self.rows: list[dict] = []
        self.active: list[torch.device] = []  # device guards entered and not left yet
        for module, names in KERNELS.items():
            for name in names:
                monkeypatch.setattr(module, name, _Kernel(self, name, getattr(module, name), dry))
            if guards:  # raising=True (the default): a module that has no device_guard fails here
                monkeypatch.setattr(module, "device_guard", self.guard)

    @contextlib.contextmanager
    def guard(self, device: torch.device):
        with triton_common.device_guard(device):  # the real guard still runs
            self.active.append(device)
            try:
                yield
            finally:
                self.active.pop()

    def kernels(self) -> set[str]:
        return {r["kernel"] for r in self.rows}

    def nts(self, kernel: str | None = None) -> set[int]:
        return {r["NT"] for r in self.rows if kernel is None or r["kernel"] == kernel} - {None}


def _on(x):
    return {n: t.to(DEVICE) for n, t in x.items()}


# ---------------------------------------------------------------------------------------------
# 1. multi-device: every launch under device_guard(<its tensors' device>)
# ---------------------------------------------------------------------------------------------
def test_device_guard_makes_a_cuda_device_current_and_is_a_no_op_on_cpu(monkeypatch):
    events = []

    class FakeCudaDevice:  # torch.cuda.device(d): entering makes d current
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    cuda1 = torch.device("cuda", 1)
    with triton_common.device_guard(cuda1):
        assert events == [("enter", cuda1)]
    assert events == [("enter", cuda1), ("exit", cuda1)]
    events.clear()
    with triton_common.device_guard(torch.device("cpu")):
        pass
    assert events == []  # CPU tensors (the interpreter): nothing to switch


def test_every_launch_runs_under_the_guard_of_its_tensors_device(monkeypatch):
    """Forward, both backward kernels and the decode kernel: each launch happens inside
    device_guard(d) with d the device of the tensors it is given (a launch site without the guard
    records None and fails)."""
    launches = Launches(monkeypatch)
    x, valid, state = make_inputs(Tq=70, pad=(0, 9), init=True)
    xt = {n: t.to(DEVICE).requires_grad_() for n, t in x.items()}
    st = tuple(s.to(DEVICE) for s in state)
    y, prefill_state = hybrid_attention_triton(**xt, key_valid=valid.to(DEVICE), initial_state=st, window=16,
                                               scale=D**-0.5, return_state=True)
    y.sum().backward()
    assert launches.kernels() == {"_hybrid_fwd_kernel", "_hybrid_bwd_dq_kernel", "_hybrid_bwd_dkv_kernel"}
    cache = DecodeCache.from_prefill(xt["k"].detach(), xt["v"].detach(), prefill_state, 16,
                                     key_valid=valid.to(DEVICE), phi_k=xt["phi_k"].detach())
    for _ in range(2):
        step = {n: xt[n].detach()[:, :, -1:] for n in ("q", "k", "v", "phi_q", "phi_k")}
        hybrid_decode_triton(**step, gamma=xt["gamma"].detach(), alpha=xt["alpha"].detach(), cache=cache,
                             scale=D**-0.5)
    assert [r["kernel"] for r in launches.rows].count("_hybrid_decode_kernel") == 2
    for row in launches.rows:
        assert row["guard"] is not None, f"{row['kernel']} launched outside device_guard"
        assert row["guard"] == row["device"] == torch.device(DEVICE), row


def _set_backend(model, backend: str) -> None:
    for _, attn in hha.iter_hybrid_attention(model):
        attn.hybrid.backend = backend


def test_device_map_split_model_equals_the_undispatched_one(monkeypatch):
    """A converted model dispatched by accelerate with a per-layer device_map (two groups of layers,
    here both on CPU: the hooks that move inputs and weights per block are the same as for cuda:0 /
    cuda:1) runs forward and generate() through the Triton kernels and equals the undispatched
    model; every launch is guarded with its layer's device."""
    from accelerate import dispatch_model

    torch.manual_seed(5)
    model = hha.convert(tiny_model(num_hidden_layers=4), hha.HybridConfig(window=5, feature_dim=8))
    randomize_mixers(model)
    plain = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(4)}}  # group 1: layers 0-1, group 2: layers 2-3
    dispatched = dispatch_model(model, device_map, main_device="cpu", force_hooks=True)
    assert all(hasattr(layer, "_hf_hook") for layer in dispatched.model.layers)  # really dispatched
    for m in (plain, dispatched):
        _set_backend(m, "triton")
    ids = torch.randint(3, 99, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    launches = Launches(monkeypatch)
    with torch.no_grad():
        want = plain(ids, attention_mask=mask).logits
        got = dispatched(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out_plain = plain.generate(ids, **gen)
    out_dispatched = dispatched.generate(ids, **gen)
    assert torch.equal(out_dispatched, out_plain)
    assert launches.kernels() == {"_hybrid_fwd_kernel", "_hybrid_decode_kernel"}  # prefill + fused decode
    assert all(r["guard"] == r["device"] == torch.device("cpu") for r in launches.rows)


# ---------------------------------------------------------------------------------------------
# 2. numerics: the state read-out is fp32 (fp16's max is 65504)
# ---------------------------------------------------------------------------------------------
TOL_FP16 = 5e-3  # relative L2, as for fp16 in test_triton_gpu.py
NAMES = ("q", "k", "v", "phi_q", "phi_k", "gamma", "alpha")


def _l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _big_state_inputs(case: str):
    """fp16 inputs whose linear state S = sum phi_k v^T (+ initial_state) exceeds 65504, with
    outputs and gradients in fp16's normal range and both branches of the normaliser of similar
    size (small phi_q), so that every gradient, dgamma and dalpha included, is well conditioned."""
    g = torch.Generator().manual_seed(11)
    if case == "long":  # a long sequence with large features and values: |S| ~ sqrt(T) * 24 * 48
        x, valid, _ = make_inputs(B=1, H=2, Hkv=1, Tq=1201, pad=(17,), seed=3)
        x["v"] = 48.0 * torch.randn(x["v"].shape, generator=g)
        x["phi_k"] = 48.0 * torch.rand(x["phi_k"].shape, generator=g)
        x["phi_q"] = 4e-4 * x["phi_q"]
        init = None
    else:  # an initial state (a cache after a long prefix) beyond fp16's range
        x, valid, _ = make_inputs(B=2, H=2, Hkv=1, Tq=150, pad=(0, 20), seed=4)
        x["v"] = 5.0 * x["v"]
        x["phi_q"] = 1e-3 * x["phi_q"]
        init = (4e4 * torch.randn(2, 2, D, D, generator=g), 1e4 * torch.rand(2, 2, D, generator=g))
    x = {n: (t.half() if t.dim() == 4 else t) for n, t in x.items()}
    return x, valid, init


@pytest.mark.parametrize("case", ["long", "initial_state"])
def test_fp16_state_beyond_fp16_range_reads_out_finite_and_correct(case):
    x, valid, init = _big_state_inputs(case)
    window = 32
    kw = dict(window=window, scale=D**-0.5, key_valid=valid)
    xt = {n: t.clone().requires_grad_() for n, t in x.items()}
    y, (S, _) = hybrid_attention_triton(**xt, initial_state=init, return_state=True, **kw)
    assert y.dtype == torch.float16
    # the premise: the state the forward read out of exceeds fp16's range
    assert S.abs().max().item() > FP16_MAX
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).half()
    grads = torch.autograd.grad(y, list(xt.values()), dy)
    xr = {n: t.double().requires_grad_() for n, t in x.items()}
    y_r = hybrid_attention_reference(**xr, initial_state=None if init is None else tuple(s.double() for s in init), **kw)
    grads_r = torch.autograd.grad(y_r, list(xr.values()), dy.double())
    assert bool(torch.isfinite(y).all()) and _l2(y, y_r) < TOL_FP16
    for name, got, want in zip(NAMES, grads, grads_r):
        assert bool(torch.isfinite(got).all()), f"d{name} is not finite"
        if name in ("gamma", "alpha"):  # sums over B*T rows of terms that nearly cancel (as on the GPU)
            err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
            assert err < 5e-2, (name, err)
        else:
            assert _l2(got, want) < TOL_FP16, (name, _l2(got, want))


def test_fp32_readout_dominated_by_a_large_initial_state_matches_float64():
    """fp32 (exact dots): a large initial S (moderate z, so the normaliser stays balanced and every
    gradient well conditioned) makes y almost all alpha phi_q.S / den: a read-out that lost range or
    precision would show at the interpreter's fp32 tolerance, forward and backward."""
    x, valid, _ = make_inputs(Tq=90, Tk=200, pad=(5, 0))
    g = torch.Generator().manual_seed(9)
    S0 = 1e6 * torch.randn(2, 4, D, D, generator=g)
    z0 = 10.0 * torch.rand(2, 4, D, generator=g)
    for mode in ("hybrid", "linear_only"):
        (y, _, _), _ = run_both(x, valid, (S0, z0), window=40, scale=D**-0.5, mode=mode)
        assert y.abs().max().item() > 1e3  # the read-out dominates (the values are O(1))
        check_forward(x, valid, (S0, z0), window=40, scale=D**-0.5, mode=mode)
    # (not linear_only: alpha cancels there, its true gradient is 0 and the kernel's is a difference
    # of read-out-sized terms, so no relative tolerance can hold for dalpha in that mode)
    check_backward(x, valid, (S0, z0), window=40, scale=D**-0.5, mode="hybrid")


# ---------------------------------------------------------------------------------------------
# 4. NT rounded up to a power of two: exact, and one compile per power of two
# ---------------------------------------------------------------------------------------------
def _minimal_nt(window: int, chunk: int) -> int:
    return 1 + math.ceil((window - 1) / chunk)


@pytest.mark.parametrize("window", [1, 63, 65, 100, 129, 200])
def test_windows_sharing_a_rounded_nt_are_exact(window, monkeypatch):
    """chunk 64: w = 100 and 129 launch NT = 4 (3 would do), w = 200 launches NT = 8 (5 would do);
    the extra tiles are masked. Forward, backward and the decode hand-off state vs float64."""
    launches = Launches(monkeypatch, guards=False)
    x, valid, state = make_inputs(B=2, H=2, Hkv=1, Tq=601, pad=(0, 41), init=True)
    check_forward(x, valid, state, window=window, scale=D**-0.5, mode="hybrid")
    check_backward(x, valid, state, window=window, scale=D**-0.5, mode="hybrid")
    rounded = 1 << (_minimal_nt(window, 64) - 1).bit_length()
    assert launches.nts() == {rounded}  # the kernels really ran with the rounded NT
    _, (S, z) = hybrid_attention_triton(**_on(x), key_valid=valid.to(DEVICE),
                                        initial_state=tuple(s.to(DEVICE) for s in state), window=window,
                                        scale=D**-0.5, return_state=True)
    S_r, z_r = linear_state(x["phi_k"].double(), x["v"].double(), end=601 - (window - 1), key_valid=valid,
                            initial_state=tuple(s.double() for s in state))
    assert rel_err(S.cpu(), S_r) < RTOL and rel_err(z.cpu(), z_r) < RTOL


def test_window_sweep_compiles_one_nt_per_power_of_two(monkeypatch):
    """SSD window schedules: windows 1..300 (chunk 64) launch NT in {1, 2, 4, 8}, i.e. at most
    1 + ceil(log2(max NT)) compiles of each kernel, where 1 + ceil((w-1)/C) would give 6 values.
    Counted from the NT constexprs actually passed to the (dry) launches of the forward and both
    backward kernels; each window gets the smallest power of two that covers it."""
    launches = Launches(monkeypatch, dry=True, guards=False)
    x, _, _ = make_inputs(B=1, H=2, Hkv=1, Tq=20)
    windows = range(1, 301)
    for window in windows:
        first = len(launches.rows)
        xt = {n: t.clone().requires_grad_() for n, t in _on(x).items()}
        y = hybrid_attention_triton(**xt, window=window, scale=D**-0.5)
        y.backward(torch.zeros_like(y))
        rows = launches.rows[first:]
        assert [r["kernel"] for r in rows] == list(KERNELS[triton_hybrid])
        assert {r["NT"] for r in rows} == {1 << (_minimal_nt(window, 64) - 1).bit_length()}, window
    minimal = {_minimal_nt(w, 64) for w in windows}
    assert len(minimal) == 6
    for kernel in KERNELS[triton_hybrid]:
        nts = launches.nts(kernel)
        assert nts == {1, 2, 4, 8}, (kernel, nts)
        assert len(nts) <= 1 + math.ceil(math.log2(max(minimal)))


# ---------------------------------------------------------------------------------------------
# 5. validation runs once
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def shared_checks(monkeypatch):
    from hf_hybrid_attn.kernels import validation

    calls = []
    real = validation.validate_inputs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    # the shared check lives in kernels/validation.py; dispatch holds its own reference to it
    monkeypatch.setattr(validation, "validate_inputs", counting)
    monkeypatch.setattr(dispatch, "validate_inputs", counting)
    return calls


def test_direct_call_runs_the_shared_validation_once(shared_checks):
    x, valid, _ = make_inputs(Tq=20)
    hybrid_attention_triton(**_on(x), key_valid=valid.to(DEVICE), window=8, scale=0.25, mode="swa_only")
    assert shared_checks == ["swa_only"]


def test_validated_call_skips_the_shared_validation_but_keeps_the_triton_checks(shared_checks):
    x, valid, _ = make_inputs(Tq=20)
    x = _on(x)
    kw = dict(window=8, scale=0.25, _validated=True)
    y = hybrid_attention_triton(**x, **kw)
    assert shared_checks == [] and y.shape == (2, 4, 20, D)
    with pytest.raises(ValueError, match="chunk_size"):
        hybrid_attention_triton(**x, chunk_size=48, **kw)
    with pytest.raises(ValueError, match="q must be float16, bfloat16 or float32"):
        hybrid_attention_triton(**{n: t.double() for n, t in x.items()}, **kw)
    S0 = torch.zeros(2, 4, D, D, device="meta")
    z0 = torch.zeros(2, 4, D, device="meta")
    with pytest.raises(ValueError, match=r"initial_state\[0\]: expected device"):
        hybrid_attention_triton(**x, initial_state=(S0, z0), **kw)
    assert shared_checks == []


def test_direct_call_errors_name_the_argument():
    x, valid, _ = make_inputs(Tq=8)
    x = _on(x)
    with pytest.raises(ValueError, match="^k, v: expected the dtype of q"):
        hybrid_attention_triton(**{**x, "k": x["k"].half()}, window=4, scale=0.25)
    with pytest.raises(ValueError, match="^gamma: "):
        hybrid_attention_triton(**{**x, "gamma": x["gamma"][:3]}, window=4, scale=0.25)
    with pytest.raises(ValueError, match="^initial_state: "):
        hybrid_attention_triton(**x, initial_state=(torch.zeros(2, 4, D, 3), torch.zeros(2, 4, D)), window=4,
                                scale=0.25)


def test_dispatch_validates_once(shared_checks):
    """dispatch.hybrid_attention validates and passes _validated=True: the Triton entry does not
    validate again."""
    x, valid, _ = make_inputs(Tq=20)
    dispatch.hybrid_attention(**_on(x), backend="triton", key_valid=valid.to(DEVICE), window=8, scale=0.25)
    assert len(shared_checks) == 1


# ---------------------------------------------------------------------------------------------
# 3. a bf16 model's hybrid parameters train as fp32 master weights
# ---------------------------------------------------------------------------------------------
def _peaked_teacher(dtype):
    """Tiny Llama with peaked softmax attention (scaled q/k projections), in `dtype`."""
    torch.manual_seed(0)
    base = tiny_model()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(15)
            layer.self_attn.k_proj.weight.mul_(15)
    return base.to(dtype)


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps, for every step, the parameters before and after (fp32 copies)."""

    instances: list = []

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.steps: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        _RecordingAdamW.instances.append(self)

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        out = super().step(closure)
        self.steps.append((before, [p.detach().clone() for p in params]))
        return out


@pytest.fixture
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("_one_thread")
def test_bf16_stage1_trains_fp32_master_weights_and_keeps_sub_ulp_updates(monkeypatch):
    from hf_hybrid_attn.training.transfer import TransferConfig, train_attention_transfer

    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.instances = []
    model = hha.convert(_peaked_teacher(torch.bfloat16), window=4, feature_dim=8)
    hybrid = {n: p for n, p in model.named_parameters() if ".hybrid." in n}
    assert {p.dtype for p in hybrid.values()} == {torch.bfloat16}  # converted in the model's dtype
    init = {n: p.detach().clone() for n, p in hybrid.items()}
    data = torch.randint(3, 99, (16, 32), generator=torch.Generator().manual_seed(7))
    # lr 1e-3: each AdamW step moves a weight by about 1e-3, under half a bf16 ulp at 1.0 (2^-9)
    cfg = TransferConfig(max_steps=10, batch_size=2, grad_accum=1, lr=1e-3, max_grad_norm=None)
    train_attention_transfer(model, data, cfg, progress=False)

    (opt,) = _RecordingAdamW.instances
    assert len(opt.steps) == 10 and len(opt.steps[0][0]) == len(hybrid)
    assert {t.dtype for before, after in opt.steps for t in before + after} == {torch.float32}  # while training
    before, after = opt.steps[0]
    kept = 0
    for b, a in zip(before, after):
        delta = a - b
        rounds_back = a.to(torch.bfloat16).float() == b  # a bf16 weight would not have moved
        kept += int(((delta != 0) & rounds_back).sum())
    assert kept > 0  # updates below bf16's resolution are kept by the fp32 master weights
    # the model comes back in its dtype; 10 sub-ulp steps added up and moved identity entries (1.0),
    # which AdamW on bf16 weights leaves at exactly 1.0 forever at this lr
    moved = 0
    for n, p in hybrid.items():
        assert p.dtype == torch.bfloat16, n
        if "feature_map" in n:
            ones = init[n] == 1.0
            moved += int((p.detach()[ones] != 1.0).sum())
    assert moved > 0


class _OptimizerDtypes:
    """Trainer callback: the dtypes of the hybrid parameters in the stage-2 optimizer."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.dtypes: set = set()

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
                names = {id(p): n for n, p in model.named_parameters()}
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if ".hybrid." in names.get(id(p), ""):
                            outer.dtypes.add(p.dtype)

        self.callback = Callback()


@pytest.mark.usefixtures("_one_thread")
def test_recipe_in_bf16_trains_fp32_mixers_in_both_stages_and_saves_bf16(monkeypatch, tmp_path):
    """run_recipe on a bf16 model: fp32 hybrid parameters in the stage-1 optimizer and in the
    stage-2 Trainer's (train_feature_maps), and the saved checkpoint is bf16 as before."""
    from transformers import AutoModelForCausalLM

    from hf_hybrid_attn.training.data import PackedData
    from hf_hybrid_attn.training.recipes import get_recipe, run_recipe

    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.instances = []
    g = torch.Generator().manual_seed(3)
    data = PackedData(train=torch.randint(3, 99, (8, 24), generator=g), val=torch.randint(3, 99, (2, 24), generator=g),
                      seq_len=24, info={"source": "random"})
    recipe = get_recipe("hedgecats", **{
        "hybrid.window": 4, "hybrid.feature_dim": 8,
        "transfer.max_steps": 2, "transfer.batch_size": 2, "transfer.grad_accum": 1,
        "finetune.max_steps": 2, "finetune.batch_size": 2, "finetune.grad_accum": 1, "finetune.eval_every": 2,
        "finetune.train_feature_maps": True, "finetune.early_stopping_patience": None,
    })
    probe = _OptimizerDtypes()
    model, _ = run_recipe(_peaked_teacher(torch.bfloat16), recipe, data, str(tmp_path / "run"), progress=False,
                          callbacks=[probe.callback], mode_eval_blocks=0)
    stage1 = _RecordingAdamW.instances[0]
    assert len(stage1.steps) == 2
    assert {t.dtype for before, after in stage1.steps for t in before + after} == {torch.float32}
    assert probe.dtypes == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the model keeps its dtype
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (n, p), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n


# ---------------------------------------------------------------------------------------------
# 6. the decode docstring's claims: one DecodeCache layout; a step writes one slot in place
# ---------------------------------------------------------------------------------------------
def test_decode_step_writes_one_ring_slot_in_place_of_the_shared_layout():
    import hf_hybrid_attn.kernels.decode as decode

    assert triton_decode.DecodeCache is decode.DecodeCache  # one definition of the ring layout
    window, T = 8, 19
    x, valid, _ = make_inputs(Tq=T + 1)
    x = _on(x)
    zeros = (torch.zeros(2, 4, D, D, device=DEVICE), torch.zeros(2, 4, D, device=DEVICE))
    _, state = hybrid_attention_triton(**{n: t[:, :, :T] if t.dim() == 4 else t for n, t in x.items()},
                                       initial_state=zeros, window=window, scale=D**-0.5, return_state=True)
    cache = DecodeCache.from_prefill(x["k"][:, :, :T], x["v"][:, :, :T], state, window)
    storage = {n: getattr(cache, n).data_ptr() for n in ("k_win", "v_win", "valid", "S", "z", "position")}
    before = {n: getattr(cache, n).clone() for n in ("k_win", "v_win", "valid")}
    step = {n: x[n][:, :, T:] for n in ("q", "k", "v", "phi_q", "phi_k")}
    slot = T % (window - 1)  # position T-w+1 leaves the window; the new token takes its slot
    phi_k_evict = x["phi_k"][:, :, T - window + 1 : T - window + 2]
    hybrid_decode_triton(**step, gamma=x["gamma"], alpha=x["alpha"], cache=cache, scale=D**-0.5,
                         phi_k_evict=phi_k_evict)
    assert {n: getattr(cache, n).data_ptr() for n in storage} == storage  # in place: nothing reallocated
    assert cache.position.item() == T + 1
    for n in ("k_win", "v_win"):
        changed = (getattr(cache, n) != before[n]).any(-1).any(1).any(0).nonzero().flatten().tolist()
        assert changed == [slot], n  # exactly one slot written, nothing shifted
        torch.testing.assert_close(getattr(cache, n)[:, :, slot], x[n[0]][:, :, T], rtol=0, atol=0)
