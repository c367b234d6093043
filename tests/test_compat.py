"""hf_hybrid_attn.compat: the one place that knows transformers' API differences (5.17 ... newest).
The suite runs on the locked stack, on 5.17 and on the newest release (scripts/run_tests.sh)."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import hf_hybrid_attn as hha
from conftest import tiny_model
from hf_hybrid_attn import compat


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
