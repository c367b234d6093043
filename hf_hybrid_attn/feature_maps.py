"""Feature maps phi for the linear branch, registered by name (SPEC §2, "Feature maps").

Each map acts per query head: input x [B, H, T, d] (after RoPE, no 1/sqrt(d)), output [B, H, T, F'].
Parameters have a leading head dimension so one module serves every head of a layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Base class. `output_dim(head_dim, feature_dim)` tells the size of phi(x)."""

    name: str = ""
    has_bias: bool = False

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        if self.has_bias:
            self.bias = nn.Parameter(torch.empty(num_heads, feature_dim))
        self.reset_parameters()

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return feature_dim

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Identity-like init: phi starts from the first `feature_dim` coordinates of x."""
        eye = torch.eye(self.head_dim, self.feature_dim, dtype=self.weight.dtype, device=self.weight.device)
        self.weight.copy_(eye.expand_as(self.weight))
        if self.has_bias:
            self.bias.zero_()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        # the same products either way; on CPU matmul (W broadcast over the batch) is the faster one,
        # except for one token of several rows (a decode step), where it would copy W per row
        u = torch.einsum("bhtd,hdf->bhtf", x, w) if x.shape[0] > 1 and x.shape[2] == 1 else torch.matmul(x, w)
        if self.has_bias:
            u = u + self.bias.to(x.dtype)[None, :, None, :]
        return u

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class HedgehogFeatureMap(FeatureMap):
    """[softmax(xW), softmax(-xW)] over features, clamped >= 1e-12 (LoLCATs' default)."""

    name = "hedgehog"

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x)
        both = torch.cat([u, -u], -1).unflatten(-1, (2, u.shape[-1]))  # one softmax over each half
        return torch.softmax(both, -1).flatten(-2).clamp(min=1e-12)


class HedgehogExpFeatureMap(FeatureMap):
    """[exp(xW + b), exp(-xW - b)], stabilised by dividing by exp(max) per token (the Hedgehog form)."""

    name = "hedgehog_exp"
    has_bias = True

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x)
        u = torch.cat([u, -u], -1)
        return torch.exp(u - u.amax(-1, keepdim=True).detach())


class SoftmaxFeatureMap(FeatureMap):
    name = "softmax"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.project(x), -1)


class EluFeatureMap(FeatureMap):
    name = "elu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + F.elu(self.project(x))


class ReluFeatureMap(FeatureMap):
    """T2R: relu(xW + b)."""

    name = "relu"
    has_bias = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.project(x))


class IdentityEluFeatureMap(nn.Module):
    """1 + elu(x) with no parameters: a baseline. Output size d."""

    name = "identity_elu"

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim

    @staticmethod
    def output_dim(head_dim: int, feature_dim: int) -> int:
        return head_dim

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + F.elu(x)


FEATURE_MAPS: dict[str, Callable[..., nn.Module]] = {}


def register_feature_map(name: str, cls: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Register a feature map class under `name`. The class is built as cls(num_heads, head_dim,
    feature_dim), exposes `output_dim(head_dim, feature_dim)` and `reset_parameters()`, and maps
    [B, H, T, d] -> [B, H, T, output_dim] with non-negative values."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"feature map name must be a non-empty string, got {name!r}")
    if name in FEATURE_MAPS and not overwrite:
        raise ValueError(f"feature map {name!r} is already registered (pass overwrite=True to replace it)")
    for attr in ("output_dim", "reset_parameters"):
        if not hasattr(cls, attr):
            raise TypeError(f"feature map class {cls!r} must define {attr}()")
    FEATURE_MAPS[name] = cls


for _cls in (
    HedgehogFeatureMap,
    HedgehogExpFeatureMap,
    SoftmaxFeatureMap,
    EluFeatureMap,
    ReluFeatureMap,
    IdentityEluFeatureMap,
):
    register_feature_map(_cls.name, _cls)


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim)
