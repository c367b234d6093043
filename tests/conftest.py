import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this flag when it is
# first imported, so it must be set here, before any test module (or transformers) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import _interpreter  # noqa: E402  (after the flag: it must not import triton first)

if _interpreter.interpreter_on():
    _interpreter.skip_repatching_inside_kernels()

# scripts/run_tests.sh runs the suite on pytest-xdist workers (`-n 2 --dist loadfile`), one per core.
# Each worker then computes on one thread, and so do the subprocesses it starts (the study, the demo,
# the venv checks): torch's default of one OpenMP thread per core in every worker oversubscribes the
# cores, and measured on the 2-core machine that made the suite slower than no workers at all.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)

# The longest modules go first (summed test seconds on 2 workers, 2-core CPU machine: the study
# 532, the kernels 312, Gemma-3 240, the gpu_evidence dry run 227, ...). xdist's loadfile scheduler,
# run with --no-loadscope-reorder, hands each worker the next module in this order when it is nearly
# done, so no long module is left to run alone at the end. Within a module, and among the others, the
# collection order is kept.
_LONGEST_FIRST = (
    "test_reproduce_paper.py",
    "test_triton_kernels.py",
    "test_gemma3.py",
    "test_gpu_evidence.py",
    "test_fused_decode.py",
    "test_kernel_numerics_devices.py",
    "test_hub.py",
    "test_compile.py",
    "test_bench_long_context.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(family: str = "llama", **overrides):
    """The transformers test-suite's tiny shape: vocab 99, hidden 32, 2 layers, heads 4 / kv 2."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma3_text": Gemma3TextConfig}[family]
    kw = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "qwen3":
        kw["head_dim"] = 8
    if family == "gemma3_text":  # q/k norms, its own query scaling, local/global RoPE; 2 local : 1 global
        kw.update(head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=3, num_key_value_heads=1, sliding_window=8,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str = "llama", **overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa").eval()


def randomize_mixers(model, scale: float = 0.5):
    """Move the hybrid parameters away from their init so tests exercise non-trivial values."""
    import hf_hybrid_attn

    with torch.no_grad():
        for _, attn in hf_hybrid_attn.iter_hybrid_attention(model):
            for p in attn.hybrid.parameters():
                p.add_(scale * torch.randn_like(p))


def load_teacher_benchmark(name: str):
    """benchmarks/<name>.py as a fresh module (tests may monkeypatch it); the test is skipped, with
    the reason, where the SmolLM2 teacher asset is not installed (scripts/run_tests.sh installs it)."""
    from hf_hybrid_attn.assets import AssetMissingError, teacher_gguf_path

    try:
        teacher_gguf_path()
    except AssetMissingError as e:
        pytest.skip(f"SmolLM2 teacher asset missing: {e}")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
