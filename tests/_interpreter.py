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


def prepare() -> bool:
    """Turn the interpreter on without a GPU (if triton is not imported yet); True when triton was
    imported before with it off, so this process cannot run the kernels in the interpreter."""
    cpu_only = not torch.cuda.is_available()
    preset = os.environ.get("TRITON_INTERPRET", "0").lower() in _ON
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
