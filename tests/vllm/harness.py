"""Shared helpers of the vLLM tests (vLLM venv). The models and HF references come from
build_models.py, run by scripts/run_vllm_tests.sh, in $HF_HYBRID_VLLM_MODELS."""

from __future__ import annotations

import json
import os

MODELS = os.environ.get("HF_HYBRID_VLLM_MODELS", "")


def model_dir(name: str) -> str:
    path = os.path.join(MODELS, name)
    assert os.path.isfile(os.path.join(path, "config.json")), (
        f"{path}: missing; run the vLLM tests through scripts/run_vllm_tests.sh (it builds the models)")
    return path


def references(name: str) -> dict:
    with open(os.path.join(MODELS, "references.json")) as f:
        return json.load(f)[name]


def make_llm(name: str, **kwargs):
    from vllm import LLM

    args = dict(model=model_dir(name), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                max_model_len=256, max_num_seqs=8, max_num_batched_tokens=16, seed=0)
    args.update(kwargs)
    return LLM(**args)


def sampling(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)


def generate_together(llm, prompts, n):
    """All prompts submitted at once (one batch of requests of different lengths)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling(n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def generate_staggered(llm, prompts, n, first: int = 3, after_steps: int = 3):
    """`first` requests submitted, `after_steps` engine steps run (they are decoding by then), then the
    rest added while those decode; stepped to completion. Returns (tokens per prompt, log) where log
    records, per step after the late requests were added, how many tokens each request had."""
    engine = llm.llm_engine
    sp = sampling(n)
    for i in range(first):
        engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, sp)
    done, counts = {}, {}

    def step():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)

    for _ in range(after_steps):
        step()
    early_decoding = {k: v for k, v in counts.items()}
    for i in range(first, len(prompts)):
        engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, sp)
    log = []
    for _ in range(10_000):
        if len(done) == len(prompts):
            break
        step()
        log.append(dict(counts))
    return [done[str(i)] for i in range(len(prompts))], early_decoding, log


def assert_identical(got, expected, what: str):
    bad = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert len(got) == len(expected) and not bad, f"{what}: vLLM differs from HF generate on prompts " + "; ".join(
        f"#{i}: vllm {g} != hf {e}" for i, g, e in bad)
