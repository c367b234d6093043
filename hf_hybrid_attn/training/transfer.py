"""Stage 1, attention transfer (SPEC §3).

Trainable: the feature maps and window logits of every converted layer; the base model is frozen.
One teacher forward per batch trains every layer at once: each converted layer gets a
`transfer_hook` that receives its (q, k, v) after RoPE, computes

  * the teacher output: exact causal softmax attention on the same q, k, v;
  * the student output(s) and weights on *detached* q, k, v, and the weighted objectives;

back-propagates that layer's loss right away (its graph never outlives the hook, so memory is one
layer's worth), and returns the teacher output, so that the next layer sees teacher hidden
states. The outer forward runs under `torch.no_grad()`.

Master weights: the trained parameters are fp32 while training, whatever the model's dtype (e.g.
`hf-hybrid convert --dtype bfloat16`): AdamW on bf16 weights rounds away every update smaller than
half a bf16 ulp (2^-9 relative), which at lr 1e-2 and below is most of them. The forward casts
them to the activations' dtype (the feature maps apply `weight.to(x.dtype)`, gamma is computed in
fp32), and when training ends they are cast back to the dtype they came in, so the model and a
checkpoint saved from it keep their dtype (`fp32_master_weights`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import hybrid_forward
from ..kernels import expand_kv_heads
from ..layers import HybridMixer
from ..modeling import iter_hybrid_attention, mixers_of
from .objectives import OBJECTIVES, attn_ce_loss, output_mse

CHECKPOINT_NAME = "stage1_state.pt"


@dataclass
class TransferConfig:
    """Hyperparameters of stage 1."""

    objectives: dict[str, float] = field(default_factory=lambda: {"attn_ce": 1.0})
    """Objective name -> weight; names from `objectives.OBJECTIVES` (LoLCATs: output_mse_hybrid x 1000)."""
    lr: float = 1e-2
    """AdamW learning rate (LoLCATs: 1e-2)."""
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    tokens: int | None = None
    """Training tokens; sets the number of steps when `max_steps` is None."""
    max_steps: int | None = None
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    """Validation every this many steps (0: only before and after training)."""
    eval_blocks: int = 8
    """Validation blocks used per evaluation."""
    early_stop_patience: int | None = None
    """Stop after this many evaluations without improvement, and keep the best parameters."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    attn_ce_chunk: int = 256
    """Query chunk of the attention cross-entropy (memory O(T * chunk))."""
    bf16: bool = False
    """bf16 autocast for the teacher forward and the student (CUDA). The trained parameters are fp32
    master weights either way (see the module docstring)."""
    seed: int = 0

    def validate(self) -> None:
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        if unknown or not self.objectives:
            raise ValueError(f"objectives: expected a non-empty mapping with names from {OBJECTIVES}, got {self.objectives}")
        if any(w < 0 for w in self.objectives.values()) or not any(w > 0 for w in self.objectives.values()):
            raise ValueError(f"objectives: weights must be >= 0 with at least one > 0, got {self.objectives}")
        for name in ("batch_size", "grad_accum", "attn_ce_chunk", "eval_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")

    def steps_for(self, seq_len: int) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        if self.tokens is None:
            raise ValueError("TransferConfig: set either tokens or max_steps")
        return max(1, self.tokens // (self.batch_size * self.grad_accum * seq_len))


def teacher_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact causal softmax attention with padding, GQA expanded: [B, H, T, D] (no gradient)."""
    B, H, T, _ = q.shape
    k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)
    with torch.no_grad():
        if bool(key_valid.all()):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        allowed = causal[None] & key_valid[:, None, :]
        # a padded query that sees no key would give NaN; let it see itself (its output is ignored)
        allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(T, dtype=torch.bool, device=q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scaling)


class _StopForward(Exception):
    """Raised after the last converted layer: later layers are not needed for stage 1."""


class TransferHook:
    """The per-layer `transfer_hook` of stage 1 (one instance shared by every layer)."""

    def __init__(self, objectives: dict[str, float], attn_ce_chunk: int = 256, last_layer: int | None = None):
        self.objectives = {k: float(w) for k, w in objectives.items() if w > 0}
        self.attn_ce_chunk = attn_ce_chunk
        self.last_layer = last_layer
        self.backward_scale: float | None = None  # set while training: d(loss * scale) is accumulated
        self.reset()

    def reset(self) -> None:
        # detached device tensors: no host sync per layer, only when `mean` is read
        self.totals: dict[str, torch.Tensor | float] = {name: 0.0 for name in self.objectives}
        self.totals["loss"] = 0.0
        self._per_layer: dict[int, torch.Tensor | float] = {}
        self.calls = 0

    def __call__(self, module, q, k, v, key_valid, scaling):
        if q.shape[2] != k.shape[2]:
            raise ValueError("stage-1 transfer expects a full forward without cache (query length == key length)")
        teacher = teacher_attention(q, k, v, key_valid, scaling)
        q, k, v = q.detach(), k.detach(), v.detach()
        with torch.enable_grad():
            parts: dict[str, torch.Tensor] = {}
            if "output_mse_hybrid" in self.objectives:
                parts["output_mse_hybrid"] = output_mse(hybrid_forward(module, q, k, v, key_valid, mode="hybrid"), teacher, key_valid)
            if "output_mse_linear" in self.objectives:
                parts["output_mse_linear"] = output_mse(hybrid_forward(module, q, k, v, key_valid, mode="linear_only"), teacher, key_valid)
            if "attn_ce" in self.objectives:
                phi_q, phi_k = _mixer(module).features(q, k)
                parts["attn_ce"] = attn_ce_loss(q, k, phi_q, phi_k, scaling, key_valid, chunk_size=self.attn_ce_chunk)
            loss = sum(self.objectives[n] * p for n, p in parts.items())
            if self.backward_scale is not None and loss.requires_grad:
                (loss * self.backward_scale).backward()
        for name, p in parts.items():
            self.totals[name] = self.totals[name] + p.detach().float()
        self.totals["loss"] = self.totals["loss"] + loss.detach().float()
        self._per_layer[module.layer_idx] = self._per_layer.get(module.layer_idx, 0.0) + loss.detach().float()
        self.calls += 1
        if self.last_layer is not None and module.layer_idx == self.last_layer:
            raise _StopForward
        return teacher.transpose(1, 2).contiguous()

    def mean(self, num_layers: int) -> dict[str, float]:
        """Mean per layer and forward of every objective and of the weighted total."""
        forwards = max(1, self.calls // max(1, num_layers))
        return {n: float(v) / (num_layers * forwards) for n, v in self.totals.items()}

    @property
    def per_layer(self) -> dict[int, float]:
        """Summed weighted loss per layer index since the last reset."""
        return {i: float(v) for i, v in self._per_layer.items()}


def _mixer(attn) -> HybridMixer:
    """The mixer that runs (the first of `mixers_of`: the module itself, or the one PEFT wraps)."""
    return mixers_of(attn)[0]


def transfer_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything except the feature maps and window logits; return those (named)."""
    for p in model.parameters():
        p.requires_grad_(False)
    named = []
    for name, p in model.named_parameters():
        if ".hybrid." in f".{name}" and ("feature_map" in name or name.endswith("window_logit")):
            p.requires_grad_(True)
            named.append((name, p))
    if not named:
        raise ValueError("model: no hybrid parameters found; convert the model first (hf_hybrid_attn.convert)")
    return named


def fp32_master_weights(params) -> list[tuple[torch.nn.Parameter, torch.dtype]]:
    """Turn each half-precision parameter of `params` into fp32 in place (the same Parameter object,
    so optimizers and modules keep referring to it); returns [(parameter, its old dtype)] for
    `restore_dtypes`. Parameters that are already fp32 are left alone, so calls nest: only the
    outermost one restores."""
    changed = []
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            changed.append((p, p.dtype))
            p.data = p.data.float()
            if p.grad is not None:
                p.grad = p.grad.float()
    return changed


def restore_dtypes(changed: list[tuple[torch.nn.Parameter, torch.dtype]]) -> None:
    """Undo `fp32_master_weights`: each parameter back to its old dtype (rounded once, at the end)."""
    for p, dtype in changed:
        p.data = p.data.to(dtype)
        if p.grad is not None:
            p.grad = p.grad.to(dtype)


def _batch(data: torch.Tensor, step: int, micro: int, cfg: TransferConfig) -> torch.Tensor:
    """Rows for (step, micro): a seeded permutation per epoch, so a resumed run sees the same data."""
    n = data.shape[0]
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    rows = []
    for pos in range(start, start + cfg.batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        rows.append(int(perm[i]))
    return data[rows]


def _run(model, hook: TransferHook, input_ids: torch.Tensor, bf16: bool = False) -> None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    autocast = torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        try:
            decoder(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass


def evaluate_transfer(model, blocks: torch.Tensor, cfg: TransferConfig, device=None, per_layer: bool = False) -> dict:
    """Mean stage-1 objectives over `blocks` (no gradient); with `per_layer`, also the weighted loss
    of each layer ({layer_idx: loss}): which layers the feature maps imitate worst."""
    layers = list(iter_hybrid_attention(model))
    hook = TransferHook(cfg.objectives, cfg.attn_ce_chunk, last_layer=max(i for i, _ in layers))
    device = device or next(model.parameters()).device
    with _hooks_installed(layers, hook):
        for start in range(0, blocks.shape[0], cfg.batch_size):
            _run(model, hook, blocks[start : start + cfg.batch_size].to(device), cfg.bf16)
    out: dict = hook.mean(len(layers))
    if per_layer:
        forwards = max(1, hook.calls // len(layers))
        out["per_layer"] = {i: v / forwards for i, v in hook.per_layer.items()}
    return out


class _hooks_installed:
    """Install `hook` on every mixer; on exit put back whatever was there (contexts nest: validation
    inside a training loop must not remove the training hook)."""

    def __init__(self, layers, hook):
        self.mixers = [m for _, a in layers for m in a.hybrid.modules() if isinstance(m, HybridMixer)]
        self.hook = hook
        self.previous: list = []

    def __enter__(self):
        self.previous = [m.transfer_hook for m in self.mixers]
        for m in self.mixers:
            m.transfer_hook = self.hook

    def __exit__(self, *exc):
        for m, old in zip(self.mixers, self.previous):
            m.transfer_hook = old


def _peak_memory(device: torch.device) -> dict[str, float]:
    """peak_rss_mb: the process's peak so far (CPU); peak_cuda_mb: this stage's peak allocation."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def train_attention_transfer(
    model,
    train_blocks: torch.Tensor,
    cfg: TransferConfig,
    val_blocks: torch.Tensor | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Run stage 1 on packed `train_blocks` [N, T]; returns the training log (curves, timing)."""
    cfg.validate()
    if train_blocks.dim() != 2 or train_blocks.shape[0] == 0:
        raise ValueError(f"train_blocks: expected a non-empty LongTensor [N, seq_len], got {tuple(train_blocks.shape)}")
    seq_len = train_blocks.shape[1]
    layers = list(iter_hybrid_attention(model))
    if not layers:
        raise ValueError("model: no converted (hybrid) attention layers; convert the model first")
    window = _mixer(layers[0][1]).window
    if seq_len <= window:
        raise ValueError(f"seq_len ({seq_len}) must be larger than the window ({window}) to train the linear branch")
    named = transfer_parameters(model)
    params = [p for _, p in named]
    device = params[0].device
    upcast = fp32_master_weights(params)  # before the optimizer and any resume load
    try:
        return _train(model, train_blocks, cfg, val_blocks, checkpoint_dir, resume, progress, layers, named, device)
    finally:
        restore_dtypes(upcast)


def _train(model, train_blocks, cfg, val_blocks, checkpoint_dir, resume, progress, layers, named, device) -> dict:
    seq_len = train_blocks.shape[1]
    params = [p for _, p in named]
    steps = cfg.steps_for(seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_cuda_mb is this stage's own
    model.eval()  # no dropout: the teacher must be deterministic
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log = {
        "stage": "attention_transfer",
        "config": dataclasses.asdict(cfg),
        "steps": steps,
        "seq_len": seq_len,
        "trainable_parameters": sum(p.numel() for p in params),
        "train_curve": [],
        "val_curve": [],
        "tokens": 0,
        "wall_s": 0.0,
        "train_s": 0.0,
    }
    start_step, best, bad_evals = 0, (math.inf, None), 0
    ckpt_path = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    if resume and ckpt_path and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["steps"] != steps or state["config"]["batch_size"] != cfg.batch_size or state["config"]["grad_accum"] != cfg.grad_accum:
            raise ValueError(
                f"resume: the checkpoint in {checkpoint_dir!r} was made with steps={state['steps']}, batch_size="
                f"{state['config']['batch_size']}, grad_accum={state['config']['grad_accum']}; this run has "
                f"steps={steps}, batch_size={cfg.batch_size}, grad_accum={cfg.grad_accum}"
            )
        _load_params(named, state["params"])
        opt.load_state_dict(state["optimizer"])
        start_step, log, bad_evals = state["step"], state["log"], state["bad_evals"]
        best = (state["best_val"], state["best_params"])

    def checkpoint(step: int) -> None:
        if ckpt_path is None:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        _save_atomic(
            {
                "step": step, "steps": steps, "config": dataclasses.asdict(cfg), "log": log,
                "params": {n: p.detach().cpu() for n, p in named}, "optimizer": opt.state_dict(),
                "best_val": best[0], "best_params": best[1], "bad_evals": bad_evals,
            },
            ckpt_path,
        )

    def validate(step: int, per_layer: bool = False) -> float | None:
        if val_blocks is None:
            return None
        metrics = evaluate_transfer(model, val_blocks[: cfg.eval_blocks], cfg, device, per_layer=per_layer)
        if per_layer:
            log["final_val_per_layer"] = {str(i): v for i, v in metrics.pop("per_layer").items()}
        log["val_curve"].append({"step": step, **metrics})
        return metrics["loss"]

    if start_step == 0 and not log["val_curve"]:
        v = validate(0)
        log["initial_val_loss"] = v
        if v is not None:  # the untrained maps are a candidate too: early stopping may keep them
            best = (v, {n: p.detach().cpu().clone() for n, p in named})

    hook = TransferHook(cfg.objectives, cfg.attn_ce_chunk, last_layer=max(i for i, _ in layers))
    hook.backward_scale = 1.0 / (len(layers) * cfg.grad_accum)
    bar = _progress_bar(steps, start_step, progress)
    t0, tokens_session, step = time.perf_counter(), 0, start_step
    wall_before = log["wall_s"]
    stopped_early = False
    try:
        with _hooks_installed(layers, hook):
            for step in range(start_step, steps):
                hook.reset()
                t_step = time.perf_counter()
                for micro in range(cfg.grad_accum):
                    ids = _batch(train_blocks, step, micro, cfg).to(device)
                    _run(model, hook, ids, cfg.bf16)
                    tokens_session += ids.numel()
                grad_norm = None
                if cfg.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                log["train_s"] += time.perf_counter() - t_step
                metrics = hook.mean(len(layers))
                log["train_curve"].append({"step": step + 1, **metrics, "grad_norm": grad_norm})
                log["tokens"] = (step + 1) * cfg.grad_accum * cfg.batch_size * seq_len
                tps = tokens_session / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", tok_s=f"{tps:.0f}")
                    bar.update(1)
                done = step + 1
                if cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
                    v = validate(done)
                    if v is not None and v < best[0] - 1e-12:
                        best, bad_evals = (v, {n: p.detach().cpu().clone() for n, p in named}), 0
                    elif v is not None:
                        bad_evals += 1
                    if cfg.early_stop_patience is not None and bad_evals >= cfg.early_stop_patience:
                        stopped_early = True
                log["wall_s"] = wall_before + time.perf_counter() - t0
                if stopped_early or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                    checkpoint(done)
                if stopped_early:
                    break
    except KeyboardInterrupt:
        checkpoint(step)  # the step in progress is lost; every finished one is kept
        raise
    finally:
        if bar is not None:
            bar.close()

    done = step + 1 if steps > start_step else start_step
    session_time = time.perf_counter() - t0
    log["tokens_per_s_session"] = tokens_session / max(session_time, 1e-9)
    if stopped_early and best[1] is not None:
        _load_params(named, best[1])
        log["restored_best_val_loss"] = best[0]
    log["stopped_early"] = stopped_early
    log["steps_done"] = done
    v = validate(done, per_layer=True)
    log["final_val_loss"] = v
    if log["train_curve"]:
        log["initial_train_loss"] = log["train_curve"][0]["loss"]
        log["final_train_loss"] = log["train_curve"][-1]["loss"]
    log["wall_s"] = wall_before + time.perf_counter() - t0
    log["tokens_per_s"] = log["tokens"] / max(log["train_s"], 1e-9)  # training steps only, no validation
    log.update(_peak_memory(device))
    checkpoint(done)
    return log


def _load_params(named, saved: dict[str, torch.Tensor]) -> None:
    missing = [n for n, _ in named if n not in saved]
    if missing:
        raise ValueError(f"resume: checkpoint lacks parameters {missing[:3]}... (different model or layers?)")
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n].to(p.device, p.dtype))


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="stage 1 (attention transfer)", unit="step", dynamic_ncols=True)
