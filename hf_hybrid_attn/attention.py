"""The `hybrid_linear_swa` attention function registered with transformers.

transformers calls `hybrid_attention_forward(module, q, k, v, attention_mask, scaling=..., **kw)`
with q [B, H, Tq, D] and k/v [B, Hkv, Tk, D] after RoPE and the cache update. This function
turns the 4-D mask into key validity, finds the layer's cache (captured by a pre-hook, since
transformers does not pass the cache to attention functions), and hands over to
`module.hybrid` (a `HybridMixer`). Layers that were not converted run exact softmax (sdpa).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import compat
from .cache import HybridCacheLayer

ATTN_IMPLEMENTATION = "hybrid_linear_swa"


def mask_to_key_valid(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device,
                      sliding_window: int | None = None) -> torch.Tensor:
    """Key validity [B, Tk] from transformers' 4-D mask (bool: True = attend; or additive float).

    The hybrid layer supports causal attention with padding only, plus the teacher's own sliding
    window on layers that had one (`sliding_window`: the mask then also hides keys j <= i - window,
    as transformers builds it for that layer type); any other mask (e.g. packed sequences) is
    refused rather than silently mis-handled."""
    if attention_mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask: expected the 4-D mask built by transformers, got shape {tuple(attention_mask.shape)}"
        )
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if allowed.shape[-1] > kv_len:  # mask built for a longer (full-history) layer: keep our span
        allowed = allowed[..., -kv_len:]
    if allowed.shape[-1] != kv_len or allowed.shape[-2] != q_len:
        raise ValueError(
            f"attention_mask: expected shape [B, 1, {q_len}, >= {kv_len}], got {tuple(attention_mask.shape)}"
        )
    allowed = allowed[:, 0].expand(batch, q_len, kv_len)
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)
    kpos = torch.arange(kv_len, device=device)
    causal = qpos[:, None] >= kpos[None, :]
    if sliding_window is None:
        key_valid = allowed[:, -1, :]  # the last query sees every earlier key: its row is the padding
    else:
        causal = causal & (qpos[:, None] - kpos[None, :] < sliding_window)
        seen = causal.any(0)  # keys inside some query's band: their validity is in the mask
        if not bool(seen.all()):
            raise ValueError(
                f"attention_mask: the teacher's sliding window ({sliding_window}) hides {int((~seen).sum())} of the "
                f"{kv_len} keys from every query, so their padding cannot be read from the mask; use the default "
                "HybridCache (generate() creates it) rather than a full-history cache on this model"
            )
        key_valid = (allowed & causal[None]).any(1)
    expected = causal[None] & key_valid[:, None, :]
    # A row that should see nothing (a left-padded query) may come back all-True from older
    # transformers' "torch fix" of fully masked rows; every other row must be exactly causal+padding.
    empty_row = ~expected.any(-1)
    row_ok = (allowed == expected).all(-1) | (empty_row & allowed.all(-1))
    if not bool(row_ok.all()):
        raise ValueError(
            "attention_mask: attn_implementation='hybrid_linear_swa' supports causal masks with padding "
            "only (the linear state cannot follow arbitrary masks such as packed sequences); pad the batch "
            "instead of packing it"
        )
    return key_valid


def hybrid_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask interface for `hybrid_linear_swa`: only key padding, never Tq x Tk.

    For the plain causal and sliding-window patterns it returns the 2-D key padding of this call's
    key span, [B, kv_length] bool (True = a real token), or None without a padding mask; the
    hybrid layer needs nothing else (its window and the teacher's are known per layer). Any other
    pattern (packed sequences, custom masks) gets the exact 4-D mask of `sdpa_mask`, which the
    attention function checks and refuses unless it is causal with padding."""
    recognised, _ = compat.plain_mask_window(mask_function)
    if not recognised:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    padding = attention_mask.to(torch.bool)
    end = kv_offset + kv_length
    if padding.shape[-1] == kv_length:
        # this span's key padding (at kv_offset 0 the whole mask is the span; later it is a mask
        # this function already made: generate() prepares the mask once per step for a
        # compileable cache, and the model's forward passes it through here again)
        return padding.expand(batch_size, kv_length)
    if torch.compiler.is_compiling() and kv_offset == 0:
        # a compileable HybridCache reports no offset inside a compiled step (no per-step int may
        # enter the graph); a 2-D padding mask ends at the current token, so the span is its tail
        return padding[:, -kv_length:].expand(batch_size, kv_length)
    if padding.shape[-1] < end:  # as transformers' prepare_padding_mask: positions past the mask are padding
        padding = torch.nn.functional.pad(padding, (0, end - padding.shape[-1]))
    # contiguous: a decode step's slice of the growing mask would otherwise carry its stride, and a
    # compiled step would be recompiled for every length (transformers < 5.24 passes it as it is)
    return padding[:, kv_offset:end].expand(batch_size, kv_length).contiguous()


def _key_valid_from_padding(padding: torch.Tensor, batch: int, kv_len: int) -> torch.Tensor:
    """This layer's key validity from `hybrid_mask`'s key padding (built for the longest span of
    this layer kind: every span ends at the current token, so ours is its tail)."""
    if padding.shape[0] != batch or padding.shape[-1] < kv_len:
        raise ValueError(
            f"attention_mask: expected key padding of shape [{batch}, >= {kv_len}], got {tuple(padding.shape)}"
        )
    return padding[:, padding.shape[-1] - kv_len :].to(torch.bool)


def _softmax_mask(padding: torch.Tensor, q_len: int, kv_len: int, sliding_window: int | None):
    """The exact 4-D mask (causal, padding, the teacher's window) for a layer left unconverted, which
    runs sdpa on `hybrid_mask`'s key padding: None where sdpa's own causal flag is exact."""
    key_valid = _key_valid_from_padding(padding, padding.shape[0], kv_len)
    if (bool(key_valid.all()) and (q_len == kv_len or q_len == 1)
            and (sliding_window is None or kv_len <= sliding_window)):
        return None
    qpos = torch.arange(kv_len - q_len, kv_len, device=padding.device)[:, None]
    kpos = torch.arange(kv_len, device=padding.device)[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed = allowed & (kpos > qpos - sliding_window)
    return (allowed[None] & key_valid[:, None, :])[:, None]


def _check_inputs(module, query, key, value) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("hybrid_linear_swa: query/key/value must be 4-D [batch, heads, seq, head_dim]")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"hybrid_linear_swa: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"hybrid_linear_swa: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )


def get_cache_layer(module):
    cache = getattr(module, "_hybrid_past_key_values", None)
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None:  # e.g. an EncoderDecoderCache or an unknown object
        layers = getattr(getattr(cache, "self_attention_cache", None), "layers", None)
    if layers is None or module.layer_idx >= len(layers):
        return None
    return layers[module.layer_idx]


def hybrid_forward(module, q, k, v, key_valid, mode: str | None = None, return_stats: bool = False, cache_layer=None):
    """Hybrid output [B, H, Tq, D] of a converted attention module (no cache by default)."""
    return module.hybrid(q, k, v, key_valid, module.scaling, cache_layer=cache_layer, mode=mode, return_stats=return_stats)


def hybrid_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    if compat.is_paged_or_packed(getattr(module, "_hybrid_past_key_values", None), kwargs):
        raise ValueError(
            "hybrid_linear_swa does not support paged attention / continuous batching or packed, padding-free "
            "batches (a paged cache or cu_seq_lens/block_table was passed): its recurrent state is per sequence; "
            "use model.generate() with the default HybridCache, and pad batches instead of packing them"
        )
    hybrid = getattr(module, "hybrid", None)
    if hybrid is None:  # a layer left unconverted: exact softmax
        if attention_mask is not None and attention_mask.dim() == 2:  # hybrid_mask's key padding
            attention_mask = _softmax_mask(attention_mask, query.shape[2], key.shape[2], kwargs.get("sliding_window"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _check_inputs(module, query, key, value)
    scaling = module.scaling if scaling is None else scaling
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    if Tk < Tq:
        raise ValueError(f"hybrid_linear_swa: key length {Tk} is shorter than query length {Tq}")
    teacher_window = _active_mixer_attr(hybrid, "teacher_window")
    passed = kwargs.get("sliding_window", teacher_window)  # Mistral, Qwen2/3, Gemma-3 pass it; Llama does not
    if passed != teacher_window:
        raise ValueError(
            f"hybrid_linear_swa: layer {module.layer_idx} was converted with the teacher's sliding window "
            f"{teacher_window}, but transformers passed sliding_window={passed}; the config and the converted "
            "layers disagree (was config.sliding_window or layer_types edited after conversion?)"
        )
    if attention_mask is not None and attention_mask.dim() == 2:  # hybrid_mask's key padding: O(B * Tk)
        key_valid = _key_valid_from_padding(attention_mask, B, Tk)
    else:  # None, or a 4-D mask (a user's, or a pattern hybrid_mask does not recognise): checked
        key_valid = mask_to_key_valid(attention_mask, B, Tq, Tk, query.device, teacher_window)

    hook = _active_mixer_attr(hybrid, "transfer_hook")
    if hook is not None:
        return hook(module, query, key, value, key_valid, scaling), None

    layer = get_cache_layer(module)
    cache_layer = None
    if isinstance(layer, HybridCacheLayer):
        cache_layer = layer
    elif layer is not None:
        _check_full_history_layer(layer, Tk)
    y = module.hybrid(query, key, value, key_valid, scaling, cache_layer=cache_layer)
    return y.transpose(1, 2).contiguous(), None


def _active_mixer_attr(hybrid, name):
    """Read a run-time attribute from the mixer that will actually run (PEFT may wrap it)."""
    if hasattr(hybrid, "active_adapters") and hasattr(hybrid, "modules_to_save"):  # ModulesToSaveWrapper
        adapters = hybrid.active_adapters
        if adapters and not getattr(hybrid, "disable_adapters", False) and adapters[0] in hybrid.modules_to_save:
            return getattr(hybrid.modules_to_save[adapters[0]], name)
        return getattr(hybrid.original_module, name)
    return getattr(hybrid, name)


def _check_full_history_layer(layer, Tk: int) -> None:
    """With a cache layer that is not ours, k/v must be the whole history (exact full path). A
    sliding-window layer (the teacher's DynamicCache on a sliding layer) qualifies only while it has
    returned everything it has seen, i.e. on its first call."""
    if type(layer).__name__ in ("StaticLayer", "StaticSlidingWindowLayer"):
        raise ValueError(
            f"hybrid_linear_swa: cache layer {type(layer).__name__} is not supported: the hybrid layers keep a "
            "HybridCache (generate() creates it; cache_implementation='static' or HybridCache(config, "
            "compileable=True) gives the compileable one) or a DynamicCache"
        )
    seen = layer.get_seq_length()
    if seen and seen != Tk:
        raise ValueError(
            f"hybrid_linear_swa: cache layer {type(layer).__name__} has seen {seen} tokens but returned {Tk} keys: it "
            "does not keep the full history (a sliding-window layer?); use the default HybridCache (generate() and "
            "a forward with use_cache create it) or a DynamicCache without sliding windows"
        )


def _capture_cache_pre_hook(module, args, kwargs):
    module._hybrid_past_key_values = compat.find_cache(kwargs)
    return None


def _release_cache_hook(module, args, kwargs, output):
    module._hybrid_past_key_values = None
    return None


def install_cache_hooks(attn_module: torch.nn.Module) -> None:
    """Let the attention function see the cache object (transformers does not pass it)."""
    if getattr(attn_module, "_hybrid_hooks_installed", False):
        return
    attn_module.register_forward_pre_hook(_capture_cache_pre_hook, with_kwargs=True)
    attn_module.register_forward_hook(_release_cache_hook, with_kwargs=True, always_call=True)
    attn_module._hybrid_hooks_installed = True
    attn_module._hybrid_past_key_values = None
