"""The vLLM test cases, shared by the model builder (main venv: converts the models and records HF
`generate()` references with HybridCache) and the vLLM tests (vLLM venv): plain data, no imports."""

#: tiny random models: window 8, so prompts < w, around w and >= 4w are short
TINY_WINDOW = 8
TINY_LENGTHS = [3, 5, 7, 8, 9, 20, 33, 45]          # 8 prompts: < w, around w, >= 4w
TINY_NEW_TOKENS = 12
MODES = ["hybrid", "swa_only", "linear_only", "sinks_only", "none"]

#: name -> (family, converted layers (None: all), modes with HF references)
TINY_MODELS = {
    "tiny_llama": ("llama", None, MODES),
    "tiny_qwen3": ("qwen3", None, ["hybrid", "linear_only"]),
    "tiny_llama_partial": ("llama", [0, 2], ["swa_only", "hybrid"]),
}

#: the real SmolLM2-135M-Instruct teacher (Q4_1, dequantized), converted untrained at the defaults (w = 64)
SMOL_LENGTHS = [12, 40, 63, 64, 65, 130, 256, 300]  # < w, around w, >= 4w
SMOL_NEW_TOKENS = 16
SMOL_MODES = ["hybrid"]
