"""Client half of the Hub round-trip tests: run in a fresh process whose HF_ENDPOINT points at a
`LoopbackHub` (huggingface_hub reads HF_ENDPOINT at import, so this cannot run in the test process).

    HF_ENDPOINT=http://127.0.0.1:PORT HF_TOKEN=... HF_HUB_CACHE=... HF_HOME=... \\
        python tests/hub_roundtrip.py OUT.json [scenario ...]

Each scenario measures (it does not assert) and the results go to OUT.json, for the test to check:
logit differences, repo file lists, card metadata, error messages, warnings, and the server's state
(commit counts and request log, from the loopback hub's /_loopback/state).
Scenarios: model, adapter, no_token, untrained, interrupted, invalid_card, cli, remote_code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
import urllib.request
import warnings
from typing import Any

REPO = "tester/tiny-hybrid"
ADAPTER_REPO = "tester/tiny-hybrid-lora"


def _server(path: str, payload: dict | None = None) -> Any:
    endpoint = os.environ["HF_ENDPOINT"]
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(endpoint + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _commits(repo: str) -> int:
    return _server("/_loopback/state")["repos"].get(repo, {}).get("commits", 0)


def tiny_hybrid(seed: int, trained: bool = True):
    """The transformers test suite's tiny Llama (vocab 99, hidden 32, 2 layers, heads 4 / kv 2), converted."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_hybrid_attn as hha

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model = hha.convert(model, hha.HybridConfig(window=4, feature_dim=8))
    if trained:  # stand-in for stage 1: move the feature maps and window logits off their init
        with torch.no_grad():
            for _, attn in hha.iter_hybrid_attention(model):
                for p in attn.hybrid.parameters():
                    p.add_(0.5 * torch.randn_like(p))
        model.config.hybrid["training"] = {
            "recipe": "hedgecats",
            "config": {"name": "hedgecats", "description": "HedgeCATs (test record)",
                       "transfer": {"objectives": {"attn_ce": 1.0}, "lr": 0.01}, "finetune": {"lr": 1e-4, "lora_r": 8}},
            "stages": {"transfer": {"steps_done": 3, "tokens": 3072, "initial_val_loss": 4.6, "final_val_loss": 4.5},
                       "finetune": {"steps_done": 2, "tokens": 2048}},
            "data": {"source": "sotu"},
        }
    return model


def _ids():
    import torch

    return torch.randint(3, 99, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model):
    import torch

    with torch.no_grad():
        return model(_ids()).logits


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def _diagnostics_dir() -> str:
    d = tempfile.mkdtemp(prefix="diag-")
    with open(os.path.join(d, "diagnostics.json"), "w") as f:
        json.dump({"modes": {"hybrid": {"ppl": {"inside": 20.5, "beyond": 22.25}},
                             "swa_only": {"ppl": {"inside": 20.5, "beyond": 23.75}}},
                   "linear_share_per_layer": [0.125, 0.25]}, f)
    with open(os.path.join(d, "la_share.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)  # content is only transported, never decoded
    return d


def _error(fn) -> dict[str, Any]:
    try:
        fn()
    except (Exception, SystemExit) as e:  # the test checks which error and its message
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": None}


# ---- scenarios ---------------------------------------------------------------------------------
def scenario_model() -> dict[str, Any]:
    from huggingface_hub import HfApi, ModelCard, hf_hub_download
    from transformers import AutoModelForCausalLM

    from hf_hybrid_attn import hub

    model = tiny_hybrid(seed=0)
    ref = _logits(model)
    info = hub.push_to_hub(model, REPO, diagnostics=_diagnostics_dir(), card_data={"license": "apache-2.0"})
    api = HfApi()
    out: dict[str, Any] = {"commit": info.oid, "files": sorted(api.list_repo_files(REPO))}
    by_sha = AutoModelForCausalLM.from_pretrained(REPO, revision=info.oid)
    out["class"] = type(by_sha).__name__
    out["diff_by_sha"] = _maxdiff(_logits(by_sha), ref)
    out["diff_main"] = _maxdiff(_logits(AutoModelForCausalLM.from_pretrained(REPO)), ref)
    card = ModelCard.load(REPO)
    out["card_meta"] = card.data.to_dict()
    out["card_text"] = card.text
    # a second version on a branch: both revisions load their own weights
    v2 = tiny_hybrid(seed=1)
    ref2 = _logits(v2)
    info2 = v2.push_to_hub(REPO, revision="dev", tags=["my-tag"])  # the model's own method: same path
    out["dev_commit"] = info2.oid
    with open(hf_hub_download(REPO, "README.md", revision="dev")) as f:
        out["dev_card_text"] = f.read()
    out["native_bad_kwarg"] = _error(lambda: v2.push_to_hub(REPO, revision="dev", safe_serialization=False))
    out["diff_dev"] = _maxdiff(_logits(AutoModelForCausalLM.from_pretrained(REPO, revision="dev")), ref2)
    out["diff_main_after_dev"] = _maxdiff(_logits(AutoModelForCausalLM.from_pretrained(REPO, revision="main")), ref)
    out["v1_v2_differ"] = _maxdiff(ref, ref2)
    return out


def scenario_adapter() -> dict[str, Any]:
    import torch
    from huggingface_hub import HfApi, ModelCard, hf_hub_download
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_hybrid_attn import hub

    if not HfApi().repo_exists(REPO):
        hub.push_to_hub(tiny_hybrid(seed=0), REPO)
    base = AutoModelForCausalLM.from_pretrained(REPO)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      modules_to_save=["hybrid"])
    model = get_peft_model(base, lora)
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _ids()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ref = _logits(model)
    info = hub.push_adapter(model, ADAPTER_REPO, base_model=REPO)
    out: dict[str, Any] = {"commit": info.oid, "files": sorted(HfApi().list_repo_files(ADAPTER_REPO))}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(REPO), ADAPTER_REPO).eval()
    out["diff_hub"] = _maxdiff(_logits(reloaded), ref)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(REPO), d).eval()
        out["diff_hub_vs_local"] = _maxdiff(_logits(reloaded), _logits(local))
    out["diff_vs_base"] = _maxdiff(_logits(AutoModelForCausalLM.from_pretrained(REPO)), ref)
    with open(hf_hub_download(ADAPTER_REPO, "adapter_config.json")) as f:
        out["adapter_base"] = json.load(f)["base_model_name_or_path"]
    card = ModelCard.load(ADAPTER_REPO)
    out["card_meta"], out["card_text"] = card.data.to_dict(), card.text
    return out


def scenario_no_token() -> dict[str, Any]:
    from huggingface_hub import HfApi

    from hf_hybrid_attn import hub

    token = os.environ.pop("HF_TOKEN")
    try:
        before = _commits(REPO)
        out = {"push": _error(lambda: hub.push_to_hub(tiny_hybrid(seed=0), REPO)),
               "adapter": _error(lambda: hub.push_adapter("/nonexistent", ADAPTER_REPO))}
        # and the server itself refuses an unauthenticated write (401), whatever the client does
        out["raw_upload"] = _error(lambda: HfApi(token=False).upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO))
        out["commits_added"] = _commits(REPO) - before
    finally:
        os.environ["HF_TOKEN"] = token
    return out


def scenario_untrained() -> dict[str, Any]:
    from huggingface_hub import ModelCard

    from hf_hybrid_attn import hub

    repo = "tester/tiny-untrained"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hub.push_to_hub(tiny_hybrid(seed=2, trained=False), repo)
    with warnings.catch_warnings(record=True) as caught_trained:
        warnings.simplefilter("always")
        hub.push_to_hub(tiny_hybrid(seed=3, trained=True), "tester/tiny-trained")
    return {
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "warnings_when_trained": [w.category.__name__ for w in caught_trained
                                  if issubclass(w.category, hub.UntrainedFeatureMapsWarning)],
        "card_text": ModelCard.load(repo).text,
    }


def scenario_interrupted() -> dict[str, Any]:
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    from hf_hybrid_attn import hub

    api = HfApi()
    if not api.repo_exists(REPO):
        hub.push_to_hub(tiny_hybrid(seed=0), REPO)
    ref = _logits(tiny_hybrid(seed=0))
    out: dict[str, Any] = {}
    for mode in ("disconnect", "error"):
        head, commits = api.model_info(REPO).sha, _commits(REPO)
        _server("/_loopback/fault", {"mode": mode})
        err = _error(lambda: hub.push_to_hub(tiny_hybrid(seed=5), REPO))
        with tempfile.TemporaryDirectory() as cache:  # a cold cache: the files must come from the server
            reloaded = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=cache)
            diff = _maxdiff(_logits(reloaded), ref)
        out[mode] = {"error": err, "head_unchanged": api.model_info(REPO).sha == head,
                     "commits_added": _commits(REPO) - commits, "diff_after": diff}
    # the hub works again afterwards
    info = hub.push_to_hub(tiny_hybrid(seed=0), REPO)
    out["push_after"] = info.oid
    return out


def scenario_invalid_card() -> dict[str, Any]:
    from hf_hybrid_attn import hub

    repo = "tester/bad-card"
    model = tiny_hybrid(seed=0)
    n_requests = len(_server("/_loopback/state")["requests"])
    out = {
        "server_refused": _error(lambda: hub.push_to_hub(model, repo, card_data={"license": "not-a-license"})),
        "local_refused": _error(lambda: hub.push_to_hub(model, repo, card_data={"tags": "not-a-list"})),
        "base_model_refused": _error(lambda: hub.push_to_hub(model, repo, card_data={"base_model": 5})),
    }
    state = _server("/_loopback/state")
    new = state["requests"][n_requests:]
    out["requests"] = [f"{m} {p.split('?')[0]}" for m, p, _ in new]
    out["repo_exists"] = repo in state["repos"]
    return out


def scenario_cli() -> dict[str, Any]:
    from huggingface_hub import HfApi, ModelCard

    from hf_hybrid_attn import hub

    repo = "tester/tiny-cli"
    with tempfile.TemporaryDirectory() as d:
        tiny_hybrid(seed=0).save_pretrained(d)
        import argparse

        parser = argparse.ArgumentParser()
        hub.add_push_subparser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["push", d, repo, "--card-from", _diagnostics_dir(), "--license", "mit"])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = args.func(args)
        bad = parser.parse_args(["push", os.path.join(d, "missing"), repo])
        exit_msg = _error(lambda: bad.func(bad))
    return {"rc": rc, "stdout": buf.getvalue(), "files": sorted(HfApi().list_repo_files(repo)),
            "card_meta": ModelCard.load(repo).data.to_dict(), "missing_dir": exit_msg}


_ISOLATED = r"""
import json, sys
sys.modules["hf_hybrid_attn"] = None  # as if the package were not installed: importing it raises
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.randint(3, 99, (2, 24), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(ids).logits
torch.save(logits, sys.argv[2])
leaked = sorted(k for k, v in sys.modules.items() if k.startswith("hf_hybrid_attn") and v is not None)
print(json.dumps({"module": type(model).__module__, "leaked": leaked}))
"""


def scenario_remote_code() -> dict[str, Any]:
    """Push with the modeling code; a process that cannot import hf_hybrid_attn loads it from the Hub."""
    import subprocess

    import torch
    from huggingface_hub import HfApi

    from hf_hybrid_attn import hub

    repo = "tester/tiny-remote-code"
    model = tiny_hybrid(seed=4)
    ref = _logits(model)
    hub.push_to_hub(model, repo, remote_code=True)
    out: dict[str, Any] = {"files": sorted(HfApi().list_repo_files(repo))}
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "HF_MODULES_CACHE": os.path.join(d, "modules")}
        proc = subprocess.run([sys.executable, "-c", _ISOLATED, repo, os.path.join(d, "logits.pt")], env=env,
                              cwd=d, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return {**out, "crashed": proc.stderr[-4000:]}
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        out["diff"] = _maxdiff(torch.load(os.path.join(d, "logits.pt")), ref)
    return out


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main(argv: list[str]) -> int:
    import huggingface_hub
    import transformers

    out_path, names = argv[0], argv[1:] or list(SCENARIOS)
    results: dict[str, Any] = {"versions": {"huggingface_hub": huggingface_hub.__version__,
                                            "transformers": transformers.__version__,
                                            "huggingface_hub_file": huggingface_hub.__file__}}
    for name in names:
        try:
            results[name] = SCENARIOS[name]()
        except Exception:  # report, and let the test show the traceback
            results[name] = {"crashed": traceback.format_exc()}
    state = _server("/_loopback/state")
    results["unknown_requests"] = state["unknown_requests"]
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
