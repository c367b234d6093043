"""Perplexity split by position: where does context beyond the sliding window matter?

A block of `block_size` tokens is scored in one forward. The output at query position i predicts
token i+1. For i < w the window W(i) = {j : i-w < j <= i} already holds the whole prefix, so a
window-only model is exact there; for i >= w the keys older than i-w+1 are reachable only through
the linear branch. `inside` / `beyond` are the perplexities over those two groups of query positions
(SPEC §4, "where context matters"); `curve` bins them by position for the plot.

Blocks are cut from whole documents (never across a document boundary). For a named offline
corpus only the documents that the training pipeline holds out for validation are used
(`documents.split_documents` with the same `val_fraction` and `seed`; by default those of
`hf-hybrid convert`), latest first, so a model converted on that corpus is never scored on text it
was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..assets import bos_id_if_needed, tokenize_for_lm
from ..documents import DEFAULT_SEED, DEFAULT_VAL_FRACTION, load_documents, split_documents

DEFAULT_HELD_OUT = (DEFAULT_VAL_FRACTION, DEFAULT_SEED)  # (val_fraction, seed) of `hf-hybrid convert`


def held_out_documents(corpus: str, held_out: tuple[float, int] | None = DEFAULT_HELD_OUT) -> list[str]:
    """The documents of a named corpus that training with (val_fraction, seed) = held_out holds out
    (all documents when held_out is None), in corpus order."""
    docs = load_documents(corpus)
    if held_out is None:
        return docs
    val_fraction, seed = held_out
    return split_documents(docs, val_fraction, seed)[1]


def corpus_blocks(
    tokenizer, corpus: str | Sequence[str], block_size: int = 512, max_blocks: int = 8, from_end: bool = True,
    held_out: tuple[float, int] | None = DEFAULT_HELD_OUT,
) -> torch.Tensor:
    """[N, block_size] token ids: non-overlapping blocks cut from whole documents (no BOS, except for
    tokenizers that add one themselves, e.g. Gemma: then every block starts with it).

    corpus: a named offline corpus (only its held-out validation documents are used, see the
    module docstring; held_out=None uses them all) or a list of documents (used as given)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size: expected an int >= 2, got {block_size!r}")
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
        raise ValueError(f"max_blocks: expected an int >= 1, got {max_blocks!r}")
    docs = held_out_documents(corpus, held_out) if isinstance(corpus, str) else list(corpus)
    bos = bos_id_if_needed(tokenizer)  # models that need BOS (Gemma) get it in front of every block
    body = block_size - (bos is not None)
    blocks: list[list[int]] = []
    for doc in reversed(docs) if from_end else docs:
        ids = tokenize_for_lm(tokenizer, doc)
        for start in range(0, len(ids) - body + 1, body):
            blocks.append(([bos] if bos is not None else []) + ids[start : start + body])
            if len(blocks) == max_blocks:
                return torch.tensor(blocks, dtype=torch.long)
    if not blocks:
        raise ValueError(f"corpus: no document is at least block_size={block_size} tokens long")
    return torch.tensor(blocks, dtype=torch.long)


@torch.no_grad()
def nll_per_position(model, blocks: torch.Tensor, batch_size: int = 2, progress: bool = False) -> torch.Tensor:
    """[T-1] mean next-token NLL (nats) at each query position 0..T-2, averaged over the blocks."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks: expected a [N, T>=2] tensor of token ids, got shape {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    total = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)
            total += nll.sum(0).double().cpu()
    finally:
        model.train(was_training)
    return (total / len(blocks)).float()


def _bin_edges(length: int, window: int) -> list[int]:
    edges = {0, length}
    p = 8
    while p < length:
        edges.add(p)
        p *= 2
    if 0 < window < length:
        edges.add(window)
    return sorted(edges)


def split_by_window(nll: torch.Tensor, window: int) -> dict:
    """Perplexities inside (query position < window) and beyond, plus a binned curve."""
    nll = nll.double()
    inside, beyond = nll[:window], nll[window:]
    out = {
        "window": window,
        "inside": math.exp(float(inside.mean())) if len(inside) else float("nan"),
        "beyond": math.exp(float(beyond.mean())) if len(beyond) else float("nan"),
        "all": math.exp(float(nll.mean())),
        "positions_inside": int(len(inside)),
        "positions_beyond": int(len(beyond)),
    }
    edges = _bin_edges(len(nll), window)
    out["curve"] = [
        {"start": a, "end": b, "ppl": math.exp(float(nll[a:b].mean()))} for a, b in zip(edges[:-1], edges[1:])
    ]
    return out


def perplexity_by_position(
    model,
    tokenizer=None,
    window: int = 64,
    corpus: str | Sequence[str] = "sotu",
    block_size: int = 512,
    max_blocks: int = 4,
    batch_size: int = 2,
    blocks: torch.Tensor | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity inside / beyond the first `window` positions of `block_size`-token blocks.

    Pass `blocks` (from `corpus_blocks`) to reuse the same tokens across component modes."""
    if blocks is None:
        if tokenizer is None:
            raise ValueError("tokenizer: needed to cut blocks from the corpus (or pass blocks=)")
        blocks = corpus_blocks(tokenizer, corpus, block_size, max_blocks)
    result = split_by_window(nll_per_position(model, blocks, batch_size, progress), window)
    result["blocks"] = int(blocks.shape[0])
    result["block_size"] = int(blocks.shape[1])
    result["tokens_scored"] = int(blocks.shape[0] * (blocks.shape[1] - 1))
    return result
