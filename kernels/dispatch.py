"""Backend selection: Triton on CUDA tensors when available, chunked PyTorch otherwise."""

from __future__ import annotations

import functools
import warnings

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


@functools.cache
def warn_triton_softmax_sinks(what: str) -> None:
    """Once per process and kernel: the Triton kernels do not implement softmax_sinks yet."""
    warnings.warn(f"softmax_sinks > 0: the Triton {what} does not implement softmax sinks yet; running the "
                  "PyTorch implementation instead (SPEC §2, 'Softmax sinks')", RuntimeWarning, stacklevel=3)


def hybrid_attention(q, k, v, phi_q, phi_k, gamma, alpha, *, backend: str = "auto", **kwargs):
    """Hybrid attention with the contract of `reference.hybrid_attention_reference`.

    backend: "auto" (Triton on CUDA, chunked PyTorch otherwise), "triton", "torch" (chunked) or
    "reference" (quadratic). Inputs are validated first (see `validate_inputs`). With
    softmax_sinks > 0 a Triton choice runs the chunked path (the Triton kernels do not implement
    the sinks yet; one warning)."""
    validate_inputs(q, k, v, phi_q, phi_k, gamma, alpha, mode=kwargs.get("mode", "hybrid"), **{k_: v_ for k_, v_ in kwargs.items() if k_ != "mode"})
    which = resolve_backend(backend, q.device)
    if not kwargs.get("softmax_sinks") and kwargs.get("prefix_sinks") is None:
        kwargs.pop("softmax_sinks", None)  # off: every backend's own contract, unchanged
        kwargs.pop("prefix_sinks", None)
    elif which == "triton":
        warn_triton_softmax_sinks("hybrid attention kernel")
        which = "torch"
    if which == "triton":
        return _triton_impl()(q, k, v, phi_q, phi_k, gamma, alpha, _validated=True, **kwargs)
    if which == "reference":
        kwargs.pop("chunk_size", None)
        return hybrid_attention_reference(q, k, v, phi_q, phi_k, gamma, alpha, **kwargs)
    return hybrid_attention_chunked(q, k, v, phi_q, phi_k, gamma, alpha, **kwargs)
