"""hf_hybrid_attn: hybrid linear attention + sliding-window softmax for transformers (arXiv 2510.05901).

`import hf_hybrid_attn` registers `attn_implementation="hybrid_linear_swa"` (and its mask function)
and the hybrid config/model classes of the supported families with the Auto classes.
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTN_IMPLEMENTATION, hybrid_attention_forward, hybrid_mask
from .cache import HybridCache, HybridCacheLayer
from .config import COMPONENT_MODES, HybridConfig
from .feature_maps import FEATURE_MAPS, register_feature_map
from .layers import HybridMixer
from .modeling import (
    collect_linear_share,
    component_mode,
    convert,
    get_component_modes,
    iter_hybrid_attention,
    register_families,
    set_component_mode,
    set_window,
)

__version__ = "0.1.0"

AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hybrid_mask)  # key padding only, never Tq x Tk
register_families()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "COMPONENT_MODES",
    "FEATURE_MAPS",
    "HybridCache",
    "HybridCacheLayer",
    "HybridConfig",
    "HybridMixer",
    "collect_linear_share",
    "component_mode",
    "convert",
    "get_component_modes",
    "iter_hybrid_attention",
    "register_feature_map",
    "set_component_mode",
    "set_window",
]
