"""Long-context probes and prompt-length statistics.

Passkey retrieval: a 5-digit key is stated once, followed by `distance` tokens of filler and a
question. The model picks the key among 5 candidates by log-likelihood (chance 0.2). At distances
well beyond the window w, a window-only model cannot see the key; only the linear branch (or full
softmax) can carry it. The items are multiple-choice documents, so the same scorer rates them.

Prompt lengths: how many tokens each task's requests have, against the window. The paper's point is
that PIQA / ARC / HellaSwag / Winogrande prompts mostly fit inside a 64-token window, so they cannot
tell a hybrid from its window-only part; 5-shot MMLU and the passkey probe can.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

from .scorer import LoglikelihoodScorer, encode_pair, evaluate_docs
from .tasks import MultipleChoiceDoc

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_DISTANCES = (256, 512, 1024)


def passkey_docs(tokenizer, distance: int, n_items: int = 10, n_choices: int = 5, seed: int = 0) -> list[MultipleChoiceDoc]:
    """`n_items` passkey questions whose key sits about `distance` tokens before the answer."""
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 1:
        raise ValueError(f"distance: expected an int >= 1 (tokens between key and question), got {distance!r}")
    if n_choices < 2:
        raise ValueError(f"n_choices: expected >= 2, got {n_choices!r}")
    rng = random.Random(f"passkey-{seed}-{distance}")
    filler_tokens = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    question_tokens = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    docs = []
    for i in range(n_items):
        keys = rng.sample(range(10000, 100000), n_choices)
        key = keys[0]
        repeats = max(0, math.ceil((distance - question_tokens) / filler_tokens))  # at least `distance`
        context = f"{INTRO}The pass key is {key}. Remember it. {key} is the pass key.\n" + FILLER * repeats + QUESTION
        gold = rng.randrange(n_choices)
        keys[0], keys[gold] = keys[gold], keys[0]
        choices = tuple(str(k) for k in keys)
        docs.append(MultipleChoiceDoc(f"passkey@{distance}", i, (context,) * n_choices,
                                      tuple(f" {c}" for c in choices), choices, gold))
    return docs


def key_distance(tokenizer, doc: MultipleChoiceDoc) -> int:
    """Tokens from the end of the key's last mention to the end of the context."""
    context = doc.contexts[0]
    key = doc.choices[doc.gold]
    tail = context[context.rindex(f"{key} is the pass key.") + len(key) :]
    return len(tokenizer(tail, add_special_tokens=False)["input_ids"])


def passkey_probe(scorer: LoglikelihoodScorer, distances: Sequence[int] = DEFAULT_DISTANCES, n_items: int = 10,
                  seed: int = 0) -> dict:
    """{"passkey@D": {"acc", "n", "distance_tokens"}} for each distance D."""
    out = {}
    for d in distances:
        docs = passkey_docs(scorer.tokenizer, d, n_items=n_items, seed=seed)
        res = evaluate_docs(scorer, docs, desc=f"passkey@{d}")
        out[f"passkey@{d}"] = {"acc": res["acc"], "n": res["n"], "chance": 1 / len(docs[0].choices),
                               "distance_tokens": key_distance(scorer.tokenizer, docs[0])}
    return out


def doc_lengths(tokenizer, docs: Sequence[MultipleChoiceDoc]) -> list[int]:
    """Per document, the tokens of its longest request (context + continuation, as the model reads
    them): what decides whether the document fits in the window."""
    return [max(len(c) + len(x) - 1 for c, x in (encode_pair(tokenizer, *r) for r in d.requests)) for d in docs]


def prompt_lengths(tokenizer, docs: Sequence[MultipleChoiceDoc], window: int) -> dict:
    """Distribution of request lengths (context + continuation tokens, as the model reads them)."""
    if not docs:
        raise ValueError("docs: expected at least one document")
    lengths = sorted(doc_lengths(tokenizer, docs))

    def quantile(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    return {
        "n": len(lengths), "window": window, "min": lengths[0], "median": statistics.median(lengths),
        "p90": quantile(0.9), "max": lengths[-1], "mean": statistics.fmean(lengths),
        "fraction_longer_than_window": sum(n > window for n in lengths) / len(lengths),
    }
