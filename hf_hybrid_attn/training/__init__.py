"""Conversion training (SPEC §3): attention transfer, LoRA fine-tuning, SSD, recipes, data.

    from hf_hybrid_attn.training import get_recipe, run_recipe, build_packed_data
    recipe = get_recipe("hedgecats", **{"transfer.lr": 5e-3})
    data = build_packed_data(tokenizer, "sotu", seq_len=1024, window=64)
    model, log = run_recipe(model, recipe, data, out_dir="out", tokens=2_000_000)
"""

from .data import (
    PackedData,
    PackedDataset,
    build_packed_data,
    load_documents,
    pack_token_ids,
    split_documents,
)
from .finetune import FinetuneConfig, add_lora, finetune
from .objectives import OBJECTIVES, attn_ce_loss, output_mse
from .recipes import RECIPES, Recipe, SSDConfig, get_recipe, run_recipe
from .ssd import PAPER_STAGES, Schedule, SSDCallback, drop_decisions, drop_rows
from .transfer import (
    TransferConfig,
    TransferHook,
    evaluate_transfer,
    teacher_attention,
    train_attention_transfer,
)

__all__ = [
    "OBJECTIVES",
    "PAPER_STAGES",
    "RECIPES",
    "FinetuneConfig",
    "PackedData",
    "PackedDataset",
    "Recipe",
    "SSDCallback",
    "SSDConfig",
    "Schedule",
    "TransferConfig",
    "TransferHook",
    "add_lora",
    "attn_ce_loss",
    "build_packed_data",
    "drop_decisions",
    "drop_rows",
    "evaluate_transfer",
    "finetune",
    "get_recipe",
    "load_documents",
    "output_mse",
    "pack_token_ids",
    "run_recipe",
    "split_documents",
    "teacher_attention",
    "train_attention_transfer",
]
