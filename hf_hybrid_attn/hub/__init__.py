"""Push converted models and PEFT adapters to the Hugging Face Hub, with a model card.

    from hf_hybrid_attn.hub import push_to_hub, push_adapter
    push_to_hub(model_or_dir, "me/smollm2-hybrid", diagnostics="runs/diag")   # model + card, one commit
    push_adapter(peft_model, "me/smollm2-hybrid-lora", base_model="me/smollm2-hybrid")

Everything that can be checked locally is checked before the first request that writes: the token,
the files (safetensors only), and the card metadata (locally, then by the Hub's /api/validate-yaml).
The files and the card then go up in ONE commit, so the card can never be replaced by
transformers' default card and a failed upload leaves the previous revision as it was.

Modules (this package imports neither torch nor transformers; each function imports what it needs):
  card    the model card: metadata, training summary, diagnostics tables, rendering, validation
  push    token and repo checks, the single commit, push_to_hub, push_adapter
  export  export_remote_code: a flat copy of the modeling code for trust_remote_code=True
  cli     `hf-hybrid push` (add_push_subparser, run_push)
"""

from __future__ import annotations

from .card import (
    DIAGNOSTICS_JSON,
    TAG,
    TEMPLATE,
    UntrainedFeatureMapsWarning,
    diagnostics_tables,
    feature_maps_untrained,
    load_diagnostics,
    render_model_card,
    training_summary,
    validate_card,
)
from .cli import add_push_subparser, run_push
from .export import EXPORT_ENTRY, EXPORT_PREFIX, export_remote_code
from .push import PICKLE_SUFFIXES, push_adapter, push_to_hub, resolve_token

__all__ = [
    "DIAGNOSTICS_JSON",
    "EXPORT_ENTRY",
    "EXPORT_PREFIX",
    "PICKLE_SUFFIXES",
    "TAG",
    "TEMPLATE",
    "UntrainedFeatureMapsWarning",
    "add_push_subparser",
    "diagnostics_tables",
    "export_remote_code",
    "feature_maps_untrained",
    "load_diagnostics",
    "push_adapter",
    "push_to_hub",
    "render_model_card",
    "resolve_token",
    "run_push",
    "training_summary",
    "validate_card",
]
