"""The one loader (hf_hybrid_attn.loading): save_pretrained folders, truncation, clear errors."""

import subprocess
import sys

import pytest
import torch

import hf_hybrid_attn as hha
from conftest import tiny_model
from hf_hybrid_attn.loading import NAMED_TEACHERS, cli_load_model, display_name, load_model, truncate_layers


def _tokenizer(pad: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate("the cat sat on a mat".split())}}
    if pad:
        vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **extra)


@pytest.fixture
def llama_dir(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "llama")
    _tokenizer().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


def test_loads_a_save_pretrained_directory(llama_dir):
    folder, ref = llama_dir
    model, tok = load_model(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name
    assert tok.pad_token == tok.eos_token == "<eos>"  # none saved: EOS stands in
    ids = tok("the cat sat", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5]]
    half, _ = load_model(folder, "bfloat16", device="cpu")  # a PathLike works too
    assert half.dtype == torch.bfloat16


def test_keeps_a_saved_pad_token(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    _tokenizer(pad=True).save_pretrained(tmp_path)
    _, tok = load_model(str(tmp_path))
    assert tok.pad_token == "<pad>"


def test_loads_a_converted_folder(llama_dir, tmp_path):
    folder, _ = llama_dir
    model, tok = load_model(str(folder))
    hha.convert(model, hha.HybridConfig(window=4, feature_dim=8))
    model.save_pretrained(tmp_path / "hybrid")
    tok.save_pretrained(tmp_path / "hybrid")
    loaded, _ = load_model(str(tmp_path / "hybrid"), num_layers=1)
    assert type(loaded).__name__ == "HybridLlamaForCausalLM"
    assert len(loaded.model.layers) == loaded.config.num_hidden_layers == 1
    assert hasattr(loaded.model.layers[0].self_attn, "hybrid")


def test_num_layers_keeps_layer_types_consistent(tmp_path):
    types = ["full_attention", "sliding_attention", "full_attention"]
    tiny_model("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
               layer_types=types).save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), num_layers=2)
    assert len(model.model.layers) == model.config.num_hidden_layers == 2
    assert model.config.layer_types == types[:2]
    out = model(torch.tensor([[3, 4, 5, 6]]))
    assert out.logits.shape == (1, 4, 99)
    model.save_pretrained(tmp_path / "cut")  # the cut config is self-consistent: it reloads
    again, _ = load_model(str(tmp_path / "cut"))
    assert again.config.layer_types == types[:2]


def test_truncate_layers_directly():
    model = tiny_model("llama")
    assert truncate_layers(model, None) is model and len(model.model.layers) == 2
    truncate_layers(model, 1)
    assert len(model.model.layers) == model.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match=r"^num_layers: expected an int in 1\.\.1, got 2$"):
        truncate_layers(model, 2)


def test_errors_name_the_argument(llama_dir, tmp_path):
    folder, _ = llama_dir
    with pytest.raises(ValueError, match=r"^name: '.*/nope' is not 'smollm2', 'gemma3-270m', an existing model directory or a \.gguf file$"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^name: directory .* has no config.json \(not a save_pretrained folder\)$"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"^name: GGUF file .*missing\.gguf' does not exist$"):
        load_model(str(tmp_path / "missing.gguf"))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"^num_layers: expected an int >= 1, got"):
            load_model(str(folder), num_layers=bad)
    with pytest.raises(ValueError, match=r"^num_layers: expected an int in 1\.\.2, got 3$"):
        load_model(str(folder), num_layers=3)
    with pytest.raises(ValueError, match=r"^dtype: expected one of"):
        load_model(str(folder), "float64")
    with pytest.raises(ValueError, match="^name: expected"):
        load_model(None)


def test_cli_wrapper_names_the_flag(llama_dir, tmp_path):
    folder, _ = llama_dir
    with pytest.raises(SystemExit, match=r"^--model: .* is not 'smollm2', 'gemma3-270m', an existing model directory"):
        cli_load_model(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match=r"^MODEL: .* is not 'smollm2'"):
        cli_load_model(str(tmp_path / "nope"), flag="MODEL")
    with pytest.raises(SystemExit, match=r"^--num-layers: expected an int in 1\.\.2, got 5$"):
        cli_load_model(str(folder), num_layers=5)
    with pytest.raises(SystemExit, match=r"^--dtype: expected one of"):
        cli_load_model(str(folder), "int8")


def test_named_teachers_and_display_names():
    assert "smollm2" in NAMED_TEACHERS
    assert display_name("smollm2") == "SmolLM2-135M-Instruct (Q4_1, dequantized)"
    assert display_name("runs/x") == "runs/x"


def test_module_graph():
    """families is a leaf (no package, torch or transformers import); modeling does not import hub;
    demo does not import the CLI."""
    code = """
import importlib.util, os, sys
spec = importlib.util.find_spec("hf_hybrid_attn")  # locates the package without importing it
path = os.path.join(list(spec.submodule_search_locations)[0], "families.py")
alone = importlib.util.spec_from_file_location("families_alone", path)
f = importlib.util.module_from_spec(alone)
alone.loader.exec_module(f)
assert not {"torch", "transformers", "hf_hybrid_attn"} & set(sys.modules), "families is not a leaf"
assert list(f.FAMILIES) == ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
import hf_hybrid_attn.modeling as m
assert m.FAMILIES == f.FAMILIES
assert "hf_hybrid_attn.hub" not in sys.modules, "modeling imports hub"
import hf_hybrid_attn.demo
assert "hf_hybrid_attn.cli" not in sys.modules, "demo imports cli"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
