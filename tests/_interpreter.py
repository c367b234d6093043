"""Triton's CPU interpreter for the kernel test modules, shared by all of them.

The interpreter must be on before triton is first imported (`tl.zeros` & co. are @jit functions
created at import). `import hf_hybrid_attn` imports transformers' model code, which imports triton,
so when an earlier test module got there first, a kernel module re-runs itself in a fresh process
(its `..._in_subprocess` test) and its in-process tests skip. tests/conftest.py sets the variable
before anything is imported, so in a normal run every module runs in process.

    INTERPRETER_UNAVAILABLE = _interpreter.prepare()        # first, before importing triton
    _in_process_interpreter, test_suite_in_subprocess = _interpreter.subprocess_suite(
        __file__, "test_suite_in_subprocess", INTERPRETER_UNAVAILABLE)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_ON = ("1", "true", "on", "yes")


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _ON


def prepare() -> bool:
    """Turn the interpreter on without a GPU (if triton is not imported yet); True when triton was
    imported before with it off, so this process cannot run the kernels in the interpreter."""
    cpu_only = not torch.cuda.is_available()
    preset = interpreter_on()
    unavailable = cpu_only and "triton" in sys.modules and not preset
    if cpu_only:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return unavailable


def subprocess_suite(path: str, name: str, unavailable: bool):
    """(an autouse fixture that skips the module's other tests when `unavailable`, the test `name`
    that then runs them in a fresh process with the interpreter on and asserts they all passed,
    none skipped)."""

    @pytest.fixture(autouse=True)
    def _in_process_interpreter(request):
        if unavailable and request.node.name != name:
            pytest.skip(f"triton was imported before TRITON_INTERPRET=1: covered by {name}")

    @pytest.mark.skipif(not unavailable, reason="the interpreter tests run in this process")
    def suite_in_subprocess():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(path), "-k", f"not {name}"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        summary = run.stdout.strip().splitlines()[-1:] or [""]
        assert run.returncode == 0 and " passed" in summary[0] and "skipped" not in summary[0], (
            run.stdout[-4000:] + run.stderr[-2000:]
        )

    suite_in_subprocess.__name__ = suite_in_subprocess.__qualname__ = name
    return _in_process_interpreter, suite_in_subprocess


def skip_repatching_inside_kernels() -> bool:
    """Make Triton's interpreter stop re-patching `triton.language` on every device-function call.

    In the interpreter, each call a kernel makes to a @jit function (`tl.sum`, `tl.max`, `tl.where`'s
    helpers and our own) runs `_patch_lang(fn)`, which scans the language modules with
    `inspect.getmembers` to wrap their builtins, again, though the launch (`GridExecutor`) has already
    wrapped them (and the first nested call wraps `triton.language.core` for good: that scope is
    never restored). Measured with cProfile on two kernel tests (test_triton_kernels decode [100],
    test_kernel_numerics_devices [100]): these rescans were a third of the run. A module whose builtins
    are already wrapped is left as it is; anything else goes to Triton's own `_patch_lang`, and the
    launch-level patch and its restore are untouched. Only what the interpreter spends is changed, not
    what a kernel computes: every kernel test still compares against its reference. Returns whether it
    was installed (False, and nothing changed, where this triton's interpreter is built differently).
    """
    import inspect

    try:
        import triton.language as tl
        import triton.runtime.interpreter as interp

        source = inspect.getsource(interp.InterpretedFunction.__call__)
        original, is_builtin = interp._patch_lang, tl.core.is_builtin
        scope_cls = interp._LangPatchScope
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    if "_patch_lang(self.fn)" not in source or getattr(original, "_hf_hybrid_skip", False):
        return False
    langs_of = {}

    def patch_lang(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and not any(is_builtin(getattr(lang, "program_id", None)) for lang in langs):
            return scope_cls()  # already wrapped: nothing to patch, nothing to restore
        return original(fn)

    patch_lang._hf_hybrid_skip = True
    interp._patch_lang = patch_lang
    return True
