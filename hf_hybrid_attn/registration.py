"""What `import hf_hybrid_attn` registers with transformers, and when.

`register()` adds `attn_implementation="hybrid_linear_swa"` (attention and mask functions) and the
hybrid config/model classes of every supported family (`AutoConfig`, `AutoModelForCausalLM`). It is
idempotent.

`import hf_hybrid_attn` itself imports neither torch nor transformers, so tools that only read a
config (`hf-hybrid info`) start in a fraction of a second. The registration still happens before
any transformers code can use it:
  - transformers already imported: `register()` runs during `import hf_hybrid_attn`;
  - not yet: a one-shot import hook runs it the moment `import transformers` completes (the same
    moment the old eager import would have reached it). If that happens while one of this
    package's own modules is mid-import (it imported transformers), the registration waits until
    the outermost of them has finished, so it never sees a half-initialised module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading

_lock = threading.RLock()
_state = "idle"  # idle -> (pending) -> running -> done
_PACKAGE = __name__.rpartition(".")[0]


def register() -> None:
    """Register the hybrid attention, its mask function and the hybrid families (idempotent)."""
    global _state
    with _lock:
        if _state in ("running", "done"):
            return
        _state = "running"
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            from .attention import ATTN_IMPLEMENTATION, hybrid_attention_forward, hybrid_mask
            from .modeling import register_families

            AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
            AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hybrid_mask)  # key padding only, never Tq x Tk
            register_families()
        except BaseException:
            _state = "idle"
            raise
        _state = "done"
        _uninstall()


def is_registered() -> bool:
    return _state == "done"


def _own_module_initialising(finished: str) -> bool:
    """Is one of this package's modules (other than this one and `finished`, whose loader has just
    returned) still executing its top level?"""
    for name, mod in list(sys.modules.items()):
        if name in (__name__, finished) or not (name == _PACKAGE or name.startswith(_PACKAGE + ".")):
            continue
        spec = getattr(mod, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            return True
    return False


def _after_import(fullname: str) -> None:
    """After `transformers` or one of this package's modules has been imported: register if
    transformers is loaded and none of this package's modules is still mid-import."""
    global _state
    with _lock:
        if _state in ("running", "done") or "transformers" not in sys.modules:
            return
        if _own_module_initialising(fullname):
            _state = "pending"  # finished when the outermost of our modules has been imported
            return
    register()


class _Loader(importlib.abc.Loader):
    """Runs the wrapped loader, then `_after_import`; everything else is the wrapped loader's."""

    def __init__(self, inner, fullname: str):
        self._inner, self._fullname = inner, fullname

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _after_import(self._fullname)

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _Hook(importlib.abc.MetaPathFinder):
    """Until the registration has run: watches `import transformers` and this package's modules."""

    def find_spec(self, fullname, path, target=None):
        watched = fullname == "transformers" or (fullname.startswith(_PACKAGE + ".") and fullname != __name__)
        if not watched:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _Loader):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_hook = _Hook()


def _uninstall() -> None:
    while _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def register_on_import() -> None:
    """Called by `import hf_hybrid_attn`: register now if transformers is loaded, else on its import."""
    transformers = sys.modules.get("transformers")
    spec = getattr(transformers, "__spec__", None)
    if transformers is not None and not getattr(spec, "_initializing", False):
        register()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
