"""`HybridConfig`: every knob of the hybrid layer, validated, in one dataclass (SPEC §2)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .feature_maps import FEATURE_MAPS

COMPONENT_MODES = ("hybrid", "swa_only", "linear_only", "sinks_only", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
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

    layers: list[int] | None = None
    """Indices of the decoder layers to convert; None converts all of them."""

    init_window_gamma: float = 0.1
    """Initial window weight gamma = sigmoid(window_logit), per head (SPEC: 0.1)."""

    affine_mix: bool = False
    """If True the linear weight is alpha = 1 - gamma; otherwise alpha = 1."""

    linear_covers_window: bool = False
    """Overlap option: the linear branch also covers the window (L(i) = {j <= i})."""

    num_sinks: int = 4
    """Number of initial keys the `sinks_only` diagnostic mode attends to."""

    backend: str = "auto"
    """Kernel: auto (Triton on CUDA, chunked PyTorch otherwise), triton, torch, or reference (quadratic)."""

    chunk_size: int = 64
    """Query/key block size of the chunked implementations."""

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
        _int("chunk_size", self.chunk_size, 1)
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
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
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

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(num_layers))
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
