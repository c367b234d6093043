"""hf_hybrid_attn: hybrid linear attention + sliding-window softmax for transformers (arXiv 2510.05901).

`import hf_hybrid_attn` registers `attn_implementation="hybrid_linear_swa"` (and its mask function)
and the hybrid config/model classes of the supported families with the Auto classes, before any
transformers code can use them: at once if transformers is already imported, otherwise the moment
it is (`hf_hybrid_attn.registration`). The import itself loads neither torch nor transformers; the
names below are imported from their modules on first use.
"""

from __future__ import annotations

import importlib

from . import registration as _registration
from ._version import __version__  # noqa: F401  (public)

#: public name -> the module (in this package) that defines it
_EXPORTS = {
    "ATTN_IMPLEMENTATION": "attention",
    "HybridCache": "cache",
    "HybridCacheLayer": "cache",
    "COMPONENT_MODES": "config",
    "HybridConfig": "config",
    "FEATURE_MAPS": "feature_maps",
    "register_feature_map": "feature_maps",
    "HybridMixer": "layers",
    "component_mode": "modeling",
    "convert": "modeling",
    "get_component_modes": "modeling",
    "iter_hybrid_attention": "modeling",
    "set_component_mode": "modeling",
    "set_window": "modeling",
    "collect_linear_share": "modeling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


_registration.register_on_import()
