"""`HybridConfig`: every knob of the hybrid layer, validated, in one dataclass (SPEC §2).

Plain Python at import (no torch): the CLI and config readers import it cheaply. The registries it
validates against (feature maps, kernel backends) are imported when a config is validated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

COMPONENT_MODES = ("hybrid", "swa_only", "linear_only", "sinks_only", "none")
#: Named layer selections accepted by `HybridConfig.layers`.
LAYER_SELECTORS = ("global",)
#: Version of the checkpoint format written into config.json (`hybrid["format_version"]`).
FORMAT_VERSION = 1


@dataclass
class HybridConfig:
    """How a softmax model is turned into a hybrid linear-attention + sliding-window model.

    Stored in the converted model's ``config.json`` under ``"hybrid"``."""

    window: int = 64
    """Sliding-window size w: query i sees keys i-w < j <= i through softmax (w keys, itself included)."""

    feature_map: str = "hedgehog"
    """Name of the feature map phi for the linear branch (see `feature_maps.FEATURE_MAPS`)."""

    feature_dim: int = 64
    """F, the feature-map size parameter (hedgehog maps output 2F features; `identity_elu` ignores it)."""

    component_mode: str = "hybrid"
    """Which components run: hybrid, swa_only, linear_only, sinks_only or none (switchable at run time)."""

    layers: list[int] | str | None = None
    """Which decoder layers to convert: None converts all of them (the default, see below), a list of
    indices converts those, and "global" converts only the layers that attend globally in the teacher
    (for teachers that mix sliding-window and global layers, e.g. Gemma-3's 5 local : 1 global; on a
    teacher without sliding layers it is every layer, on one with only sliding layers none, which is
    refused). The default converts every layer: the method and its component diagnostics are defined
    on the converted layers, every family behaves alike, and the recurrent state is the smallest cache.
    "global" keeps the teacher's exact local attention where it is already linear-cost."""

    init_window_gamma: float = 0.1
    """Initial window weight gamma = sigmoid(window_logit), per head (SPEC: 0.1)."""

    affine_mix: bool = False
    """If True the linear weight is alpha = 1 - gamma; otherwise alpha = 1."""

    linear_covers_window: bool = False
    """Overlap option: the linear branch also covers the window (L(i) = {j <= i})."""

    num_sinks: int = 4
    """Number of initial keys the `sinks_only` diagnostic mode attends to."""

    softmax_sinks: int = 0
    """Softmax sinks arm (SPEC §2, "Softmax sinks"): the first `softmax_sinks` valid tokens of each
    sequence always take part in the window softmax and never enter the linear branch or its state
    (StreamingLLM's sinks inside the hybrid). 0 (the default) turns it off."""

    backend: str = "auto"
    """Kernel: auto (Triton on CUDA, chunked PyTorch otherwise), triton, torch, or reference (quadratic)."""

    chunk_size: int = 64
    """Query/key block size of the chunked implementations: a power of two >= 16 (Triton's tiles)."""

    training: dict[str, Any] = field(default_factory=dict)
    """Free-form record of how the model was trained (recipe, hyperparameters, tokens). Saved as is."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def _int(name: str, value: Any, minimum: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"HybridConfig.{name} must be an integer >= {minimum}, got {value!r}")

        _int("window", self.window, 1)
        _int("feature_dim", self.feature_dim, 1)
        _int("num_sinks", self.num_sinks, 1)
        _int("softmax_sinks", self.softmax_sinks, 0)
        _int("chunk_size", self.chunk_size, 16)
        if self.chunk_size & (self.chunk_size - 1):
            # the Triton kernels need it; checked here so a checkpoint never fails late on a GPU
            raise ValueError(f"HybridConfig.chunk_size must be a power of two >= 16, got {self.chunk_size!r}")
        from .feature_maps import FEATURE_MAPS
        from .kernels.dispatch import BACKENDS

        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"HybridConfig.feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r} "
                "(register new maps with hf_hybrid_attn.register_feature_map)"
            )
        if self.component_mode not in COMPONENT_MODES:
            raise ValueError(
                f"HybridConfig.component_mode must be one of {COMPONENT_MODES}, got {self.component_mode!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"HybridConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        g = self.init_window_gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0.0 < g < 1.0) or math.isnan(g):
            raise ValueError(f"HybridConfig.init_window_gamma must be a float in (0, 1), got {g!r}")
        for name in ("affine_mix", "linear_covers_window"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HybridConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.layers, str):
            if self.layers not in LAYER_SELECTORS:
                raise ValueError(
                    f"HybridConfig.layers must be None, a list of layer indices or one of {LAYER_SELECTORS}, "
                    f"got {self.layers!r}"
                )
        elif self.layers is not None:
            if isinstance(self.layers, bytes) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise ValueError(
                    f"HybridConfig.layers must be None or a list of non-negative layer indices, got {self.layers!r}"
                )
            self.layers = sorted(set(self.layers))
        if not isinstance(self.training, dict):
            raise ValueError(f"HybridConfig.training must be a dict, got {type(self.training).__name__}")

    @property
    def init_window_logit(self) -> float:
        g = float(self.init_window_gamma)
        return math.log(g / (1.0 - g))

    def layer_indices(self, num_layers: int, teacher_windows: list[int | None] | None = None) -> list[int]:
        """The converted layers' indices. `teacher_windows` (see `teacher_windows()`) is needed for
        layers="global"; without it every layer counts as global."""
        if self.layers is None:
            return list(range(num_layers))
        if self.layers == "global":
            windows = teacher_windows if teacher_windows is not None else [None] * num_layers
            if len(windows) != num_layers:
                raise ValueError(f"teacher_windows: expected {num_layers} entries, got {len(windows)}")
            found = [i for i, w in enumerate(windows) if w is None]
            if not found:
                raise ValueError(
                    "HybridConfig.layers='global': the teacher has no global-attention layer (every layer is "
                    "sliding-window); convert all layers (layers=None) or name them"
                )
            return found
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"HybridConfig.layers has indices {bad} but the model has {num_layers} layers")
        return list(self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint's hybrid config has format_version={version!r}, but this hf_hybrid_attn "
                f"reads format_version={FORMAT_VERSION}; install the hf_hybrid_attn version that wrote it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> HybridConfig:
        return dataclasses.replace(self, **changes)


def teacher_windows(model_config: Any) -> list[int | None]:
    """Per decoder layer, the teacher's own sliding window (None: the layer attends globally), read the
    way transformers' attention modules read it: `layer_types` where the family has them (Qwen2/3,
    Gemma-3: "sliding_attention" layers use `sliding_window`), else one `sliding_window` for every
    layer (Mistral), else None (Llama)."""
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        unknown = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(
                f"model: layer_types {unknown} are not supported (supported: full_attention, sliding_attention)"
            )
        if len(layer_types) != n:
            raise ValueError(f"model: config.layer_types has {len(layer_types)} entries for {n} layers")
        out = [window if t == "sliding_attention" else None for t in layer_types]
    else:
        out = [window] * n
    for w in out:
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"model: config.sliding_window must be a positive integer or None, got {w!r}")
    return out


def parse_layers(value: str) -> list[int] | str | None:
    """The command-line form of `HybridConfig.layers`: 'all' -> None, 'global' -> 'global',
    '0,3' -> [0, 3]."""
    if value in ("all", ""):
        return None
    if value in LAYER_SELECTORS:
        return value
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected 'all', {', '.join(repr(s) for s in LAYER_SELECTORS)} or comma-separated layer "
                         f"indices, got {value!r}") from None
