"""An independent log-likelihood scorer for multiple-choice tasks (lm-eval's conventions, own code).

    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=16)
    result = evaluate_task(scorer, "piqa", limit=200)        # {"acc": ..., "acc_norm": ..., "n": 200, ...}

Tokenisation follows lm-eval's HFLM for causal models, so both tools score identical token ids:
- trailing spaces of the context move to the continuation;
- `whole = tok(context + continuation)`, `ctx = tok(context)`, `cont = whole[len(ctx):]`, with the
  tokenizer's default special tokens (for SmolLM2: none, the project's no-BOS convention);
- an empty context is replaced by the prefix token (BOS, else EOS);
- the model reads `(ctx + cont)[-(max_length + 1):][:-1]` and the last `len(cont)` positions score `cont`.

Identical model inputs are run once (MMLU's four single-letter answers share one forward). Batches
are sorted by length and padded on the left by default: every row then ends at the same position, so
only the last `max(len(cont))` logits are materialised (`logits_to_keep`). Right padding is supported
too (all logits are computed). Position ids follow the attention mask, so padding never shifts RoPE.

`share_context=True` (the default) reads each distinct context once: the contexts of a batch run
with the model's own cache (a `HybridCache` for a hybrid model), the cache rows are repeated once
per choice, and only the continuations run on top. The log-probs are those of the full forward
(the cached continuation equals the uncached forward, which the tests check per component mode), at
a fraction of the tokens: a 5-choice passkey prompt costs one context instead of five. Requests that
need truncation to `max_length`, and those whose context is shorter than `SHARE_MIN_RATIO` times
their longest continuation (too little to save, e.g. HellaSwag), take the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .tasks import MultipleChoiceDoc, load_task, task_info

DEFAULT_MAX_LENGTH = 2048
SHARE_MIN_RATIO = 2.0  # share_context: contexts at least this many times their longest continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's HFLM splits them for a causal model."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation)["input_ids"]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def model_max_length(model, default: int = DEFAULT_MAX_LENGTH) -> int:
    """lm-eval's rule: the first of n_positions / max_position_embeddings / n_ctx in the config."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@dataclass
class LoglikelihoodScorer:
    """Summed log-likelihoods of continuations under `model` (any causal LM, hybrid or not)."""

    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 16
    max_batch_tokens: int = 32768  # caps padded tokens per forward (long 5-shot MMLU prompts)
    padding_side: str = "left"
    max_length: int | None = None
    progress: bool = True
    share_context: bool = True
    stats: dict = field(default_factory=lambda: {"forwards": 0, "sequences": 0, "tokens": 0})

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {self.padding_side!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")
        if self.max_length is None:
            self.max_length = model_max_length(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy decode) per request."""
        return self.loglikelihood_tokens([encode_pair(self.tokenizer, c, x) for c, x in requests], desc)

    @torch.no_grad()
    def loglikelihood_tokens(
        self, requests: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        # distinct model inputs -> the requests (index, continuation) read from them; MMLU's four
        # one-token answers share one input, so they cost one forward
        inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        contexts: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("requests: a continuation encodes to zero tokens")
            if self.share_context and len(ctx) + len(cont) <= self.max_length + 1 and ctx:
                contexts.setdefault(tuple(ctx), []).append((i, list(cont)))
                continue
            inp = tuple((list(ctx) + list(cont))[-(self.max_length + 1) :][:-1])
            inputs.setdefault(inp, []).append((i, list(cont)))
        # a context shorter than SHARE_MIN_RATIO x its longest continuation saves too little for the
        # second forward to pay (HellaSwag on CPU); those requests take the plain path
        for ctx in [c for c, reqs in contexts.items() if len(c) < SHARE_MIN_RATIO * max(len(x) for _, x in reqs)]:
            for i, cont in contexts.pop(ctx):
                inputs.setdefault(tuple((list(ctx) + cont)[:-1]), []).append((i, cont))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = [("plain", b) for b in self._batches(sorted(inputs, key=lambda s: -len(s)))]  # longest first
        batches += [("shared", b) for b in self._batches(sorted(contexts, key=lambda s: -len(s)), contexts)]
        was_training = self.model.training
        self.model.eval()
        try:
            for kind, batch in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
                if kind == "plain":
                    self._score_batch(batch, inputs, out)
                else:
                    self._score_shared(batch, contexts, out)
        finally:
            self.model.train(was_training)
        return out

    def _score_shared(self, batch: list[tuple[int, ...]], contexts, out) -> None:
        """One forward over the batch's distinct contexts with the model's cache, then one over every
        choice's continuation (all but its last token) on a copy of its context's cache rows."""
        from ..compat import cache_kwargs, output_cache

        ids, mask = self._pad(batch, "left")
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        res = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=position_ids.to(self.device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [G, V]: predicts each cont[0]
        self._count(ids.shape[0], int(mask.sum()))
        rows = [(g, i, cont) for g, ctx in enumerate(batch) for i, cont in contexts[ctx]]
        longest = max(len(cont) for _, _, cont in rows) - 1
        rest = None
        if longest > 0:
            cache = output_cache(res)
            cache.batch_select_indices(torch.tensor([g for g, _, _ in rows], device=self.device))
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            suffix = torch.full((len(rows), longest), pad_id, dtype=torch.long)
            smask = torch.zeros((len(rows), longest), dtype=torch.long)
            for r, (_, _, cont) in enumerate(rows):  # right padding: real tokens never see a pad
                suffix[r, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                smask[r, : len(cont) - 1] = 1
            gidx = torch.tensor([g for g, _, _ in rows])
            full_mask = torch.cat([mask[gidx], smask], dim=1)
            spos = mask[gidx].sum(1, keepdim=True) + torch.arange(longest)[None]
            logits = self.model(input_ids=suffix.to(self.device), attention_mask=full_mask.to(self.device),
                                position_ids=spos.to(self.device), use_cache=True,
                                **cache_kwargs(cache, self.model)).logits
            rest = torch.log_softmax(logits.float(), dim=-1)  # [R, longest, V]
            self._count(len(rows), int(smask.sum()))
            del cache
        del res
        for r, (g, i, cont) in enumerate(rows):
            parts = [first[g : g + 1]] + ([rest[r, : len(cont) - 1]] if len(cont) > 1 else [])
            part = torch.cat(parts, dim=0)  # [len(cont), V]
            target = torch.tensor(cont, dtype=torch.long, device=part.device)
            out[i] = (float(part.gather(1, target[:, None]).sum()), bool((part.argmax(-1) == target).all()))

    def _count(self, sequences: int, tokens: int) -> None:
        self.stats["forwards"] += 1
        self.stats["sequences"] += sequences
        self.stats["tokens"] += tokens

    def _score_batch(self, batch, inputs, out) -> None:
        """Scores every request read from this batch's rows into `out`. Only (log-likelihood, greedy)
        floats outlive the call, never the [tokens, vocab] log-probs (keeping those for a whole
        split would take ~150 GB on HellaSwag)."""
        keep = [max(len(c) for _, c in inputs[s]) for s in batch]
        for inp, lp in zip(batch, self._forward(batch, keep)):
            for i, cont in inputs[inp]:
                part = lp[-len(cont) :]  # [len(cont), V] log-probs predicting each cont token
                target = torch.tensor(cont, dtype=torch.long, device=part.device)
                ll = float(part.gather(1, target[:, None]).sum())
                out[i] = (ll, bool((part.argmax(-1) == target).all()))

    def _batches(self, ordered: list[tuple[int, ...]], choices: dict | None = None) -> list[list[tuple[int, ...]]]:
        """Consecutive runs of `ordered` (longest first, so the first row fixes the padded width) of at
        most batch_size rows and max_batch_tokens padded tokens; with `choices` (shared contexts), a
        context counts as one row per choice, its continuations being run as rows too."""
        batches, current, rows = [], [], 0
        for seq in ordered:
            n = len(choices[seq]) if choices is not None else 1
            width = len(current[0]) if current else len(seq)
            if current and (rows + n > self.batch_size or (rows + n) * width > self.max_batch_tokens):
                batches.append(current)
                current, rows = [], 0
            current.append(seq)
            rows += n
        if current:
            batches.append(current)
        return batches

    def _pad(self, batch: list[tuple[int, ...]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in batch)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
        return ids, mask

    def _forward(self, batch: list[tuple[int, ...]], keep: list[int]) -> list[torch.Tensor]:
        """Log-probs at the last `keep[row]` real positions of each row, [keep[row], V] fp32 (model device)."""
        ids, mask = self._pad(batch, self.padding_side)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=position_ids.to(self.device), use_cache=False)
        if self.padding_side == "left":  # every row ends at `width`: only the tail is needed
            kwargs["logits_to_keep"] = max(keep)
        logits = self.model(**kwargs).logits
        self._count(len(batch), int(mask.sum()))
        out = []
        for row, seq in enumerate(batch):
            end = logits.shape[1] if self.padding_side == "left" else len(seq)
            out.append(torch.log_softmax(logits[row, end - keep[row] : end].float(), dim=-1))
        return out


def _stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_multiple_choice(docs: Sequence[MultipleChoiceDoc], lls: Sequence[float]) -> dict:
    """acc / acc_norm / acc_norm_cont from flattened per-choice log-likelihoods (docs' choices in order).

    acc: argmax of the summed log-likelihood. acc_norm: lm-eval's, divided by the choice's length in
    characters (no target delimiter). acc_norm_cont: divided by the UTF-8 bytes of the scored
    continuation, delimiter included -- the convention of the reference scorer behind the teacher
    numbers in ASSETS.md (it moves ARC-Challenge acc_norm from 0.314 to 0.298 for the teacher).
    Ties go to the first choice (numpy argmax, as in lm-eval)."""
    expected = sum(len(d.continuations) for d in docs)
    if len(lls) != expected:
        raise ValueError(f"lls: expected {expected} log-likelihoods (one per choice), got {len(lls)}")

    def argmax(xs: list[float]) -> int:
        return max(range(len(xs)), key=lambda i: (xs[i], -i))

    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_norm_cont": []}
    preds = []
    pos = 0
    for d in docs:
        doc_lls = list(lls[pos : pos + len(d.continuations)])
        pos += len(d.continuations)
        pred = argmax(doc_lls)
        pred_norm = argmax([ll / len(c) for ll, c in zip(doc_lls, d.choices)])
        pred_cont = argmax([ll / len(c.encode("utf-8")) for ll, c in zip(doc_lls, d.continuations)])
        for name, p in (("acc", pred), ("acc_norm", pred_norm), ("acc_norm_cont", pred_cont)):
            hits[name].append(float(p == d.gold))
        preds.append({"doc_id": d.doc_id, "gold": d.gold, "pred": pred, "pred_norm": pred_norm,
                      "pred_norm_cont": pred_cont, "lls": doc_lls})
    result: dict = {"n": len(docs)}
    for name, values in hits.items():
        result[name] = sum(values) / len(values) if values else float("nan")
        result[f"{name}_stderr"] = _stderr(values)
    result["predictions"] = preds
    return result


def evaluate_docs(scorer: LoglikelihoodScorer, docs: Sequence[MultipleChoiceDoc], desc: str = "") -> dict:
    lls = [ll for ll, _ in scorer.loglikelihood([r for d in docs for r in d.requests], desc=desc or "score")]
    return score_multiple_choice(docs, lls)


def evaluate_task(scorer: LoglikelihoodScorer, name: str, limit: int | None = None,
                  keep_predictions: bool = False) -> dict:
    """Score task `name` (see `tasks.TASKS`); returns n, acc, acc_norm, acc_norm_cont (+ stderr), primary."""
    info = task_info(name)
    result = evaluate_docs(scorer, load_task(name, limit), desc=name)
    if "acc_norm" not in info.metrics:  # e.g. winogrande: lm-eval reports acc only
        for key in ("acc_norm", "acc_norm_stderr", "acc_norm_cont", "acc_norm_cont_stderr"):
            result.pop(key)
    if not keep_predictions:
        result.pop("predictions")
    result["task"] = name
    result["primary_metric"] = info.primary_metric
    result["primary"] = result[info.primary_metric]
    return result
