"""Named conversion recipes (SPEC §3) and the driver that runs one end to end.

| recipe        | stage 1 (attention transfer) | stage 2 (LoRA)                          | after training        |
|---------------|------------------------------|-----------------------------------------|-----------------------|
| `lolcats`     | output_mse_hybrid x 1000     | hybrid LoRA, full budget                | hybrid                |
| `linear_only` | attn_ce                      | LoRA in linear_only mode                | hybrid (inference-time hybridisation) |
| `hedgecats`   | attn_ce                      | short hybrid LoRA, early-stopped        | hybrid                |
| `ssd`         | attn_ce                      | hybrid LoRA with SSD (0.9 -> 0.75 -> 0.5) | hybrid              |

Every field can be overridden: `get_recipe("ssd", **{"ssd.granularity": "sample", "finetune.lr": 2e-4})`.
What ran is stored with the model in `model.config.hybrid["training"]` (see `training_record`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import HybridConfig
from ..layers import HybridMixer
from ..modeling import component_mode, convert, iter_hybrid_attention
from .data import PackedData
from .finetune import FinetuneConfig, finetune
from .ssd import GRANULARITIES, Schedule, SSDCallback
from .transfer import TransferConfig, _mixer, train_attention_transfer

#: Key of config.hybrid under which the training record is saved.
TRAINING_KEY = "training"


@dataclass
class SSDConfig:
    """Scheduled Sliding-window Dropout settings (see `ssd.SSDCallback`)."""

    drop_schedule: str = "stages:0.9,0.75,0.5"
    """p over the fraction of training: 'stages:...', 'linear:a,b' or a constant."""
    window_schedule: str | None = None
    """Optional window size over training, same syntax (e.g. 'stages:0=32,0.5=64')."""
    granularity: str = "layer"
    """layer | model | sample."""
    seed: int = 0

    def callback(self, record: bool = False) -> SSDCallback:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"ssd.granularity: expected one of {GRANULARITIES}, got {self.granularity!r}")
        window = Schedule.parse(self.window_schedule) if self.window_schedule else None
        return SSDCallback(Schedule.parse(self.drop_schedule), window, self.granularity, self.seed, record)


@dataclass
class Recipe:
    """A named preset: how to convert (hybrid), stage 1, stage 2, SSD, and the token split."""

    name: str
    description: str
    hybrid: dict[str, Any] = field(default_factory=dict)
    """HybridConfig fields for the conversion (window, feature_map, feature_dim, ...)."""
    transfer: TransferConfig | None = field(default_factory=TransferConfig)
    """Stage 1; None skips it."""
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    """Stage 2; None skips it."""
    ssd: SSDConfig | None = None
    transfer_token_fraction: float = 0.5
    """Share of a total token budget given to stage 1 (the rest goes to stage 2)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.get("finetune"):
            d["finetune"]["target_modules"] = list(d["finetune"]["target_modules"])
        return d

    def with_overrides(self, **overrides: Any) -> Recipe:
        """A copy with dotted fields replaced: 'transfer.lr', 'finetune.lora_r', 'hybrid.window',
        'ssd.granularity', 'transfer_token_fraction' ('transfer'/'finetune'/'ssd' = None drops a part)."""
        r = dataclasses.replace(
            self,
            hybrid=dict(self.hybrid),
            transfer=dataclasses.replace(self.transfer) if self.transfer else None,
            finetune=dataclasses.replace(self.finetune) if self.finetune else None,
            ssd=dataclasses.replace(self.ssd) if self.ssd else None,
        )
        for key, value in overrides.items():
            part, _, name = key.partition(".")
            if not name:
                if part not in {f.name for f in dataclasses.fields(Recipe)} or part == "name":
                    raise ValueError(f"recipe override {key!r}: unknown field; expected e.g. 'transfer.lr' or 'hybrid.window'")
                setattr(r, part, value)
                continue
            if part == "hybrid":
                if name not in {f.name for f in dataclasses.fields(HybridConfig)}:
                    raise ValueError(f"recipe override {key!r}: HybridConfig has no field {name!r}")
                r.hybrid[name] = value
                continue
            if part == "ssd" and r.ssd is None:
                r.ssd = SSDConfig()
            target = getattr(r, part, None) if part in ("transfer", "finetune", "ssd") else None
            if target is None:
                raise ValueError(f"recipe override {key!r}: expected a prefix among hybrid, transfer, finetune, ssd (and that part enabled)")
            names = {f.name for f in dataclasses.fields(target)}
            if name not in names:
                raise ValueError(f"recipe override {key!r}: {type(target).__name__} has no field {name!r}; fields: {sorted(names)}")
            setattr(target, name, tuple(value) if name == "target_modules" else value)
        if not 0.0 <= r.transfer_token_fraction <= 1.0:
            raise ValueError(f"transfer_token_fraction: expected a fraction in [0, 1], got {r.transfer_token_fraction!r}")
        return r


def _lolcats() -> Recipe:
    return Recipe(
        "lolcats",
        "LoLCATs: hybrid-output MSE transfer (x1000), then hybrid LoRA (the baseline the paper criticises)",
        transfer=TransferConfig(objectives={"output_mse_hybrid": 1000.0}),
        finetune=FinetuneConfig(early_stopping_patience=None),
    )


def _linear_only() -> Recipe:
    return Recipe(
        "linear_only",
        "LA-only conversion (attention-weight transfer, LoRA in linear_only mode), then inference-time "
        "hybridisation: the model is saved in hybrid mode",
        transfer=TransferConfig(objectives={"attn_ce": 1.0}),
        finetune=FinetuneConfig(train_mode="linear_only", final_mode="hybrid", early_stopping_patience=None),
    )


def _hedgecats() -> Recipe:
    return Recipe(
        "hedgecats",
        "HedgeCATs: Hedgehog attention-weight transfer, then short, early-stopped hybrid LoRA",
        transfer=TransferConfig(objectives={"attn_ce": 1.0}),
        finetune=FinetuneConfig(early_stopping_patience=2, eval_every=25),
        transfer_token_fraction=0.8,
    )


def _ssd() -> Recipe:
    return Recipe(
        "ssd",
        "Attention-weight transfer, then hybrid LoRA with Scheduled Sliding-window Dropout (0.9 -> 0.75 -> 0.5)",
        transfer=TransferConfig(objectives={"attn_ce": 1.0}),
        finetune=FinetuneConfig(early_stopping_patience=None),
        ssd=SSDConfig(),
    )


RECIPES = {"lolcats": _lolcats, "linear_only": _linear_only, "hedgecats": _hedgecats, "ssd": _ssd}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]().with_overrides(**overrides)


def split_tokens(recipe: Recipe, tokens: int | None) -> Recipe:
    """Give `tokens` to the stages by `transfer_token_fraction` (stages with max_steps keep them)."""
    if tokens is None:
        return recipe
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens: expected a positive integer, got {tokens!r}")
    r = recipe.with_overrides()
    stage1 = int(tokens * r.transfer_token_fraction) if r.finetune else tokens
    if r.transfer:
        r.transfer.tokens = stage1
    if r.finetune:
        r.finetune.tokens = tokens - (stage1 if r.transfer else 0)
    return r


def training_record(recipe: Recipe, logs: dict[str, dict], data_info: dict | None = None) -> dict[str, Any]:
    """What is saved in config.hybrid['training']: recipe, hyperparameters, tokens per stage."""
    from .._version import __version__

    stages = {}
    for stage, log in logs.items():
        stages[stage] = {
            k: log.get(k)
            for k in ("steps", "steps_done", "tokens", "stopped_early", "initial_val_loss", "final_val_loss", "wall_s", "tokens_per_s")
        }
    return {
        "recipe": recipe.name,
        "config": recipe.to_dict(),
        "stages": stages,
        "data": data_info or {},
        "hf_hybrid_attn_version": __version__,
    }


def hybrid_parameter_dtypes(model) -> dict[tuple[int, str], torch.dtype]:
    """{(layer index, parameter name inside its HybridMixer): dtype} for every converted layer (the
    names are the same through PEFT's modules_to_save copy of a mixer)."""
    return {(idx, name): p.dtype for idx, attn in iter_hybrid_attention(model)
            for m in attn.hybrid.modules() if isinstance(m, HybridMixer) for name, p in m.named_parameters()}


def set_hybrid_parameter_dtypes(model, dtypes: dict[tuple[int, str], torch.dtype]) -> None:
    """Cast the hybrid parameters in place (same Parameter objects) to `dtypes`
    (as returned by `hybrid_parameter_dtypes`); keys absent from `dtypes` are left alone."""
    for idx, attn in iter_hybrid_attention(model):
        for m in attn.hybrid.modules():
            if isinstance(m, HybridMixer):
                for name, p in m.named_parameters():
                    dtype = dtypes.get((idx, name))
                    if dtype is not None and p.dtype != dtype:
                        p.data = p.data.to(dtype)


def kernels_used(model) -> dict[str, str]:
    """Which attention implementation the hybrid layers ran: the backend each layer's device and
    `backend` setting resolve to (training and prefill; decode steps use the fused decode kernel
    with the Triton backend)."""
    from ..kernels.dispatch import resolve_backend

    files = {"triton": "kernels/triton_hybrid.py (Triton chunked scan, fwd + bwd)",
             "torch": "kernels/chunked.py (PyTorch chunked, autograd)",
             "reference": "kernels/reference.py (quadratic reference)"}
    seen = {}
    for _, attn in iter_hybrid_attention(model):
        mixer = _mixer(attn)  # (PEFT may wrap it)
        device = mixer.window_logit.device
        which = resolve_backend(mixer.backend, device)
        seen[f"{mixer.backend}@{device.type}"] = files[which]
    return seen


def run_recipe(
    model,
    recipe: Recipe,
    data: PackedData,
    out_dir: str,
    tokens: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
    mode_eval_blocks: int = 8,
):
    """Convert (if needed), run stage 1 and stage 2, record the training. Returns (model, log).

    Checkpoints go to `out_dir/checkpoints/{stage1,stage2}`; with `resume` both stages continue from
    them (a finished stage is not redone). The returned model is merged (no PEFT) unless
    recipe.finetune.merge is False.

    The hybrid parameters are fp32 master weights through both stages, whatever the model's dtype
    (stage 2 trains them with `finetune.train_feature_maps`); they return to the dtype they were
    converted in before the component-mode evaluation, so the returned (and saved) model keeps
    its dtype."""
    recipe = split_tokens(recipe, tokens)
    if not any(True for _ in iter_hybrid_attention(model)):
        model = convert(model, HybridConfig(**recipe.hybrid))
    window = next(iter_hybrid_attention(model))[1].hybrid.window
    if data.seq_len <= window:
        raise ValueError(f"seq_len ({data.seq_len}) must be larger than the window ({window})")
    ckpt = os.path.join(out_dir, "checkpoints")
    logs: dict[str, dict] = {}
    t0 = time.perf_counter()
    dtypes = hybrid_parameter_dtypes(model)
    set_hybrid_parameter_dtypes(model, {key: torch.float32 for key in dtypes})
    try:
        if recipe.transfer is not None:
            logs["transfer"] = train_attention_transfer(
                model, data.train, recipe.transfer, data.val, os.path.join(ckpt, "stage1"), resume, progress
            )
            _write_json(os.path.join(out_dir, "training_log.partial.json"), {"recipe": recipe.name, "stages": logs})
        if recipe.finetune is not None:
            cbs = list(callbacks or [])
            if recipe.ssd is not None:
                cbs.append(recipe.ssd.callback())
            model, logs["finetune"] = finetune(
                model, data.train, recipe.finetune, data.val, os.path.join(ckpt, "stage2"), resume, cbs, progress
            )
    finally:  # the model that came out of stage 2 (PEFT's copy replaces a trained mixer when merged)
        set_hybrid_parameter_dtypes(model, dtypes)
    for p in model.parameters():
        p.requires_grad_(False)
    mode_losses = component_mode_losses(model, data.val[:mode_eval_blocks]) if mode_eval_blocks else None
    record = training_record(recipe, logs, data.info)
    if mode_losses:
        record["val_loss_by_mode"] = mode_losses
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.hybrid[TRAINING_KEY] = record
    log = {"recipe": recipe.name, "recipe_config": recipe.to_dict(), "data": data.info, "stages": logs,
           "val_loss_by_mode": mode_losses, "kernels": kernels_used(model), "total_wall_s": time.perf_counter() - t0}
    return model, log


@torch.no_grad()
def component_mode_losses(model, blocks: torch.Tensor, modes: tuple[str, ...] = ("hybrid", "swa_only", "linear_only"),
                          batch_size: int = 4) -> dict[str, float]:
    """Next-token cross-entropy on `blocks` in each component mode: the paper's quick check that the
    linear branch matters (hybrid clearly better than swa_only) after training."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for mode in modes:
        total, count = 0.0, 0
        with component_mode(model, mode):
            for start in range(0, blocks.shape[0], batch_size):
                ids = blocks[start : start + batch_size].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                total += float(loss) * ids.shape[0]
                count += ids.shape[0]
        out[mode] = total / max(count, 1)
    model.train(was_training)
    return out


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
