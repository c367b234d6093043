"""Component diagnostics on the real teacher (SmolLM2-135M-Instruct, Q4_1 dequantized, first 2 layers)."""

import json

import pytest
import torch

import hf_hybrid_attn as hha
from hf_hybrid_attn import assets
from hf_hybrid_attn.diagnostics import diagnose, is_hybrid, main, softmax_view


def _load(num_layers=2):
    try:
        return assets.load_teacher(num_layers=num_layers)
    except assets.AssetMissingError as e:
        pytest.skip(f"offline asset missing: {e}")


@pytest.fixture(scope="module")
def converted():
    model, tok = _load()
    hha.convert(model, hha.HybridConfig(window=8))
    with torch.no_grad():  # move gamma away from 0.1 so both branches carry mass
        for _, attn in hha.iter_hybrid_attention(model):
            attn.hybrid.window_logit.fill_(0.0)
    return model, tok


def _ids(tok, n=40):
    text = assets.load_corpus("sotu")[-1]
    return torch.tensor([assets.tokenize_for_lm(tok, text)[:n]])


def test_each_mode_changes_the_computation(converted):
    model, tok = converted
    ids = _ids(tok)
    outs = {}
    with torch.no_grad():
        for mode in hha.COMPONENT_MODES:
            with hha.component_mode(model, mode):
                outs[mode] = model(ids, use_cache=False).logits
        with softmax_view(model):
            base = model(ids, use_cache=False).logits
    assert model.config._attn_implementation == "hybrid_linear_swa"  # restored after the softmax view
    modes = list(outs) + ["base"]
    outs["base"] = base
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-2, (a, b)
    # inside the window every mode that keeps the window equals softmax (query positions < w)
    for mode in ("hybrid", "swa_only"):
        torch.testing.assert_close(outs[mode][:, :8], base[:, :8], rtol=1e-4, atol=1e-4)


def test_none_mode_is_the_no_attention_model(converted):
    model, tok = converted
    ids = _ids(tok)

    def zero_attention(module, args, kwargs, output):
        return (torch.zeros_like(output[0]), *output[1:])

    with torch.no_grad(), softmax_view(model):
        hooks = [layer.self_attn.register_forward_hook(zero_attention, with_kwargs=True) for layer in model.model.layers]
        try:
            ref = model(ids, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
    with torch.no_grad(), hha.component_mode(model, "none"):
        out = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_swa_only_with_a_window_covering_the_sequence_is_the_teacher():
    model, tok = _load()
    ids = _ids(tok)
    with torch.no_grad():
        teacher = model(ids, use_cache=False).logits
    hha.convert(model, hha.HybridConfig(window=64))
    assert ids.shape[1] <= 64
    with torch.no_grad():
        for mode in ("swa_only", "hybrid"):  # with w >= T the linear part is empty: both are exact softmax
            with hha.component_mode(model, mode):
                torch.testing.assert_close(model(ids, use_cache=False).logits, teacher, rtol=1e-4, atol=2e-4)
        hha.set_window(model, 8)  # a short window makes swa_only differ from the teacher
        with hha.component_mode(model, "swa_only"):
            assert (model(ids, use_cache=False).logits - teacher).abs().max() > 1e-2


def test_diagnose_writes_a_consistent_report(converted, tmp_path):
    model, tok = converted
    res = diagnose(model, tok, tasks=("piqa", "mmlu_anatomy"), modes=("hybrid", "swa_only", "linear_only"),
                   limit=3, out_dir=tmp_path, block_size=48, perplexity_blocks=2, probe_distances=(40,),
                   probe_items=3, progress=False, log=lambda _: None)
    assert res["runs"] == ["hybrid", "swa_only", "linear_only", "base"] and res["window"] == 8
    for t in ("piqa", "mmlu_anatomy"):
        for run in res["runs"]:
            assert res["task_details"][run][t]["n"] == 3
        h = res["headline"][t]
        assert h["hybrid_minus_swa_only"] == pytest.approx(res["tasks"][t]["hybrid"] - res["tasks"][t]["swa_only"])
        assert h["hybrid_minus_linear_only"] == pytest.approx(res["tasks"][t]["hybrid"] - res["tasks"][t]["linear_only"])
    ppl = res["perplexity"]
    # positions < w see the whole prefix through the window: hybrid = swa_only = softmax there
    assert ppl["hybrid"]["inside"] == pytest.approx(ppl["swa_only"]["inside"], rel=1e-4)
    assert ppl["hybrid"]["inside"] == pytest.approx(ppl["base"]["inside"], rel=1e-3)
    assert ppl["hybrid"]["beyond"] != pytest.approx(ppl["swa_only"]["beyond"], rel=1e-3)
    assert res["perplexity_documents"] == {"held_out_of": "sotu", "val_fraction": 0.05, "seed": 0}
    share = torch.tensor(res["linear_share"])
    assert share.shape == (2, 9) and 0.0 < share.min() and share.max() < 1.0
    assert res["prompt_lengths"]["mmlu_anatomy"]["fraction_longer_than_window"] == 1.0
    assert res["probes"]["passkey@40"]["n"] == 3 and set(res["runs"]) <= set(res["probes"]["passkey@40"])

    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert saved["tasks"] == res["tasks"] and saved["linear_share"] == res["linear_share"]
    md = (tmp_path / "diagnostics.md").read_text()
    assert "| piqa | acc |" in md and "hybrid − swa_only" in md and "![LA share per layer and head](la_share.png)" in md
    import matplotlib.image

    for name in ("la_share.png", "modes.png", "perplexity_by_position.png"):
        img = matplotlib.image.imread(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name


def test_diagnose_a_plain_model_runs_once_as_base(tmp_path):
    model, tok = _load()
    assert not is_hybrid(model)
    res = diagnose(model, tok, tasks=("arc_easy",), limit=2, out_dir=tmp_path, window=16, block_size=32,
                   perplexity_blocks=1, probe_distances=None, progress=False, log=lambda _: None)
    assert res["runs"] == ["base"] and res["headline"] == {} and "linear_share" not in res
    assert res["perplexity"]["base"]["positions_inside"] == 16
    assert (tmp_path / "diagnostics.md").is_file() and not (tmp_path / "la_share.png").exists()


def test_diagnose_rejects_bad_arguments(converted):
    model, tok = converted
    with pytest.raises(ValueError, match="modes: expected a non-empty subset of"):
        diagnose(model, tok, tasks=("piqa",), modes=("hybrid", "softmax"))
    with pytest.raises(ValueError, match="task: expected one of"):
        diagnose(model, tok, tasks=("nope",))


def test_cli_on_a_saved_hybrid_checkpoint(converted, tmp_path, capsys):
    model, tok = converted
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "report"
    from hf_hybrid_attn.cli import main as hf_hybrid_main  # the installed `hf-hybrid` entry point

    rc = hf_hybrid_main(["diagnose", str(tmp_path / "ckpt"), "--tasks", "piqa", "--limit", "2", "--modes", "hybrid", "swa_only",
               "--no-base", "--ppl-blocks", "1", "--block-size", "32", "--probe-distances", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "piqa" in printed and "hybrid - swa_only" in printed
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved["runs"] == ["hybrid", "swa_only"] and saved["tasks"]["piqa"]["hybrid"] is not None
    with pytest.raises(SystemExit, match="MODEL: .* is not 'smollm2', 'gemma3-270m', an existing model directory or a .gguf file"):
        main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--limit: expected an integer >= 1"):
        main(["smollm2", "--limit", "0"])


def test_perplexity_uses_the_documents_the_model_s_training_held_out():
    """A model converted on a corpus is scored on that training run's held-out documents only."""
    from types import SimpleNamespace

    from hf_hybrid_attn.diagnostics import _held_out_split

    def model(training):
        return SimpleNamespace(config=SimpleNamespace(hybrid={"window": 64, "training": training}))

    trained = {"recipe": "hedgecats", "data": {"source": "sotu", "val_fraction": 0.1, "seed": 3}}
    assert _held_out_split(model(trained), "sotu") == (0.1, 3)
    assert _held_out_split(model(trained), "austen") == (0.05, 0)  # another corpus: convert's defaults
    assert _held_out_split(model(None), "sotu") == (0.05, 0)
    assert _held_out_split(SimpleNamespace(config=SimpleNamespace()), "sotu") == (0.05, 0)  # a plain model
