"""Everything this package knows about transformers' API differences between versions: one module.

Supported: transformers 5.17 through the newest release CI has passed (pyproject.toml). When
transformers renames or moves something that the plugin touches, this is the one file to edit.

Known differences, oldest first:
  - **The cache argument.** Up to 5.23 models, attention modules, `generate()`'s model kwargs and
    model outputs call the cache `past_key_values`. 5.24 renamed it to `cache` (the old name is a
    deprecated alias until 5.40; passing it warns). We never hard-code either name: the name is read
    from the installed model class's own `forward` signature (`cache_arg_name`), so a model family
    migrated in a later release than another is handled too, and a further rename only needs its
    new spelling added to `CACHE_ARG_NAMES`.
  - **Mask functions.** The hybrid's mask interface receives transformers' mask pattern as a
    function; `plain_mask_window` recognises the plain causal and sliding-window patterns (the same
    closures in every supported version) so that only key padding is passed on, never Tq x Tk.
  - **Paged attention / continuous batching.** Up to 5.23 the paged cache reaches the attention
    function as the `cache=` keyword; from 5.24 it is the attention module's `cache` argument and
    the attention function sees only the paged metadata (`block_table`, `cu_seq_lens_q`, ...).
    `is_paged_or_packed` recognises both.
  - **Hub kernels.** From 5.25 `from_pretrained` kernelizes every model by default and imports PyPI's
    `kernels` (a hard dependency). Nothing here needs to change for it: on CPU nothing is replaced,
    and the hybrid's modules carry no kernels decorator. The one trap, this repository's own
    `kernels/` folder shadowing PyPI's when a clone's root is on sys.path, is handled in
    `kernels/__init__.py`.

Nothing here imports a model family: it stays importable with any transformers version, and the
rest of the package asks it instead of checking versions itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import transformers

#: Every name transformers has used for the cache argument, newest first.
CACHE_ARG_NAMES: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")

#: kwargs that only paged attention (continuous batching) or packed, padding-free batches pass to an
#: attention function: the hybrid's per-sequence recurrent state cannot follow either.
_PAGED_OR_PACKED_KWARGS = ("block_table", "cu_seq_lens_q", "cu_seq_lens_k", "paged_attention_cache")

TRANSFORMERS_VERSION: str = transformers.__version__


@functools.cache
def _cache_arg_of(fn: Callable) -> str | None:
    try:
        params = inspect.signature(fn).parameters  # follows __wrapped__ (deprecate_kwarg, wraps)
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARG_NAMES if name in params), None)


def cache_arg_name(fn_or_module: Any = None) -> str:
    """The keyword under which `fn_or_module` (a model/attention class or instance, or a forward
    function) takes its cache, read from its signature. Without an argument: the installed
    transformers' name, read from `LlamaForCausalLM.forward`."""
    if fn_or_module is None:
        from transformers import LlamaForCausalLM

        fn_or_module = LlamaForCausalLM
    fn = getattr(fn_or_module, "forward", fn_or_module)
    fn = getattr(fn, "__func__", fn)  # a bound method: its function (cached by identity)
    name = _cache_arg_of(fn)
    if name is None:
        raise RuntimeError(
            f"transformers {TRANSFORMERS_VERSION}: {getattr(fn, '__qualname__', fn)!r} takes no cache argument "
            f"(looked for {CACHE_ARG_NAMES}); hf_hybrid_attn.compat needs the new name added"
        )
    return name


def find_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache object among call kwargs, whatever the installed version calls it (None if absent)."""
    for name in CACHE_ARG_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def has_cache(kwargs: Mapping[str, Any]) -> bool:
    return find_cache(kwargs) is not None


def cache_kwargs(cache: Any, fn_or_module: Any = None) -> dict[str, Any]:
    """`{name: cache}` for calling `fn_or_module` (default: any model of the installed version)."""
    return {cache_arg_name(fn_or_module): cache}


def set_cache(kwargs: dict[str, Any], cache: Any, fn_or_module: Any = None) -> None:
    """Put `cache` into `kwargs` under the name `fn_or_module` expects, dropping other spellings, so
    that no deprecated alias (and no "both names given" error) reaches transformers."""
    name = cache_arg_name(fn_or_module)
    for other in CACHE_ARG_NAMES:
        if other != name:
            kwargs.pop(other, None)
    kwargs[name] = cache


def output_cache(outputs: Any) -> Any:
    """The cache returned in a model output (`.cache` from 5.24, `.past_key_values` before), without
    touching a deprecated property."""
    if dataclasses.is_dataclass(outputs):
        fields = {f.name for f in dataclasses.fields(outputs)}
        for name in CACHE_ARG_NAMES:
            if name in fields:
                return getattr(outputs, name)
        return None
    if isinstance(outputs, Mapping):
        return find_cache(outputs)
    raise TypeError(f"outputs: expected a transformers ModelOutput, got {type(outputs).__name__}")


def plain_mask_window(mask_function: Any) -> tuple[bool, int | None]:
    """Recognise the two mask patterns transformers builds for ordinary causal LMs: plain causal
    (`causal_mask_function`) -> (True, None), and the sliding-window layers' causal mask
    (`sliding_window_causal_mask_function(W)` = and_masks(sliding_window_overlay(W), causal)) ->
    (True, W). Anything else (packed sequences, custom and/or masks, block overlays, a pattern a later
    release adds) -> (False, None): the caller must then build the exact 4-D mask. Same in 5.17-5.25."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True, None

    def cells(fn) -> dict[str, Any]:
        code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
        if code is None or closure is None:
            return {}
        return {name: c.cell_contents for name, c in zip(code.co_freevars, closure)}

    if getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask":
        fns = cells(mask_function).get("mask_functions")
        if (isinstance(fns, tuple) and len(fns) == 2 and fns[1] is mu.causal_mask_function
                and getattr(fns[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask"):
            window = cells(fns[0]).get("sliding_window")
            if isinstance(window, int) and not isinstance(window, bool) and window >= 1:
                return True, window
    return False, None


def is_paged_or_packed(cache: Any, attention_kwargs: Mapping[str, Any]) -> bool:
    """True for a continuous-batching (paged) call or a packed padding-free batch, in any version."""
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        return True
    if attention_kwargs.get("cache") is not None:  # <= 5.23: the paged cache came as an attention kwarg
        return True
    return any(attention_kwargs.get(k) is not None for k in _PAGED_OR_PACKED_KWARGS)
