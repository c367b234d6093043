"""hf_hybrid_attn.compat: the one place that knows transformers' API differences (5.17 ... newest).
The suite runs on the locked stack, on 5.17 and on the newest release (scripts/run_tests.sh)."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache, LlamaForCausalLM

import hf_hybrid_attn as hha
from conftest import randomize_mixers, tiny_model
from hf_hybrid_attn import compat

ROOT = Path(__file__).resolve().parents[1]


def test_cache_arg_name_follows_the_installed_signature():
    params = inspect.signature(LlamaForCausalLM.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert compat.cache_arg_name() == expected
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    assert compat.cache_arg_name(model) == expected  # through the hybrid class's wrapped forward
    assert compat.cache_arg_name(type(model.model.layers[0].self_attn)) == expected

    def no_cache(x):
        return x

    with pytest.raises(RuntimeError, match="takes no cache argument"):
        compat.cache_arg_name(no_cache)


def test_kwargs_helpers():
    c = object()
    assert compat.find_cache({"past_key_values": c}) is c and compat.find_cache({"cache": c}) is c
    assert compat.find_cache({"cache": None, "past_key_values": c}) is c
    assert compat.find_cache({}) is None and not compat.has_cache({"cache": None})
    kw = {"past_key_values": 1, "cache": 2, "x": 3}
    compat.set_cache(kw, c)
    assert kw == {compat.cache_arg_name(): c, "x": 3}
    assert compat.cache_kwargs(c) == {compat.cache_arg_name(): c}


def test_paged_and_packed_calls_are_recognised():
    class PagedAttentionCache:  # the name is what transformers' continuous batching passes
        pass

    assert compat.is_paged_or_packed(PagedAttentionCache(), {})
    assert compat.is_paged_or_packed(None, {"cache": object()})  # <= 5.23 spelling
    assert compat.is_paged_or_packed(None, {"cu_seq_lens_q": torch.zeros(2)})
    assert not compat.is_paged_or_packed(DynamicCache(), {"cu_seq_lens_q": None, "position_ids": 1})


def test_output_cache_reads_either_generation_without_touching_deprecated_names():
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    out = model(input_ids=torch.randint(3, 99, (1, 6)), use_cache=True)
    assert isinstance(compat.output_cache(out), hha.HybridCache)
    assert compat.output_cache({"past_key_values": 5}) == 5
    with pytest.raises(TypeError, match="ModelOutput"):
        compat.output_cache(3)


def test_no_deprecation_warning_from_our_calls(caplog):
    """Forward with a cache, generate(), and reading the returned cache: nothing deprecated is used
    (transformers warns through `warnings` for renamed kwargs and through its logger for the
    output's old attribute)."""
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    ids = torch.randint(3, 99, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any FutureWarning/DeprecationWarning fails the test
        with caplog.at_level(logging.WARNING, logger="transformers"):
            cache = hha.HybridCache(model.config)
            out = model(input_ids=ids[:, :7], use_cache=True, **compat.cache_kwargs(cache))
            step = model(input_ids=ids[:, 7:8], use_cache=True, **compat.cache_kwargs(compat.output_cache(out)))
            assert compat.output_cache(step) is cache
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()], caplog.text


def _python_in_repo_root(code: str, pythonpath: str | None = None) -> dict:
    """Run `python -c code` with the repository root as the working directory, so that '' (the root)
    is first on sys.path, as for `python -m pytest` or `python -c` in a clone. Returns the last line
    of stdout as JSON."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_repo_kernels_folder_never_shadows_pypi_kernels():
    """transformers probes and imports PyPI's `kernels` (a hard dependency from 5.25). With the clone's
    root on sys.path, `import kernels` would find our `kernels/` folder, and `import transformers`'s
    models failed ("cannot import name 'CUDAProperties' from 'kernels'"). Whatever is installed: the
    import works, `kernels` is PyPI's where that is installed and an empty module where not, and the
    hybrid kernels are reachable only as `hf_hybrid_attn.kernels`."""
    r = _python_in_repo_root("""
import importlib.metadata as md, json, os, sys
from transformers import LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available
import kernels
import hf_hybrid_attn.kernels as ours
try:
    dist = md.distribution("kernels")
    installed = str(dist.locate_file("kernels"))
except md.PackageNotFoundError:
    installed = None
print(json.dumps({"file": kernels.__file__, "version": getattr(kernels, "__version__", None),
                  "ours_in_top_level": hasattr(kernels, "hybrid_attention"), "installed": installed,
                  "available": is_kernels_available(), "ours": hasattr(ours, "hybrid_attention"),
                  "ours_file": ours.__file__, "cwd_first": os.path.samefile(sys.path[0] or ".", os.getcwd())}))
""")
    assert r["cwd_first"], "the check needs the repository root first on sys.path"
    assert r["ours"] and Path(r["ours_file"]).parent == ROOT / "kernels"
    assert not r["ours_in_top_level"]
    if r["installed"] is not None:  # PyPI's kernels is installed (transformers >= 5.25 needs it)
        assert Path(r["file"]).parent.resolve() == Path(r["installed"]).resolve()
        assert r["version"] == importlib.metadata.version("kernels")
    else:
        assert Path(r["file"]).parent == ROOT / "kernels" and r["version"] is None
        assert r["available"] is False


def test_repo_kernels_folder_hands_over_to_an_installed_kernels(tmp_path):
    """The hand-over itself, independent of the installed stack: a stand-in `kernels` package later on
    sys.path than the root is what `import kernels` returns, its submodules resolve inside it, and an
    error raised by it reaches the importer unchanged."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.0.standin'\nfrom .layer import Mode\n")
    (fake / "layer.py").write_text("class Mode:\n    INFERENCE = 1\n")
    r = _python_in_repo_root("""
import json, sys
import kernels
from kernels.layer import Mode
import hf_hybrid_attn.kernels as ours
print(json.dumps({"version": kernels.__version__, "file": kernels.__file__, "mode": Mode.INFERENCE,
                  "same": sys.modules["kernels"] is kernels, "ours": callable(ours.hybrid_attention)}))
""", pythonpath=str(fake.parent))
    assert r == {"version": "0.0.standin", "file": str(fake / "__init__.py"), "mode": 1, "same": True, "ours": True}

    (fake / "__init__.py").write_text("raise ImportError('stand-in kernels is broken')\n")
    r = _python_in_repo_root("""
import json, sys
try:
    import kernels
    err = None
except ImportError as e:
    err = str(e)
print(json.dumps({"err": err, "left": "kernels" in sys.modules and hasattr(sys.modules["kernels"], "Mode")}))
""", pythonpath=str(fake.parent))
    assert r == {"err": "stand-in kernels is broken", "left": False}


def test_hub_kernels_leave_the_hybrid_model_unchanged(tmp_path):
    """transformers 5.25 kernelizes every `from_pretrained` model by default (Hub kernels for RMSNorm,
    RoPE, activations, ...). A converted checkpoint loads with the default, gives the same logits as
    with `use_kernels=False`, and still trains after `train()` (which re-kernelizes in 5.25)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.import_utils import is_kernels_available

    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    randomize_mixers(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 99, (2, 11))
    default = AutoModelForCausalLM.from_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=False)
    assert type(default) is type(model) and not plain.use_kernels
    if is_kernels_available() and Version(compat.TRANSFORMERS_VERSION) >= Version("5.25"):
        assert default.use_kernels  # the new default really ran kernelize
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        torch.testing.assert_close(default(input_ids=ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(plain(input_ids=ids).logits, ref, rtol=0, atol=0)
    default.train()
    loss = default(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for _, a in hha.iter_hybrid_attention(default) for p in a.hybrid.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
