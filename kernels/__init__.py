"""Kernels for the hybrid linear + sliding-window softmax layer (torch and triton only).

Installed as `hf_hybrid_attn.kernels`. Never imports transformers.

- `reference.py`: the readable quadratic definition (float64-safe).
- `chunked.py`:   O(T*w) PyTorch implementation, the CPU path.
- `dispatch.py`:  `hybrid_attention(...)`, which picks an implementation.

In a source checkout this folder sits at the repository root, beside `hf_hybrid_attn/`. Whenever the
root is on `sys.path` (`python -m pytest` or `python -c ...` run inside a clone puts the working
directory there), `import kernels` would find this folder instead of PyPI's `kernels` package, which
transformers probes for and imports (from 5.25 on it is a hard dependency: the import of
transformers itself then fails). So when this file runs under the top-level name `kernels`, it does
not load the hybrid kernels at all: it hands the name to PyPI's `kernels` if that is installed
anywhere else on `sys.path`, and otherwise stays an empty module without a version, which
transformers reads as "not installed". The hybrid kernels are only ever `hf_hybrid_attn.kernels`.
"""

if __name__ == "kernels":  # this folder, reached through the repository root on sys.path: see above

    def _defer_to_pypi_kernels() -> None:
        import importlib.util
        import os
        import sys
        from importlib.machinery import PathFinder

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def elsewhere(entry) -> bool:
            if not isinstance(entry, str):
                return True
            try:
                return not os.path.samefile(entry or os.getcwd(), root)
            except OSError:  # a path entry that does not exist (or a zip file): not the root
                return True

        spec = PathFinder.find_spec("kernels", [p for p in sys.path if elsewhere(p)])
        if spec is None or spec.loader is None:
            return  # PyPI's kernels is not installed: stay an empty module, which reads as absent
        real = importlib.util.module_from_spec(spec)
        this = sys.modules["kernels"]
        sys.modules["kernels"] = real  # the import system returns whatever is here once this file ends
        try:
            spec.loader.exec_module(real)
        except BaseException:
            sys.modules["kernels"] = this
            raise

    _defer_to_pypi_kernels()
    del _defer_to_pypi_kernels

else:
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
