"""Stage 2, fine-tuning (SPEC §3): LoRA through peft, next-token cross-entropy, `transformers.Trainer`.

Feature maps and window logits stay frozen unless `train_feature_maps` (then `modules_to_save=
["hybrid"]`, and PEFT trains a copy of each layer's `hybrid`). Early stopping on validation loss
uses `EarlyStoppingCallback` with `load_best_model_at_end`. `train_mode` runs the whole stage in
one component mode (the `linear_only` recipe); the model is switched to `final_mode` afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ..config import COMPONENT_MODES
from ..modeling import (
    collect_linear_share,
    component_mode,
    iter_hybrid_attention,
    quiet_base_config_probe,
    set_component_mode,
)
from .data import PackedDataset

FINAL_DIR = "final"
FINAL_LOG = "stage2_log.json"
INITIAL_LOG = "stage2_initial.json"


@dataclass
class FinetuneConfig:
    """Hyperparameters of stage 2."""

    lr: float = 1e-4
    """Learning rate (LoLCATs: 1e-4)."""
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    tokens: int | None = None
    """Training tokens; sets the number of steps when `max_steps` is None."""
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_feature_maps: bool = False
    """Also train feature maps and window logits (PEFT modules_to_save=['hybrid'])."""
    train_mode: str = "hybrid"
    """Component mode during training (linear_only for the `linear_only` recipe)."""
    final_mode: str = "hybrid"
    """Component mode set after training (inference-time hybridisation: hybrid)."""
    eval_every: int = 50
    """Validation (and checkpoint) every this many steps."""
    log_every: int = 10
    """Training-loss logging every this many steps."""
    eval_blocks: int = 32
    """Validation blocks used per evaluation."""
    early_stopping_patience: int | None = 3
    """Evaluations without improvement before stopping (None: no early stopping)."""
    save_total_limit: int = 2
    merge: bool = True
    """Merge the LoRA weights into the base (merge_and_unload) for the final save."""
    bf16: bool = False
    seed: int = 0
    share_blocks: int = 2
    """Validation blocks on which the LA share of the normaliser (SPEC §4, `hybrid` mode) is measured
    at every evaluation, so the log shows how it moves during the stage (0: not measured)."""

    def validate(self) -> None:
        for name in ("train_mode", "final_mode"):
            if getattr(self, name) not in COMPONENT_MODES:
                raise ValueError(f"{name}: expected one of {COMPONENT_MODES}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "lora_r", "eval_every", "eval_blocks", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if isinstance(self.share_blocks, bool) or not isinstance(self.share_blocks, int) or self.share_blocks < 0:
            raise ValueError(f"share_blocks: expected an integer >= 0, got {self.share_blocks!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")

    def steps_for(self, seq_len: int) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        if self.tokens is None:
            raise ValueError("FinetuneConfig: set either tokens or max_steps")
        return max(1, self.tokens // (self.batch_size * self.grad_accum * seq_len))


def add_lora(model, cfg: FinetuneConfig):
    """Wrap `model` with LoRA adapters (feature maps frozen unless cfg.train_feature_maps)."""
    from peft import LoraConfig, get_peft_model

    for name, p in model.named_parameters():
        if ".hybrid." in f".{name}":
            p.requires_grad_(cfg.train_feature_maps)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=["hybrid"] if cfg.train_feature_maps else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


class _TimingCallback(TrainerCallback):
    """Wall time of the training steps alone (evaluation and checkpointing excluded)."""

    def __init__(self):
        self.train_s, self._t = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._t is not None:
            self.train_s += time.perf_counter() - self._t
            self._t = None


class LinearShareCallback(TrainerCallback):
    """At every evaluation, the LA share of the normaliser (SPEC §4) in `hybrid` mode, per converted
    layer, on fixed validation blocks. Entries go into `state.log_history` (so a checkpoint keeps
    them across `--resume`) as {"step", "linear_share", "linear_share_per_layer"}; the stage log
    lists them as `linear_share_curve`. The measurement runs in eval mode without gradients and
    restores the layers' modes (an SSD step's dropped layers included)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            with component_mode(model, "hybrid"):
                share = collect_linear_share(model, self.blocks.to(device))
        finally:
            model.train(was_training)
        per_layer = share.float().mean(1)
        state.log_history.append({"step": state.global_step, "linear_share": float(per_layer.mean()),
                                  "linear_share_per_layer": [round(float(x), 5) for x in per_layer]})


def finetune(
    model,
    train_blocks: torch.Tensor,
    cfg: FinetuneConfig,
    val_blocks: torch.Tensor | None = None,
    output_dir: str = "stage2",
    resume: bool = False,
    callbacks: list | None = None,
    progress: bool = True,
):
    """Run stage 2. Returns (model, log): the merged model (cfg.merge) or the PeftModel."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    cfg.validate()
    seq_len = train_blocks.shape[1]
    steps = cfg.steps_for(seq_len)
    peft_model = add_lora(model, cfg)
    final_dir = os.path.join(output_dir, FINAL_DIR)
    if resume and os.path.isfile(os.path.join(final_dir, FINAL_LOG)):
        return _load_finished(peft_model, final_dir, cfg)
    set_component_mode(peft_model, cfg.train_mode)
    use_eval = val_blocks is not None and val_blocks.shape[0] > 0
    early = use_eval and cfg.early_stopping_patience is not None
    eval_every = min(cfg.eval_every, steps)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.log_every,
        eval_strategy="steps" if use_eval else "no",
        eval_steps=eval_every if use_eval else None,
        save_strategy="steps",
        save_steps=eval_every,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.bf16,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="all",
        # trained window logits go unused in linear_only steps (SSD drops, linear_only training)
        ddp_find_unused_parameters=cfg.train_feature_maps,
    )
    timing = _TimingCallback()
    cbs = [timing] + list(callbacks or [])
    if use_eval and cfg.share_blocks and any(True for _ in iter_hybrid_attention(peft_model)):
        cbs.append(LinearShareCallback(val_blocks[: cfg.share_blocks]))
    if early:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=PackedDataset(train_blocks),
        eval_dataset=PackedDataset(val_blocks[: cfg.eval_blocks]) if use_eval else None,
        callbacks=cbs,
    )
    if not progress:  # quiet: no per-step log lines either (the returned log has the curves)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    checkpoint = get_last_checkpoint(output_dir) if resume and os.path.isdir(output_dir) else None
    initial = _initial_evaluation(trainer, output_dir, use_eval, checkpoint)
    initial_eval = initial.get("eval_loss")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # peak_cuda_mb is this stage's own
    t0 = time.perf_counter()
    with quiet_base_config_probe():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - t0
    history = list(trainer.state.log_history)
    final_eval = trainer.evaluate()["eval_loss"] if use_eval else None
    set_component_mode(peft_model, cfg.final_mode)

    tokens = trainer.state.global_step * cfg.batch_size * cfg.grad_accum * seq_len
    log = {
        "stage": "finetune",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "steps": steps,
        "steps_done": trainer.state.global_step,
        "stopped_early": trainer.state.global_step < steps,
        "best_step": _best_step(trainer.state.best_model_checkpoint),
        "best_val_loss": trainer.state.best_metric,
        "initial_val_loss": initial_eval,
        "final_val_loss": final_eval,
        "train_curve": [{"step": h["step"], "loss": h["loss"], **{k: v for k, v in h.items() if k.startswith("ssd_")}}
                        for h in history if "loss" in h],
        "val_curve": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        # every evaluation's share; the last entry is the final evaluation (the best model with early stopping)
        "linear_share_curve": initial.get("linear_share", []) + [h for h in trainer.state.log_history if "linear_share" in h],
        "tokens": tokens,
        "wall_s": wall,
        "train_s": timing.train_s,
        "tokens_per_s": tokens / max(timing.train_s, 1e-9) if not checkpoint else None,
        "train_loss": result.training_loss,
        "resumed_from": checkpoint,
        "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if torch.cuda.is_available():
        log["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # The final adapter (best one with early stopping) and the log mark the stage as finished: a
    # later --resume loads them instead of training again (the Trainer would run an extra step).
    # Under a multi-process launch only the main process writes; the others wait for it, so no rank
    # can see (or race on) a half-written final folder.
    if trainer.is_world_process_zero():
        with quiet_base_config_probe():
            peft_model.save_pretrained(final_dir)
        with open(os.path.join(final_dir, FINAL_LOG + ".tmp"), "w") as f:
            json.dump(log, f, indent=2, default=str)
        os.replace(os.path.join(final_dir, FINAL_LOG + ".tmp"), os.path.join(final_dir, FINAL_LOG))
    trainer.accelerator.wait_for_everyone()
    out = peft_model.merge_and_unload() if cfg.merge else peft_model
    return out, log


def _initial_evaluation(trainer, output_dir: str, use_eval: bool, checkpoint: str | None) -> dict:
    """Validation loss (and LA share) before any training step. `Trainer.train` starts a fresh
    state, so these are kept in OUTPUT_DIR/INITIAL_LOG, which a resumed run reads back."""
    path = os.path.join(output_dir, INITIAL_LOG)
    if not use_eval:
        return {}
    if checkpoint is not None:
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {}
    loss = trainer.evaluate()["eval_loss"]
    out = {"eval_loss": loss, "linear_share": [h for h in trainer.state.log_history if "linear_share" in h]}
    if trainer.is_world_process_zero():
        os.makedirs(output_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)
    return out


def _load_finished(peft_model, final_dir: str, cfg: FinetuneConfig):
    """A finished stage 2 (resume): load its final adapter and log, train nothing."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(final_dir, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"resume: the finished stage-2 adapter in {final_dir!r} does not fit this model "
                         f"(unexpected keys {result.unexpected_keys[:3]})")
    set_component_mode(peft_model, cfg.final_mode)
    with open(os.path.join(final_dir, FINAL_LOG)) as f:
        log = json.load(f)
    log["resumed_from"] = final_dir
    out = peft_model.merge_and_unload() if cfg.merge else peft_model
    return out, log


def _best_step(path: str | None) -> int | None:
    if not path:
        return None
    tail = os.path.basename(os.path.normpath(path))
    return int(tail.split("-")[-1]) if tail.startswith("checkpoint-") else None
