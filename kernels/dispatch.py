"""Backend selection: Triton on CUDA tensors when available, chunked PyTorch otherwise."""

from __future__ import annotations

import functools

import torch

from .chunked import hybrid_attention_chunked
from .reference import hybrid_attention_reference
from .validation import set_input_checks, validate_inputs  # noqa: F401  (re-exported)

BACKENDS = ("auto", "triton", "torch", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _triton_impl():
    from .triton_hybrid import hybrid_attention_triton  # imported lazily: triton is optional

    return hybrid_attention_triton


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and triton_available() and _has_triton_kernels()) else "torch"
    return backend


@functools.lru_cache(maxsize=1)
def _has_triton_kernels() -> bool:
    try:
        _triton_impl()
    except ImportError:
        return False
    return True


def hybrid_attention(q, k, v, phi_q, phi_k, gamma, alpha, *, backend: str = "auto", **kwargs):
    """Hybrid attention with the contract of `reference.hybrid_attention_reference`.

    backend: "auto" (Triton on CUDA, chunked PyTorch otherwise), "triton", "torch" (chunked) or
    "reference" (quadratic). Inputs are validated first (see `validate_inputs`)."""
    validate_inputs(q, k, v, phi_q, phi_k, gamma, alpha, mode=kwargs.get("mode", "hybrid"), **{k_: v_ for k_, v_ in kwargs.items() if k_ != "mode"})
    which = resolve_backend(backend, q.device)
    if which == "triton":
        return _triton_impl()(q, k, v, phi_q, phi_k, gamma, alpha, _validated=True, **kwargs)
    if which == "reference":
        kwargs.pop("chunk_size", None)
        return hybrid_attention_reference(q, k, v, phi_q, phi_k, gamma, alpha, **kwargs)
    return hybrid_attention_chunked(q, k, v, phi_q, phi_k, gamma, alpha, **kwargs)
