"""vLLM plugin: serve checkpoints converted by hf_hybrid_attn (`save_pretrained` folders, unchanged).

    pip install hf-hybrid-attn[vllm]
    vllm serve ./smol-hybrid --dtype float32 --max-model-len 4096

Registered through the `vllm.general_plugins` entry point (`register`), which vLLM calls in every
process. For each supported family it registers `Hybrid<Family>ForCausalLM` (the `architectures`
entry that `convert()` writes into config.json) as a subclass of vLLM's in-tree model: the decoder is
vLLM's own, and in each converted layer the softmax `Attention` (and its paged KV cache) is replaced
by `HybridStateLayer`, a vLLM state layer (`MambaBase`, linear-attention backend) whose per-request
state has a fixed size (SPEC §2 "Cache", the `HybridCache` layout):

    fp32 S [H, F', D], z [H, F']          the linear state of every token older than the window
    k, v ring [Hkv, w-1, D]               the last w-1 raw keys/values, position p in slot p % (w-1)
    sink k, v [Hkv, num_sinks, D]         the first num_sinks keys/values (`sinks_only` mode)

phi_k is not kept (recomputed for the key leaving the window). Layers left unconverted
(`HybridConfig.layers`) keep vLLM's paged attention. The computation is `HybridMixer`'s, the module
`generate()` runs: a prefill chunk of a request goes through `HybridMixer.forward` with the request's
state as its cache (the chunked kernels on CPU, Triton on CUDA; long chunks in segments), and the
decode tokens of a step go through it as one batch on the ring (`kernels.decode.hybrid_decode_torch`
on CPU, the fused Triton decode kernel on CUDA). Mixed prefill/decode batches and chunked prefill
work; the state is overwritten, never read, when a request starts.

Component modes: `--hf-overrides '{"hybrid": {"component_mode": "swa_only"}}'` at start (merged
into the checkpoint's `hybrid` dict, the other fields stay), or `set_component_mode(llm, mode)` on a
running offline `LLM`.
"""

from __future__ import annotations

import json
import logging
import os
from math import prod

import torch
import torch.nn as nn

from ..config import COMPONENT_MODES, HybridConfig, teacher_windows
from ..families import FAMILIES
from ..kernels import KERNEL_MODES
from ..kernels.decode import DecodeCache, fold_into_state
from ..kernels.dispatch import resolve_backend
from ..layers import HybridMixer

logger = logging.getLogger(__name__)

#: base model_type -> (vLLM module, in-tree causal-LM class); the registered architecture is the one
#: `convert()` writes: Hybrid<Family>ForCausalLM (Family = the transformers config class name less "Config")
VLLM_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "mistral": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "qwen2": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
    "gemma3_text": ("vllm.model_executor.models.gemma3", "Gemma3ForCausalLM"),
}


def architecture_name(base_type: str) -> str:
    """The `architectures` entry of a converted checkpoint of `base_type` (as modeling.convert names it)."""
    cfg_name = FAMILIES[base_type][1]
    return f"Hybrid{cfg_name[: -len('Config')]}ForCausalLM"


ARCHITECTURES: dict[str, str] = {architecture_name(t): t for t in VLLM_FAMILIES}
_MODEL_CLASSES: dict[str, type] = {}


# -- checking a checkpoint's config before vLLM builds anything ---------------------------------------
def check_checkpoint_config(config_dict: dict, source: str = "config.json") -> None:
    """Refuse, with one clear error, a converted config that this plugin cannot serve: a family it has
    no vLLM model for, or an invalid `hybrid` entry (e.g. an unknown feature map). Plain configs
    (no `hybrid_` model type and no `hybrid` entry) pass: they are not ours."""
    model_type = str(config_dict.get("model_type", ""))
    archs = config_dict.get("architectures") or []
    ours = model_type.startswith("hybrid_") or "hybrid" in config_dict or any(
        str(a).startswith("Hybrid") and str(a).endswith("ForCausalLM") for a in archs)
    if not ours:
        return
    base = model_type[len("hybrid_"):] if model_type.startswith("hybrid_") else model_type
    if base not in VLLM_FAMILIES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is an hf_hybrid_attn checkpoint of a family the vLLM plugin does not "
            f"serve; expected one of {sorted('hybrid_' + t for t in VLLM_FAMILIES)}"
        )
    expected = architecture_name(base)
    if archs and list(archs) != [expected]:
        raise ValueError(f"{source}: architectures {archs!r} do not match model_type {model_type!r}; expected "
                         f"[{expected!r}] (as hf_hybrid_attn.convert writes it)")
    hybrid = config_dict.get("hybrid")
    if not isinstance(hybrid, dict):
        raise ValueError(f"{source}: a {model_type!r} checkpoint needs a `hybrid` dict (the HybridConfig), got "
                         f"{type(hybrid).__name__}")
    try:
        HybridConfig.from_dict(hybrid)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid `hybrid` entry: {e}") from None


def _local_config_dict(model: str) -> dict | None:
    path = os.path.join(str(model), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def merged_hybrid_config(hf_config) -> HybridConfig:
    """The served HybridConfig: the checkpoint's `hybrid` dict with `--hf-overrides '{"hybrid": {...}}'`
    merged in (vLLM replaces a dict-valued entry whole; the fields not named must stay)."""
    current = dict(getattr(hf_config, "hybrid", None) or {})
    original = dict(getattr(hf_config, "_hybrid_checkpoint", None) or {})
    merged = {**original, **current}
    try:
        return HybridConfig.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hybrid (config.json merged with --hf-overrides): {e}") from None


def _register_config_parser() -> None:
    from vllm.transformers_utils.config import HFConfigParser, register_config_parser

    if getattr(HFConfigParser, "_hf_hybrid_attn", False):
        return

    class HybridAwareHFConfigParser(HFConfigParser):
        """vLLM's HF config parser, checking converted configs first (a clear error before any
        engine starts) and keeping the checkpoint's `hybrid` dict for the override merge."""

        _hf_hybrid_attn = True

        def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
            d = _local_config_dict(model)
            if d is not None:
                check_checkpoint_config(d, f"{model}/config.json")
            config_dict, config = super().parse(model, trust_remote_code, revision=revision,
                                                code_revision=code_revision, **kwargs)
            if isinstance(getattr(config, "hybrid", None), dict):
                config._hybrid_checkpoint = dict(config.hybrid)
            return config_dict, config

    register_config_parser("hf")(HybridAwareHFConfigParser)


class HybridServingConfig:
    """vLLM's per-architecture config hook (MODELS_CONFIG_MAP) for the hybrid architectures."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        hf_config = model_config.hf_config
        hcfg = merged_hybrid_config(hf_config)
        hf_config.hybrid = hcfg.to_dict()
        if hasattr(hf_config, "_hybrid_checkpoint"):
            hf_config._hybrid_checkpoint = dict(hf_config.hybrid)
        windows = teacher_windows(hf_config)
        layers = hcfg.layer_indices(hf_config.num_hidden_layers, windows)
        w = max(min(hcfg.window, tw) if tw is not None else hcfg.window for tw in (windows[i] for i in layers))
        if model_config.max_model_len < w:
            raise ValueError(
                f"max_model_len: {model_config.max_model_len} is below the hybrid softmax window w={w}; expected "
                f"max_model_len >= {w} (with a shorter context the linear branch never runs)"
            )
        if not model_config.enforce_eager:
            logger.info("hf_hybrid_attn: hybrid models run eagerly (enforce_eager=True): the state layer "
                        "dispatches per request on the host")
            model_config.enforce_eager = True

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        from vllm.model_executor.models.config import MambaModelConfig

        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            logger.info("hf_hybrid_attn: prefix caching is turned off (a recurrent state cannot be shared "
                        "between requests by prefix)")
            cache_config.enable_prefix_caching = False
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative_config: speculative decoding is not supported for hybrid models (the "
                             "recurrent linear-attention state cannot be rolled back); remove it")
        if vllm_config.parallel_config.tensor_parallel_size != 1 or vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise ValueError("tensor_parallel_size / pipeline_parallel_size: the hybrid plugin serves on one device; "
                             "expected 1 and 1")
        MambaModelConfig.verify_and_update_config(vllm_config)  # mamba_block_size = max_model_len: one page a request


# -- the state layer ---------------------------------------------------------------------------------
class _RequestState:
    """One request's state rows as the `HybridCacheLayer` interface `HybridMixer.forward` uses (the
    general path: a prefill chunk, or a token in a mode without a decode kernel)."""

    def __init__(self, layer: HybridStateLayer, slot: int, context: int, new: int):
        self.layer, self.slot, self.context, self.new = layer, slot, context, new

    def ensure_ring(self, *args, **kwargs) -> bool:
        return False

    def window_tokens(self):
        ctx, W1 = self.context, self.layer.ring_len
        n = min(ctx, W1)
        if n == 0:
            return None
        kr, vr = self.layer.kv_cache[2], self.layer.kv_cache[3]
        idx = torch.arange(ctx - n, ctx, device=kr.device) % W1
        k = kr[self.slot].index_select(1, idx)[None]
        v = vr[self.slot].index_select(1, idx)[None]
        return k, v, torch.ones(1, n, dtype=torch.bool, device=kr.device)

    def linear_state(self):
        if self.context == 0:
            return None
        S, z = self.layer.kv_cache[0], self.layer.kv_cache[1]
        return S[self.slot : self.slot + 1], z[self.slot : self.slot + 1]

    @property
    def sinks(self):
        n = min(self.context, self.layer.num_sinks)
        if n == 0:
            return None
        sk, sv = self.layer.kv_cache[4], self.layer.kv_cache[5]
        dev = sk.device
        return (sk[self.slot : self.slot + 1, :, :n], sv[self.slot : self.slot + 1, :, :n],
                torch.arange(n, device=dev)[None], torch.ones(1, n, dtype=torch.bool, device=dev))

    def seen_tokens_before(self, query_length: int) -> int:
        return self.context

    @torch.no_grad()
    def advance(self, k, v, phi_k, key_valid, window, num_sinks, inplace=True, state=None) -> None:
        L, slot, ctx, new = self.layer, self.slot, self.context, self.new
        S, z, kr, vr, sk, sv = L.kv_cache
        Tk, end, W1 = k.shape[2], ctx + new, L.ring_len
        keep = min(W1, Tk)
        fold = Tk - keep
        if state is None:
            if ctx == 0:
                state = (torch.zeros_like(S[slot : slot + 1]), torch.zeros_like(z[slot : slot + 1]))
            else:
                state = (S[slot : slot + 1].clone(), z[slot : slot + 1].clone())
            if fold > 0:
                state = fold_into_state(state, phi_k[:, :, :fold], v[:, :, :fold], key_valid[:, :fold])
        S[slot].copy_(state[0][0])
        z[slot].copy_(state[1][0])
        if ctx == 0:  # a new request: whatever the rows held belongs to an earlier one
            kr[slot].zero_()
            vr[slot].zero_()
            sk[slot].zero_()
            sv[slot].zero_()
        if keep:
            pos = torch.arange(end - keep, end, device=kr.device) % W1
            kr[slot].index_copy_(1, pos, k[0, :, Tk - keep :].to(kr.dtype))
            vr[slot].index_copy_(1, pos, v[0, :, Tk - keep :].to(vr.dtype))
        if ctx < L.num_sinks:  # the first num_sinks tokens of the request
            first, last = ctx, min(end, L.num_sinks)
            src = torch.arange(first, last, device=k.device) - ctx + (Tk - new)
            dst = torch.arange(first, last, device=k.device)
            sk[slot].index_copy_(1, dst, k[0].index_select(1, src).to(sk.dtype))
            sv[slot].index_copy_(1, dst, v[0].index_select(1, src).to(sv.dtype))


class _DecodeBatch:
    """The decode tokens of one step (one new token per request, each at its own position) as a
    ring cache for `HybridMixer`'s decode step. The requests' rows are used as they lie: the ring
    keeps each request's slot order (position p in slot p % (w-1)) and the cache carries one position
    per row, so that the step evicts and writes each row's own slot. When the requests' state rows
    are consecutive (as vLLM usually hands them out) the step reads and updates them in place
    through views; otherwise it works on copies of the rows, written back after the step."""

    def __init__(self, layer: HybridStateLayer, slots: list[int], seq_lens: list[int], device):
        self.layer = layer
        S, z, kr, vr, _, _ = layer.kv_cache
        W1, B = layer.ring_len, len(slots)
        self.positions = torch.tensor(seq_lens, dtype=torch.int64, device=device) - 1  # of the new tokens
        fresh = [r for r, n in zip(slots, seq_lens) if n == 1]  # one-token prompts: rows of an earlier request
        if fresh:
            for t in layer.kv_cache:
                t[fresh] = 0
        # a ring narrower than the allocated slots is a strided view: the Triton step needs it contiguous
        views_ok = W1 in (0, layer.slots) or resolve_backend(layer.mixer.backend, torch.device(device)) != "triton"
        self.inplace = views_ok and slots == list(range(slots[0], slots[0] + B))
        self.slots = torch.tensor(slots, dtype=torch.int64, device=device)
        if self.inplace:
            rows = [t.narrow(0, slots[0], B) for t in (S, z, kr, vr)]
            rows[2:] = [t.narrow(2, 0, W1) for t in rows[2:]]
        else:
            rows = [t.index_select(0, self.slots) for t in (S, z, kr, vr)]
            rows[2:] = [t[:, :, :W1].contiguous() for t in rows[2:]]
        # slot j holds a key iff some position < T maps to it: j < T (every slot once T >= w-1)
        valid = torch.arange(W1, device=device)[None] < self.positions[:, None]
        self.ring = DecodeCache(k_win=rows[2], v_win=rows[3], valid=valid, S=rows[0], z=rows[1],
                                position=self.positions.clone())

    def ensure_ring(self, *args, **kwargs) -> bool:
        return True

    def decode_cache(self) -> DecodeCache:
        return self.ring

    @torch.no_grad()
    def after_decode(self, k, v, key_valid, num_sinks) -> None:
        L = self.layer
        S, z, kr, vr, sk, sv = L.kv_cache
        if not self.inplace:  # the step updated copies of the rows: the state and the new key go back
            S.index_copy_(0, self.slots, self.ring.S)
            z.index_copy_(0, self.slots, self.ring.z)
            if L.ring_len:
                dst = self.positions % L.ring_len
                kr[self.slots, :, dst] = k[:, :, 0].to(kr.dtype)
                vr[self.slots, :, dst] = v[:, :, 0].to(vr.dtype)
        early = self.positions < L.num_sinks
        if bool(early.any()):
            sel = early.nonzero()[:, 0]
            sk[self.slots[sel], :, self.positions[sel]] = k[sel, :, 0].to(sk.dtype)
            sv[self.slots[sel], :, self.positions[sel]] = v[sel, :, 0].to(sv.dtype)


def _state_layer_base():
    from vllm.model_executor.layers.mamba.abstract import MambaBase

    return MambaBase


class HybridStateLayer(nn.Module):
    """Replaces vLLM's `Attention` in a converted layer: same call (q [T, H*D], k/v [T, Hkv*D] after
    RoPE -> [T, H*D]), a fixed-size per-request state instead of a paged KV cache.

    The mixer (feature maps, window logits, mode) stays at `self_attn.hybrid`, where the checkpoint
    keeps its weights; this layer only refers to it."""

    def __init__(self, mixer: HybridMixer, *, num_kv_heads: int, head_dim: int, scaling: float, slots: int,
                 prefix: str, vllm_config):
        super().__init__()
        self._mixer = (mixer,)  # a tuple: not a submodule (no second copy of the weights' names)
        self.num_heads, self.num_kv_heads, self.head_dim = mixer.num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        self.slots = slots  # ring slots allocated (>= this layer's w - 1; >= 1)
        self.num_sinks = mixer.num_sinks
        self.prefix = self.layer_name = prefix
        self.model_dtype = vllm_config.model_config.dtype
        self.kv_cache = tuple(torch.tensor([]) for _ in range(6))
        ctx = vllm_config.compilation_config.static_forward_context
        ctx.pop(prefix, None)  # the softmax Attention (and its paged KV cache) this layer replaces
        ctx[prefix] = self

    @property
    def mixer(self) -> HybridMixer:
        return self._mixer[0]

    @property
    def window(self) -> int:
        return self.mixer.window

    @property
    def ring_len(self) -> int:
        """Ring slots this layer uses (w - 1; position p in slot p % (w-1)); the state rows allocate
        `slots` (the largest w - 1 over the converted layers), the rest stay unused."""
        return self.mixer.window - 1

    # -- vLLM's state-layer interface (MambaBase) ---------------------------------------------------
    @staticmethod
    def state_shapes(num_heads, num_kv_heads, head_dim, phi_dim, slots, num_sinks):
        return ((num_heads, phi_dim, head_dim), (num_heads, phi_dim), (num_kv_heads, slots, head_dim),
                (num_kv_heads, slots, head_dim), (num_kv_heads, num_sinks, head_dim),
                (num_kv_heads, num_sinks, head_dim))

    @staticmethod
    def state_dtypes(model_dtype):
        return (torch.float32, torch.float32, model_dtype, model_dtype, model_dtype, model_dtype)

    def get_state_shape(self):
        return self.state_shapes(self.num_heads, self.num_kv_heads, self.head_dim, self.mixer.phi_dim, self.slots,
                                 self.num_sinks)

    def get_state_dtype(self):
        return self.state_dtypes(self.model_dtype)

    def state_bytes(self) -> int:
        """Bytes of one request's state in this layer."""
        return sum(prod(s) * torch.empty((), dtype=d).element_size()
                   for s, d in zip(self.get_state_shape(), self.get_state_dtype()))

    # -- computation --------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from vllm.forward_context import get_forward_context

        md = get_forward_context().attn_metadata
        if isinstance(md, dict):
            md = md.get(self.prefix)
        T = q.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        out = q.new_zeros(T, H * D)
        if md is None:  # a profiling / dummy run: no request, no state
            return out
        q3, k3, v3 = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, -1)
        mixer, mode = self.mixer, self.mixer.mode
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        slots = md.state_indices_tensor
        nd = md.num_decodes
        n_req = nd + md.num_prefills
        batched = (nd > 0 and mode in KERNEL_MODES and not (mode == "hybrid" and mixer.swa_drop is not None)
                   and resolve_backend(mixer.backend, q.device) != "reference")
        first = 0
        with torch.no_grad():
            if batched:  # the decode tokens of this step: one batch on the ring
                s, e = qsl[0], qsl[nd]
                batch = _DecodeBatch(self, slots[:nd].tolist(), seq_lens[:nd], q.device)
                qb = q3[s:e][:, :, None]  # [B, H, 1, D]
                kb, vb = k3[s:e][:, :, None], v3[s:e][:, :, None]
                valid = torch.ones(nd, 1, dtype=torch.bool, device=q.device)
                y = mixer(qb, kb, vb, valid, self.scaling, cache_layer=batch)
                out[s:e] = y[:, :, 0].reshape(e - s, H * D).to(out.dtype)
                first = nd
            for r in range(first, n_req):  # prefill chunks (and decodes in the other modes): per request
                s, e = qsl[r], qsl[r + 1]
                if e == s:
                    continue
                new = e - s
                ctx = seq_lens[r] - new
                state = _RequestState(self, int(slots[r]), ctx, new)
                qr = q3[s:e].transpose(0, 1)[None]
                kr, vr = k3[s:e].transpose(0, 1)[None], v3[s:e].transpose(0, 1)[None]
                valid = torch.ones(1, new, dtype=torch.bool, device=q.device)
                y = mixer(qr, kr, vr, valid, self.scaling, cache_layer=state)
                out[s:e] = y[0].transpose(0, 1).reshape(new, H * D).to(out.dtype)
        return out


def _make_state_layer_class():
    """HybridStateLayer with vLLM's MambaBase mixed in (imported only when vLLM is there)."""
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    base = _state_layer_base()

    class VllmHybridStateLayer(HybridStateLayer, base):
        @property
        def mamba_type(self):
            return MambaAttentionBackendEnum.LINEAR

    VllmHybridStateLayer.__name__ = VllmHybridStateLayer.__qualname__ = "VllmHybridStateLayer"
    return VllmHybridStateLayer


# -- the model classes -------------------------------------------------------------------------------
def _layout(hf_config):
    """(HybridConfig, converted layer indices, per-layer window, ring slots shared by every converted layer)."""
    hcfg = merged_hybrid_config(hf_config)
    windows = teacher_windows(hf_config)
    layers = hcfg.layer_indices(hf_config.num_hidden_layers, windows)
    eff = {i: (hcfg.window if windows[i] is None else min(hcfg.window, windows[i])) for i in layers}
    slots = max(1, max(eff.values()) - 1)
    return hcfg, layers, windows, slots


def _phi_dim(hcfg: HybridConfig, head_dim: int) -> int:
    from ..feature_maps import FEATURE_MAPS

    return FEATURE_MAPS[hcfg.feature_map].output_dim(head_dim, hcfg.feature_dim)


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _install_state_layers(model: nn.Module, vllm_config, layer_cls) -> None:
    hf_config = vllm_config.model_config.hf_config
    hcfg, layers, windows, slots = _layout(hf_config)
    for idx in layers:
        attn = model.model.layers[idx].self_attn
        mixer = HybridMixer(hcfg, hf_config.num_attention_heads, hf_config.num_key_value_heads, attn.head_dim,
                            windows[idx])
        attn.hybrid = mixer
        prefix = attn.attn.layer_name
        attn.attn = layer_cls(mixer, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, scaling=attn.scaling,
                              slots=slots, prefix=prefix, vllm_config=vllm_config)


def _make_model_class(base_type: str) -> type:
    import importlib

    from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

    mod_name, cls_name = VLLM_FAMILIES[base_type]
    base = getattr(importlib.import_module(mod_name), cls_name)
    layer_cls = _make_state_layer_class()

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        _install_state_layers(self, vllm_config, layer_cls)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        hf_config = vllm_config.model_config.hf_config
        hcfg, _, _, slots = _layout(hf_config)
        D = _head_dim(hf_config)
        return HybridStateLayer.state_shapes(hf_config.num_attention_heads, hf_config.num_key_value_heads, D,
                                             _phi_dim(hcfg, D), slots, hcfg.num_sinks)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        return HybridStateLayer.state_dtypes(vllm_config.model_config.dtype)

    @classmethod
    def get_mamba_state_copy_func(cls):
        raise NotImplementedError("hybrid models do not support prefix caching of their recurrent state")

    name = architecture_name(base_type)
    cls = type(name, (base, IsHybrid, HasInnerState), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name,
        "get_mamba_state_shape_from_config": get_mamba_state_shape_from_config,
        "get_mamba_state_dtype_from_config": get_mamba_state_dtype_from_config,
        "get_mamba_state_copy_func": get_mamba_state_copy_func,
    })
    return cls


def model_class(architecture: str) -> type:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: expected one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    if architecture not in _MODEL_CLASSES:
        _MODEL_CLASSES[architecture] = _make_model_class(ARCHITECTURES[architecture])
    return _MODEL_CLASSES[architecture]


def __getattr__(name: str):  # the lazy "module:Class" registration resolves the classes here
    if name in ARCHITECTURES:
        return model_class(name)
    raise AttributeError(name)


def _patch_is_hybrid() -> None:
    """vLLM decides `is_hybrid` (paged attention + state layers side by side: block sizes aligned to the
    state page) from the class flag, except that a config whose `layer_types` are all full attention
    counts as not hybrid (Qwen2/3 write layer_types). For our architectures the flag stands."""
    from vllm.config.model import ModelConfig

    prop = ModelConfig.__dict__.get("is_hybrid")
    if prop is None or getattr(prop.fget, "_hf_hybrid_attn", False):
        return
    original = prop.fget

    def is_hybrid(self) -> bool:
        if self.architecture in ARCHITECTURES:
            return bool(self._model_info.is_hybrid)
        return original(self)

    is_hybrid._hf_hybrid_attn = True
    ModelConfig.is_hybrid = property(is_hybrid)


def register() -> None:
    """The `vllm.general_plugins` entry point: registers the hybrid architectures (idempotent)."""
    import transformers  # noqa: F401  (the package registers hybrid_<family> with transformers on its import)
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .. import modeling  # noqa: F401

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")
        MODELS_CONFIG_MAP[arch] = HybridServingConfig
    _register_config_parser()
    _patch_is_hybrid()


# -- run-time component modes on an offline LLM -------------------------------------------------------
def _set_mode_on_model(model, mode: str) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, HybridMixer):
            m.mode = mode
            n += 1
    return n


def set_component_mode(llm, mode: str) -> int:
    """Switch every converted layer of a running offline `vllm.LLM` to `mode` (hybrid, swa_only,
    linear_only, sinks_only, none); requests submitted afterwards run in it. Returns the number of
    layers switched. (The state is kept whatever the mode, as in `generate()`.)"""
    if mode not in COMPONENT_MODES:
        raise ValueError(f"mode: expected one of {COMPONENT_MODES}, got {mode!r}")
    counts = llm.apply_model(lambda model: _set_mode_on_model(model, mode))
    return int(counts[0]) if isinstance(counts, list) else int(counts)


def state_bytes_per_sequence(llm) -> int:
    """Bytes of fixed state one request holds across all converted layers of a running `vllm.LLM`."""

    def count(model):
        return sum(m.state_bytes() for m in model.modules() if isinstance(m, HybridStateLayer))

    out = llm.apply_model(count)
    return int(out[0]) if isinstance(out, list) else int(out)
