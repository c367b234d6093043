"""Kernels for the hybrid linear + sliding-window softmax layer (torch and triton only).

Installed as `hf_hybrid_attn.kernels`. Never imports transformers.

- `reference.py`: the readable quadratic definition (float64-safe).
- `chunked.py`:   O(T*w) PyTorch implementation, the CPU path.
- `dispatch.py`:  `hybrid_attention(...)`, which picks an implementation.
"""

from .chunked import hybrid_attention_chunked
from .dispatch import BACKENDS, hybrid_attention, set_input_checks, triton_available, validate_inputs
from .reference import (
    KERNEL_MODES,
    expand_kv_heads,
    hybrid_attention_reference,
    linear_state,
    sinks_attention,
)

__all__ = [
    "BACKENDS",
    "KERNEL_MODES",
    "expand_kv_heads",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_reference",
    "linear_state",
    "sinks_attention",
    "set_input_checks",
    "triton_available",
    "validate_inputs",
]


def __getattr__(name):
    """Lazy access to the Triton kernels, so that importing this package does not import triton."""
    if name == "hybrid_attention_triton":
        from .triton_hybrid import hybrid_attention_triton

        return hybrid_attention_triton
    if name in ("DecodeCache", "hybrid_decode_triton"):
        from . import triton_decode

        return getattr(triton_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
