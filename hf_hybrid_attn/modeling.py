"""Hybrid config/model classes per base family, `convert()`, and run-time component modes.

For each supported family (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text) a class factory makes
`Hybrid<Family>Config(<Family>Config)` (model_type `hybrid_<family>`) and
`Hybrid<Family>ForCausalLM(<Family>ForCausalLM)`, registered with the Auto classes. The model class
attaches `self_attn.hybrid` to the converted layers in `__init__`, so checkpoints load with no
missing or unexpected keys, and the config defaults `attn_implementation` to `hybrid_linear_swa`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from . import compat
from .attention import ATTN_IMPLEMENTATION, install_cache_hooks
from .cache import HybridCache
from .config import COMPONENT_MODES, HybridConfig, teacher_windows
from .families import FAMILIES
from .layers import HybridMixer

LOADER_MODULE = "hybrid_loader"
LOADER_SHIM = '''"""Loader shim written by hf_hybrid_attn: this checkpoint is a hybrid linear-attention model."""
import importlib

try:  # importlib, so that transformers' static import check leaves the message to us
    _pkg = importlib.import_module("hf_hybrid_attn")  # registers hybrid_linear_swa and hybrid_{base}
except ImportError as e:
    raise ImportError(
        "This checkpoint is a hf_hybrid_attn hybrid model (model_type 'hybrid_{base}'). "
        "Install the package with `pip install hf-hybrid-attn`, then `import hf_hybrid_attn` before "
        "AutoModelForCausalLM.from_pretrained(...)."
    ) from e
_modeling = importlib.import_module("hf_hybrid_attn.modeling")
{cfg} = _modeling.{cfg}
{lm} = _modeling.{lm}
'''

HYBRID_CONFIGS: dict[str, type] = {}
HYBRID_MODELS: dict[str, type] = {}


def _base_model_type(model_type: str) -> str:
    return model_type[len("hybrid_") :] if model_type.startswith("hybrid_") else model_type


def hybrid_config_of(config) -> HybridConfig:
    d = getattr(config, "hybrid", None)
    if d is None:
        raise ValueError(f"config of type {type(config).__name__} has no `hybrid` entry: is this a converted model?")
    return d if isinstance(d, HybridConfig) else HybridConfig.from_dict(d)


class HybridConfigMixin:
    """Makes converted checkpoints load as hybrid by default; sdpa still gives the teacher's view."""

    def __post_init__(self, **kwargs):
        if kwargs.get("attn_implementation") is None:
            kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
        super().__post_init__(**kwargs)
        if getattr(self, "hybrid", None) is None:
            self.hybrid = HybridConfig().to_dict()
        elif isinstance(self.hybrid, HybridConfig):
            self.hybrid = self.hybrid.to_dict()
        HybridConfig.from_dict(self.hybrid)  # validate (and check the format version) on load
        # The teacher's own attention layout (sliding_window, use_sliding_window, layer_types) is kept
        # as is: the `sdpa` view of a converted checkpoint is exactly the teacher, and a converted
        # sliding layer caps its softmax window at the teacher's (HybridMixer.teacher_window, SPEC §2).


class HybridModelMixin:
    """Attaches `self_attn.hybrid` to converted layers, and gives generate() a HybridCache."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        hcfg = hybrid_config_of(config)
        windows = teacher_windows(config)
        for idx in hcfg.layer_indices(config.num_hidden_layers, windows):
            attn = self.model.layers[idx].self_attn
            attn.hybrid = HybridMixer(
                hcfg, config.num_attention_heads, config.num_key_value_heads, attn.head_dim, windows[idx]
            )
            install_cache_hooks(attn)

    def initialize_weights(self):
        super().initialize_weights()
        from transformers import initialization as hf_init

        # Missing hybrid parameters (fresh conversion) get the SPEC initialisation; loaded ones are
        # flagged `_is_hf_initialized` and left untouched by the guarded init functions.
        for module in self.modules():
            if isinstance(module, HybridMixer):
                fresh = copy.deepcopy(module).to("cpu" if module.window_logit.device.type == "meta" else module.window_logit.device)
                if fresh.window_logit.device.type == "meta":
                    fresh = fresh.to_empty(device="cpu")
                fresh.reset_parameters()
                fresh_params = dict(fresh.named_parameters())
                for name, p in module.named_parameters():
                    hf_init.copy_(p, fresh_params[name].to(p.device, p.dtype))

    def _hybrid_attention_active(self) -> bool:
        """False in `diagnostics.softmax_view`, where the base softmax attention (and cache) runs."""
        return self.config._attn_implementation == ATTN_IMPLEMENTATION

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (not compat.has_cache(model_kwargs) and generation_config.use_cache is not False
                and self._hybrid_attention_active()):
            impl = generation_config.cache_implementation
            if impl not in (None, "dynamic", "hybrid", "static"):
                raise ValueError(
                    f"cache_implementation={impl!r} is not supported by hybrid models; leave it unset to use "
                    "HybridCache (constant memory per sequence), or pass 'static' for the same cache marked "
                    "compileable (compiled decoding)"
                )
            # "static": the HybridCache is preallocated and fixed-size by construction; marked
            # compileable, generate() compiles the decode step where transformers auto-compiles
            compat.set_cache(model_kwargs, HybridCache(self.config, compileable=impl == "static"), self)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes a tiny `trust_remote_code` loader shim: a user who loads the folder without
        `import hf_hybrid_attn` is told exactly what to install and import (or, with
        trust_remote_code=True and the package installed, it is imported for them)."""
        base_type = _base_model_type(self.config.model_type)
        cfg_name, lm_name = type(self.config).__name__, type(self).__name__
        self.config.auto_map = {
            "AutoConfig": f"{LOADER_MODULE}.{cfg_name}",
            "AutoModelForCausalLM": f"{LOADER_MODULE}.{lm_name}",
        }
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            with open(os.path.join(save_directory, LOADER_MODULE + ".py"), "w") as f:
                f.write(LOADER_SHIM.format(cfg=cfg_name, lm=lm_name, base=base_type))
        return out

    def push_to_hub(self, repo_id: str, *, token=None, revision=None, private=None, commit_message=None,
                    diagnostics=None, card_data=None, training=None, remote_code: bool = False, tags=None,
                    **kwargs):
        """`model.push_to_hub(repo)`: the weights, config, loader shim AND the hybrid model card (recipe,
        diagnostics, how to load) go up in one commit, via `hf_hybrid_attn.hub.push_to_hub`, so the card
        is never replaced by transformers' generic one. Returns huggingface_hub's CommitInfo."""
        import importlib

        try:  # not a relative import: the trust_remote_code export copies modeling code, not the hub tools
            push_to_hub = importlib.import_module("hf_hybrid_attn.hub").push_to_hub
        except ImportError as e:
            raise ImportError("push_to_hub of a hybrid model (with its model card) needs the hf_hybrid_attn "
                              "package: pip install hf-hybrid-attn") from e
        if kwargs.get("safe_serialization", True) is not True:
            raise ValueError("safe_serialization: hybrid checkpoints are pushed as safetensors only; leave it True")
        if kwargs.get("create_pr"):
            raise ValueError("create_pr: pull requests are not supported by hf_hybrid_attn's push; push to a branch "
                             "with revision='my-branch' instead")
        ignored = {"safe_serialization", "create_pr", "use_temp_dir", "commit_description"}
        unknown = sorted(k for k in kwargs if k not in ignored)
        if unknown:
            raise TypeError(f"push_to_hub: unsupported argument(s) {unknown}; supported: token, revision, private, "
                            "commit_message, diagnostics, card_data, training, remote_code, tags")
        if tags:
            if isinstance(tags, str):
                tags = [tags]
            card_data = dict(card_data or {})
            card_data["tags"] = list(card_data.get("tags") or []) + list(tags)  # de-duplicated in the card
        return push_to_hub(self, repo_id, token=token, revision=revision, private=bool(private),
                           commit_message=commit_message, diagnostics=diagnostics, card_data=card_data,
                           training=training, remote_code=remote_code)

    def generate(self, *args, **kwargs):
        gen_cfg = kwargs.get("generation_config")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(name) is not None or (gen_cfg is not None and getattr(gen_cfg, name, None) is not None):
                raise ValueError(
                    f"`{name}`: assisted / speculative decoding is not supported for hybrid models: the recurrent "
                    "linear-attention state cannot be rolled back after rejected draft tokens"
                )
        return super().generate(*args, **kwargs)


class _BaseConfigProbeFilter(logging.Filter):
    """peft's adapter save re-reads the base model's config.json (base_model_name_or_path = the
    teacher, model_type 'llama') through the hybrid config class, only to compare vocab sizes;
    transformers then warns 'using a model of type llama to instantiate hybrid_llama'. That read is
    expected and harmless, so only this exact message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("to instantiate a model of type `hybrid_" in msg and "You are using a model of type" in msg)


@contextlib.contextmanager
def quiet_base_config_probe():
    log = logging.getLogger("transformers.configuration_utils")
    f = _BaseConfigProbeFilter()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def _forward_with_hybrid_cache(base_forward):
    """The causal LM's forward, except that a forward that will return a cache but was given none
    gets a HybridCache (constant memory, cached steps on the fast path) instead of the DynamicCache
    the base model would create, while the hybrid attention is active (not in `softmax_view`):
    `use_cache=True`, or `use_cache` left unset with config.use_cache on, outside training (in
    training mode the base model's choice stands: no state is folded there). The cache (`cache`, or
    `past_key_values` before transformers 5.24) and `use_cache` must be passed by keyword for this.
    The signature is the base one (generate() validates kwargs with it)."""

    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        use_cache = kwargs.get("use_cache")
        wants_cache = use_cache is True or (use_cache is None and not self.training
                                            and getattr(self.config, "use_cache", False))
        if wants_cache and not compat.has_cache(kwargs) and len(args) < 4 and self._hybrid_attention_active():
            compat.set_cache(kwargs, HybridCache(self.config), base_forward)
        return base_forward(self, *args, **kwargs)

    return forward


def _family_classes(base_type: str) -> tuple[type, type]:
    if base_type not in FAMILIES:
        raise ValueError(
            f"model: architecture {base_type!r} is not supported; supported model_type values are "
            f"{sorted(FAMILIES)}"
        )
    if base_type in HYBRID_CONFIGS:
        return HYBRID_CONFIGS[base_type], HYBRID_MODELS[base_type]
    mod_name, cfg_name, lm_name = FAMILIES[base_type]
    mod = importlib.import_module(mod_name)
    base_cfg, base_lm = getattr(mod, cfg_name), getattr(mod, lm_name)
    family = cfg_name[: -len("Config")]
    cfg_cls = type(f"Hybrid{cfg_name}", (HybridConfigMixin, base_cfg), {"model_type": f"hybrid_{base_type}", "__module__": __name__})
    lm_cls = type(
        f"Hybrid{family}ForCausalLM",
        (HybridModelMixin, base_lm),
        {"config_class": cfg_cls, "__module__": __name__, "_supports_attention_backend": True,
         "forward": _forward_with_hybrid_cache(base_lm.forward)},
    )
    HYBRID_CONFIGS[base_type], HYBRID_MODELS[base_type] = cfg_cls, lm_cls
    return cfg_cls, lm_cls


def register_families() -> None:
    for base_type in FAMILIES:
        cfg_cls, lm_cls = _family_classes(base_type)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, lm_cls, exist_ok=True)
        globals()[cfg_cls.__name__] = cfg_cls
        globals()[lm_cls.__name__] = lm_cls


def _check_attention_supported(cfg) -> None:
    """Attention features of a teacher that the hybrid layer cannot reproduce are refused up front."""
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"model: attn_logit_softcapping={cfg.attn_logit_softcapping} is not supported (the hybrid's window "
            "softmax has no logit soft-capping); convert a teacher without it"
        )
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ValueError("model: use_bidirectional_attention=True is not supported: the hybrid layer is causal")


def convert(model: PreTrainedModel, config: HybridConfig | None = None, **overrides) -> PreTrainedModel:
    """Turn a loaded softmax causal LM into its hybrid class, in place, and return it.

    Base weights are untouched (bit-identical); the new parameters get the SPEC initialisation
    (identity-like feature maps, gamma = init_window_gamma), in the dtype and on the device of the
    attention projections. `overrides` replace fields of `config`."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if config is None:
        config = HybridConfig()
    elif not isinstance(config, HybridConfig):
        raise TypeError(f"config: expected a HybridConfig, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    model_type = model.config.model_type
    if model_type.startswith("hybrid_"):
        raise ValueError(f"model: this model is already converted (model_type={model_type!r})")
    cfg_cls, lm_cls = _family_classes(model_type)
    if type(model).__name__ != FAMILIES[model_type][2]:
        raise ValueError(
            f"model: expected a {FAMILIES[model_type][2]} (causal LM head), got {type(model).__name__}"
        )
    _check_attention_supported(model.config)
    windows = teacher_windows(model.config)
    layer_ids = config.layer_indices(model.config.num_hidden_layers, windows)

    base = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "quantization_config"):
        base.pop(key, None)
    base["hybrid"] = config.to_dict()
    new_cfg = cfg_cls(**base)
    new_cfg.architectures = [lm_cls.__name__]
    new_cfg._attn_implementation = ATTN_IMPLEMENTATION

    model.__class__ = lm_cls
    model.config = new_cfg
    model.model.config = new_cfg
    for layer in model.model.layers:
        layer.self_attn.config = new_cfg
    if hasattr(model, "generation_config") and model.generation_config is not None:
        gc = model.generation_config
        for name in ("cache_implementation",):
            if getattr(gc, name, None) not in (None, "dynamic"):
                setattr(gc, name, None)
    for idx in layer_ids:
        attn = model.model.layers[idx].self_attn
        proj = attn.q_proj.weight
        mixer = HybridMixer(config, new_cfg.num_attention_heads, new_cfg.num_key_value_heads, attn.head_dim,
                            windows[idx])
        attn.hybrid = mixer.to(device=proj.device, dtype=proj.dtype)
        install_cache_hooks(attn)
    return model


def iter_hybrid_attention(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(layer_idx, attention module) for every converted layer (also through a PeftModel)."""
    for module in model.modules():
        if hasattr(module, "hybrid") and hasattr(module, "layer_idx") and isinstance(module, nn.Module):
            yield module.layer_idx, module


def mixers_of(attn: nn.Module) -> list[HybridMixer]:
    """The `HybridMixer`(s) of a converted attention module: one, or one per copy where PEFT's
    `modules_to_save=["hybrid"]` wraps it (run-time state must be set on every copy; the first is
    the active one)."""
    return [m for m in attn.hybrid.modules() if isinstance(m, HybridMixer)]


def _select(model, layers) -> list[tuple[int, nn.Module]]:
    found = list(iter_hybrid_attention(model))
    if not found:
        raise ValueError("model: no converted (hybrid) attention layers found; call hf_hybrid_attn.convert first")
    if layers is None:
        return found
    layers = [layers] if isinstance(layers, int) else list(layers)
    available = {i for i, _ in found}
    missing = [i for i in layers if i not in available]
    if missing:
        raise ValueError(f"layers: {missing} are not converted layers; converted layers are {sorted(available)}")
    return [(i, a) for i, a in found if i in set(layers)]


def get_component_modes(model) -> dict[int, str]:
    return {i: mixers_of(a)[0].mode for i, a in iter_hybrid_attention(model)}


def set_component_mode(model, mode: str, layers: int | Iterable[int] | None = None) -> None:
    """Switch which components run: hybrid, swa_only, linear_only, sinks_only or none.

    `layers=None` switches every converted layer (and records the mode in the config)."""
    if mode not in COMPONENT_MODES:
        raise ValueError(f"mode must be one of {COMPONENT_MODES}, got {mode!r}")
    for _, attn in _select(model, layers):
        for mixer in mixers_of(attn):
            mixer.mode = mode
    if layers is None:
        cfg = getattr(model, "config", None)
        if cfg is not None and isinstance(getattr(cfg, "hybrid", None), dict):
            cfg.hybrid["component_mode"] = mode


@contextlib.contextmanager
def component_mode(model, mode: str, layers: int | Iterable[int] | None = None):
    """Context manager: run `model` in `mode` inside the block, then restore every layer's mode."""
    before = get_component_modes(model)
    cfg = getattr(model, "config", None)
    cfg_mode = cfg.hybrid.get("component_mode") if cfg is not None and isinstance(getattr(cfg, "hybrid", None), dict) else None
    set_component_mode(model, mode, layers)
    try:
        yield model
    finally:
        for i, attn in iter_hybrid_attention(model):
            for mixer in mixers_of(attn):
                mixer.mode = before[i]
        if cfg_mode is not None:
            cfg.hybrid["component_mode"] = cfg_mode


def set_window(model, window: int, layers: int | Iterable[int] | None = None) -> None:
    """Set the softmax window w (layers that were sliding in the teacher still cap it at theirs).
    `layers=None` sets every converted layer and records w in the config, so `save_pretrained`
    keeps it."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    for _, attn in _select(model, layers):
        for mixer in mixers_of(attn):
            mixer.window = window
    if layers is None:
        cfg = getattr(model, "config", None)
        if cfg is not None and isinstance(getattr(cfg, "hybrid", None), dict):
            cfg.hybrid["window"] = window


@torch.no_grad()
def collect_linear_share(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_bins: Sequence[int] | None = None) -> torch.Tensor:
    """LA share of the normaliser (SPEC §4): per converted layer and head, the mean over valid query
    positions >= w of alpha phi_q.z / D_i, in the current mode. Returns [num_converted_layers, H].

    position_bins: increasing position edges e_0 < e_1 < ... (positions among a row's valid
    tokens, e_0 >= w): the share is averaged in each bin [e_i, e_i+1) instead, [layers, H, bins]
    (NaN where a bin holds no valid query), e.g. to see whether the linear branch's weight in the
    normaliser grows with the context, as its z sums ever more keys."""
    edges = None
    if position_bins is not None:
        edges = [int(e) for e in position_bins]
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
            raise ValueError(f"position_bins: expected at least two increasing positions >= 0, got {list(position_bins)}")
    stats: dict[int, torch.Tensor] = {}
    hooks = []

    def make_hook(idx):
        def hook(module, q, k, v, key_valid, scaling):
            y, lin_den, den = module.hybrid(q, k, v, key_valid, scaling, return_stats=True)
            window = mixers_of(module)[0].window
            share = torch.where(den > 0, lin_den / den.clamp_min(1e-30), torch.zeros_like(den)).float()
            Tk, Tq = k.shape[2], q.shape[2]
            pos_in_row = key_valid.long().cumsum(1) - 1  # position of each token among valid ones
            pos = pos_in_row[:, Tk - Tq :]
            qmask = key_valid[:, Tk - Tq :] & (pos >= window)
            bins = [(window, None)] if edges is None else list(zip(edges, edges[1:]))
            sums, counts = [], []
            for lo, hi in bins:
                m = (qmask & (pos >= lo) & (pos < hi if hi is not None else True))[:, None, :].float()
                sums.append((share * m).sum((0, 2)))
                counts.append(m.sum((0, 2)))
            sums, counts = torch.stack(sums, -1).cpu(), torch.stack(counts, -1).cpu()  # [H, bins]
            if edges is None:
                stats[idx], stats[f"n{idx}"] = sums[:, 0] / counts[:, 0].clamp_min(1), counts[:, 0]
            else:
                stats[idx] = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
                stats[f"n{idx}"] = counts.sum(-1)
            return y.transpose(1, 2)

        return hook

    pairs = list(iter_hybrid_attention(model))
    for idx, attn in pairs:
        for mixer in mixers_of(attn):
            hooks.append((mixer, mixer.transfer_hook))
            mixer.transfer_hook = make_hook(idx)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for mixer, old in hooks:
            mixer.transfer_hook = old
    if any(float(stats[f"n{i}"].sum()) == 0 for i, _ in pairs):
        raise ValueError(
            f"input_ids: no query position beyond the window (w={mixers_of(pairs[0][1])[0].window}); "
            "the LA share needs sequences longer than the window"
            + ("" if edges is None else f" and inside position_bins {edges}")
        )
    return torch.stack([stats[i] for i, _ in pairs])
