"""Hub round trips of converted models and PEFT adapters, against the loopback Hub over real HTTP.

huggingface_hub reads HF_ENDPOINT at import, so the client side (push, from_pretrained,
PeftModel.from_pretrained, ModelCard) runs in a fresh process:
`python tests/hub_roundtrip.py`, once per library stack. It measures; the tests
below assert. Stacks: this venv (huggingface_hub 2.x); huggingface_hub 1.33 with transformers 5.24,
the newest release that accepts hub 1.x (scripts/hub_compat.sh); transformers 5.17 + huggingface_hub
1.33, the GPU machine's stack (scripts/install_compat.sh). A stack is skipped only if its pip install fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_hybrid_attn as hha
from hf_hybrid_attn import hub
from hf_hybrid_attn.testing import DEFAULT_TOKEN, LoopbackHub
from hub_roundtrip import ADAPTER_REPO, REPO

ROOT = Path(__file__).resolve().parents[1]
#: stack name -> (install script printing a PYTHONPATH dir or None, expected hub major, expected transformers)
STACKS = {
    "venv": (None, None, None),
    "hub1": ("scripts/hub_compat.sh", "1.", "5.24."),
    "tf517-hub1": ("scripts/install_compat.sh", "1.", "5.17."),
}


def _install(script: str) -> str:
    proc = subprocess.run(["bash", str(ROOT / script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        pytest.skip(f"{script} could not install the compat stack (needs PyPI): {proc.stderr.strip()[-600:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module", params=list(STACKS))
def roundtrip(request, tmp_path_factory):
    name = request.param
    script, hub_major, tf_version = STACKS[name]
    pythonpath = os.environ.get("PYTHONPATH", "") if script is None else _install(script)
    tmp = tmp_path_factory.mktemp(f"hub-{name}")
    with LoopbackHub(root=str(tmp / "server")) as server:
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_TOKEN": DEFAULT_TOKEN,
               "HF_HUB_CACHE": str(tmp / "cache"), "HF_HOME": str(tmp / "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT_OVERRIDE"):
            env.pop(key, None)
        out = tmp / "results.json"
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "hub_roundtrip.py"), str(out)],
                              env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp))
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads(out.read_text())
    results["_stack"] = (name, hub_major, tf_version)
    return results


def scenario(results, name):
    r = results[name]
    assert "crashed" not in r, f"[{results['_stack'][0]}] scenario {name} crashed:\n{r.get('crashed')}"
    return r


def test_stack_versions(roundtrip):
    name, hub_major, tf_version = roundtrip["_stack"]
    versions = roundtrip["versions"]
    if hub_major:
        assert versions["huggingface_hub"].startswith(hub_major), versions
        assert "site-packages" not in versions["huggingface_hub_file"], versions  # the side install won
    if tf_version:
        assert versions["transformers"].startswith(tf_version), versions
    assert roundtrip["unknown_requests"] == []  # the server knew every endpoint the clients called


def test_model_push_pull_exact(roundtrip):
    r = scenario(roundtrip, "model")
    assert r["class"] == "HybridLlamaForCausalLM"
    assert r["diff_by_sha"] == 0.0 and r["diff_main"] == 0.0
    # a second push to a branch: each revision loads its own weights, and they do differ
    assert r["v1_v2_differ"] > 1e-2
    assert r["diff_dev"] == 0.0 and r["diff_main_after_dev"] == 0.0
    assert r["dev_commit"] != r["commit"]
    # model.push_to_hub (the native method) pushes the hybrid card too, with the user's tag added
    assert "hybrid-linear-swa" in r["dev_card_text"] and "my-tag" in r["dev_card_text"]
    assert "import hf_hybrid_attn" in r["dev_card_text"]
    assert r["native_bad_kwarg"]["type"] == "ValueError" and "safe_serialization" in r["native_bad_kwarg"]["message"]
    assert "model.safetensors" in r["files"] and "config.json" in r["files"]
    assert not [f for f in r["files"] if f.endswith((".bin", ".pt", ".pth"))]


def test_model_card_round_trip(roundtrip):
    r = scenario(roundtrip, "model")
    meta, text = r["card_meta"], r["card_text"]
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert hub.TAG in meta["tags"] and "hedgecats" in meta["tags"]
    assert "import hf_hybrid_attn" in text
    assert "Recipe **hedgecats**" in text and "5,120" in text  # 3,072 + 2,048 training tokens
    assert "| `hybrid` | 20.5 | 22.25 |" in text and "| `swa_only` | 20.5 | 23.75 |" in text
    assert "| 0.125 | 0.250 |" in text
    assert "](diagnostics/la_share.png)" in text and "diagnostics/la_share.png" in r["files"]
    assert "speculative" in text
    assert "README.md" in r["files"]


def test_adapter_push_pull(roundtrip):
    r = scenario(roundtrip, "adapter")
    assert r["diff_hub"] == 0.0 and r["diff_hub_vs_local"] == 0.0
    assert r["diff_vs_base"] > 1e-2  # the adapter changes the model, so the comparison can fail
    assert r["adapter_base"] == REPO
    assert "adapter_model.safetensors" in r["files"] and not [f for f in r["files"] if f.endswith(".bin")]
    assert r["card_meta"]["library_name"] == "peft" and r["card_meta"]["base_model"] == REPO
    assert hub.TAG in r["card_meta"]["tags"]
    assert f'PeftModel.from_pretrained(base, "{ADAPTER_REPO}")' in r["card_text"]


def test_push_without_token(roundtrip):
    r = scenario(roundtrip, "no_token")
    for key in ("push", "adapter"):
        assert r[key]["type"] == "ValueError" and "HF_TOKEN" in r[key]["message"], r[key]
    assert "401" in r["raw_upload"]["message"]
    assert r["commits_added"] == 0


def test_untrained_feature_maps_warn(roundtrip):
    r = scenario(roundtrip, "untrained")
    assert [w[0] for w in r["warnings"]].count("UntrainedFeatureMapsWarning") == 1
    assert r["warnings_when_trained"] == []
    assert "**Not trained.**" in r["card_text"]


def test_interrupted_upload_keeps_previous_revision(roundtrip):
    r = scenario(roundtrip, "interrupted")
    for mode in ("disconnect", "error"):
        m = r[mode]
        assert m["error"]["type"] is not None, m
        assert m["head_unchanged"] and m["commits_added"] == 0
        assert m["diff_after"] == 0.0  # the previous revision still loads, bit for bit
    assert len(r["push_after"]) == 40


def test_invalid_card_refused_before_upload(roundtrip):
    r = scenario(roundtrip, "invalid_card")
    assert r["server_refused"]["type"] == "ValueError" and "license" in r["server_refused"]["message"]
    assert r["local_refused"]["type"] == "ValueError" and "tags" in r["local_refused"]["message"]
    assert r["base_model_refused"]["type"] == "ValueError" and "base_model" in r["base_model_refused"]["message"]
    assert "POST /api/validate-yaml" in r["requests"]
    assert not [q for q in r["requests"] if "/commit/" in q or "/preupload/" in q or "/repos/create" in q]
    assert r["repo_exists"] is False


def test_cli_push(roundtrip):
    r = scenario(roundtrip, "cli")
    assert r["rc"] == 0 and len(json.loads(r["stdout"])["commit"]) == 40
    assert r["card_meta"]["license"] == "mit"
    assert {"diagnostics/diagnostics.json", "diagnostics/la_share.png", "model.safetensors"} <= set(r["files"])
    assert r["missing_dir"]["type"] == "SystemExit" and "DIR" in r["missing_dir"]["message"]


# ---- in-process checks (no HTTP) ---------------------------------------------------------------
def _tiny(seed=0):
    from hub_roundtrip import tiny_hybrid

    return tiny_hybrid(seed, trained=False)


def test_feature_map_training_detection():
    model = _tiny()
    assert hub.feature_maps_untrained(model.state_dict(), "hedgehog") is True
    with torch.no_grad():
        next(iter(hha.iter_hybrid_attention(model)))[1].hybrid.feature_map_k.weight[0, 0, 0] += 1e-3
    assert hub.feature_maps_untrained(model.state_dict(), "hedgehog") is False
    assert hub.feature_maps_untrained({}, "hedgehog") is None
    fresh = hha.convert(_tiny_base(), hha.HybridConfig(window=4, feature_map="identity_elu"))
    assert hub.feature_maps_untrained(fresh.state_dict(), "identity_elu") is None  # nothing to train


def _tiny_base():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_card_for_smollm2_teacher_shape():
    config = {"model_type": "hybrid_llama", "hidden_size": 576, "vocab_size": 49152, "num_attention_heads": 9,
              "num_key_value_heads": 3, "num_hidden_layers": 30, "head_dim": 64,
              "hybrid": hha.HybridConfig().to_dict()}
    card = hub.render_model_card(config, "me/smollm2-hybrid")
    meta = card.data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "SmolLM2-135M-Instruct (Q4_1, dequantized)" in card.text and "Q4_1) GGUF, dequantized" in card.text
    assert "**Not trained.**" in card.text and "| Converted layers | all 30 |" in card.text
    # explicit card_data wins over what the checkpoint suggests, tags are merged
    card = hub.render_model_card(config, "me/x", card_data={"license": "mit", "tags": ["extra"], "base_model": "org/b"})
    meta = card.data.to_dict()
    assert (meta["license"], meta["base_model"]) == ("mit", "org/b") and meta["tags"][0] == hub.TAG and "extra" in meta["tags"]
    hub.validate_card(card, check_remote=False)
    for bad in ("not a repo id!", ["org/ok", "/abs/local/path"]):
        with pytest.raises(ValueError, match="card_data: .*'base_model' must be a Hub repo id"):
            hub.validate_card(hub.render_model_card(config, "me/x", card_data={"base_model": bad}), check_remote=False)


def test_diagnostics_tables_shapes():
    tables = hub.diagnostics_tables({"tasks": {"piqa": {"hybrid": 0.61, "swa_only": 0.6}, "arc": {"hybrid": 0.5, "swa_only": 0.5}}})
    assert tables == [{"title": "tasks", "columns": ["mode", "piqa", "arc"],
                       "rows": [["`hybrid`", "0.61", "0.5"], ["`swa_only`", "0.6", "0.5"]]}]
    assert hub.diagnostics_tables(None) == [] and hub.diagnostics_tables({"unrelated": 1}) == []


def test_training_summary():
    assert hub.training_summary({})["trained"] is False
    s = hub.training_summary({"recipe": "ssd", "stages": {"transfer": {"steps_done": 4, "tokens": 1000},
                                                          "finetune": {"steps_done": 0, "tokens": None}}})
    assert s["trained"] is True and s["total_tokens"] == 1000 and s["total_tokens_text"].startswith("1,000")


def test_bad_inputs_fail_before_any_request(tmp_path):
    # no server runs here: each error must come from the local checks
    model = _tiny()
    with pytest.raises(ValueError, match="repo_id"):
        hub.push_to_hub(model, "not a repo", token="t")
    with pytest.raises(ValueError, match="revision"):
        hub.push_to_hub(model, "me/x", token="t", revision="a" * 40)
    with pytest.raises(ValueError, match="token"):
        hub.push_to_hub(model, "me/x", token="")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors-only"):
        hub.push_to_hub(tmp_path / "m", "me/x", token="t")
    with pytest.raises(ValueError, match="no config.json"):
        hub.push_to_hub(tmp_path, "me/x", token="t")
    with pytest.raises(ValueError, match="PeftModel|push_adapter|expected"):
        hub.push_to_hub(object(), "me/x", token="t")
    with pytest.raises(ValueError, match="diagnostics"):
        hub.push_to_hub(model, "me/x", token="t", diagnostics=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="adapter_config.json"):
        hub.push_adapter(tmp_path, "me/x", token="t")


_ISOLATED_LOAD = r"""
import json, sys
sys.modules["hf_hybrid_attn"] = None  # importing the package anywhere below now raises ImportError
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ref = torch.load(sys.argv[2])
with torch.no_grad():
    diff = float((model(ref["ids"]).logits - ref["logits"]).abs().max())
    gen = model.generate(ref["ids"][:1, :8], max_new_tokens=6, do_sample=False)
leaked = sorted(k for k, v in sys.modules.items() if k.startswith("hf_hybrid_attn") and v is not None)
print(json.dumps({"module": type(model).__module__, "diff": diff, "same_generation": bool(torch.equal(gen, ref["gen"])),
                  "leaked": leaked}))
"""


def test_export_remote_code_loads_without_the_package(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from hub_roundtrip import _ids, tiny_hybrid

    model = tiny_hybrid(seed=0)
    ids = _ids()
    with torch.no_grad():
        ref = {"ids": ids, "logits": model(ids).logits, "gen": model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)}
    torch.save(ref, tmp_path / "ref.pt")
    out = hub.export_remote_code(model, str(tmp_path / "export"))
    files = set(os.listdir(out))
    assert {"modeling_hybrid.py", "hha_modeling.py", "model.safetensors"} <= files and "hybrid_loader.py" not in files
    assert json.loads((tmp_path / "export" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_hybrid.HybridLlamaForCausalLM"
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "ckpt")  # nothing may point back into the repo
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", _ISOLATED_LOAD, str(moved), str(tmp_path / "ref.pt")],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["leaked"] == []
    assert result["diff"] == 0.0 and result["same_generation"]
    # with the package imported, the same folder loads through the registered classes
    again = AutoModelForCausalLM.from_pretrained(out)
    assert type(again).__module__ == "hf_hybrid_attn.modeling"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref["logits"])
    _tiny_base().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a converted hybrid checkpoint"):
        hub.export_remote_code(str(tmp_path / "plain"), str(tmp_path / "plain"))


def test_remote_code_repo_loads_from_the_hub_without_the_package(roundtrip):
    r = scenario(roundtrip, "remote_code")
    assert {"modeling_hybrid.py", "hha_modeling.py", "model.safetensors"} <= set(r["files"])
    assert "hybrid_loader.py" not in r["files"]
    assert r["module"].startswith("transformers_modules.") and r["leaked"] == []
    assert r["diff"] == 0.0


def test_cli_push_refuses_remote_code_for_an_adapter(tmp_path):
    import argparse

    (tmp_path / "adapter_config.json").write_text("{}")
    parser = argparse.ArgumentParser()
    hub.add_push_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["push", str(tmp_path), "me/x", "--remote-code"])
    with pytest.raises(SystemExit, match="--remote-code: DIR is a PEFT adapter"):
        args.func(args)
