"""Test helpers for hf_hybrid_attn (no network needed): a loopback Hugging Face Hub server."""

from .hub_server import LoopbackHub, validate_card_metadata

__all__ = ["LoopbackHub", "validate_card_metadata"]
