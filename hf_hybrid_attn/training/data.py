"""Training data: real text packed into fixed-length blocks, with a held-out split by document.

Documents are tokenised without special tokens, each followed by EOS, concatenated, and cut into
`seq_len` blocks (the tail that does not fill a block is dropped). Packed blocks contain no padding,
which the hybrid layer needs (a packed-sequence mask is not expressible in its linear state: the
EOS separator is the document boundary the model learns, as in LoLCATs' packed Alpaca).

Documents and their held-out split come from `hf_hybrid_attn.documents` (sources listed there);
evaluation scores perplexity on the same held-out side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..assets import bos_id_if_needed
from ..documents import CORPORA, DEFAULT_SEED, DEFAULT_VAL_FRACTION, load_documents, split_documents

__all__ = ["CORPORA", "DEFAULT_SEED", "DEFAULT_VAL_FRACTION", "load_documents", "split_documents",
           "pack_token_ids", "PackedData", "build_packed_data", "PackedDataset"]


def pack_token_ids(docs_ids: Sequence[Sequence[int]], seq_len: int, eos_id: int, max_blocks: int | None = None,
                   bos_id: int | None = None) -> torch.Tensor:
    """Concatenate [doc, EOS, doc, EOS, ...] and cut into `seq_len` blocks -> LongTensor [N, seq_len].
    With `bos_id` (models that need BOS, e.g. Gemma) every block is BOS + seq_len-1 tokens."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an integer >= 2, got {seq_len!r}")
    if bos_id is not None:
        body = pack_token_ids(docs_ids, seq_len - 1, eos_id, max_blocks) if seq_len > 2 else None
        if body is None:
            raise ValueError(f"seq_len: expected an integer >= 3 with a BOS token, got {seq_len!r}")
        return torch.cat([torch.full((body.shape[0], 1), bos_id, dtype=torch.long), body], 1)
    flat: list[int] = []
    limit = None if max_blocks is None else max_blocks * seq_len
    for ids in docs_ids:
        flat.extend(ids)
        flat.append(eos_id)
        if limit is not None and len(flat) >= limit:
            break
    n = len(flat) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _tokenize(tokenizer, docs: Sequence[str], budget_tokens: int | None) -> list[list[int]]:
    out, total = [], 0
    for d in docs:  # one at a time so that a token budget stops tokenising early
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        out.append(ids)
        total += len(ids) + 1
        if budget_tokens is not None and total >= budget_tokens:
            break
    return out


@dataclass
class PackedData:
    """Packed train / validation blocks and how they were made."""

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    info: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return self.train.numel()

    @property
    def val_tokens(self) -> int:
        return self.val.numel()


def build_packed_data(
    tokenizer,
    source: Any = "sotu",
    seq_len: int = 1024,
    window: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_train_tokens: int | None = None,
    max_val_blocks: int | None = 64,
    seed: int = DEFAULT_SEED,
    text_field: str = "text",
) -> PackedData:
    """Tokenise, split by document (deterministic), pack. Raises clear errors for unusable sizes."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an integer >= 2, got {seq_len!r}")
    if window is not None and seq_len <= window:
        raise ValueError(
            f"seq_len ({seq_len}) must be larger than the window ({window}): only positions beyond the window "
            "use the linear branch, so shorter sequences cannot train it"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: has no eos_token_id, which separates packed documents")
    docs = load_documents(source, text_field)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    val_budget = None if max_val_blocks is None else (max_val_blocks + 1) * seq_len
    bos = bos_id_if_needed(tokenizer)
    val = pack_token_ids(_tokenize(tokenizer, val_docs, val_budget), seq_len, eos, max_val_blocks, bos)
    if val.shape[0] == 0:
        n_val = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in val_docs)
        raise ValueError(
            f"data: too few tokens for a validation split: the {len(val_docs)} held-out document(s) have {n_val} "
            f"tokens, fewer than one block of seq_len={seq_len}; raise val_fraction, lower seq_len or add text"
        )
    train_budget = None if max_train_tokens is None else max_train_tokens + seq_len
    max_blocks = None if max_train_tokens is None else max(1, -(-max_train_tokens // seq_len))
    train = pack_token_ids(_tokenize(tokenizer, train_docs, train_budget), seq_len, eos, max_blocks, bos)
    if train.shape[0] == 0:
        raise ValueError(f"data: too few tokens for training: fewer than one block of seq_len={seq_len}")
    info = {
        "source": source if isinstance(source, str) else type(source).__name__,
        "documents": len(docs),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "val_fraction": val_fraction,
        "seq_len": seq_len,
        "train_blocks": int(train.shape[0]),
        "val_blocks": int(val.shape[0]),
        "seed": seed,
        "eos_token_id": eos,
    }
    return PackedData(train=train, val=val, seq_len=seq_len, info=info)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a packed [N, T] tensor as causal-LM examples (labels = input_ids; the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.dtype != torch.long:
            raise ValueError(f"blocks: expected a LongTensor [num_blocks, seq_len], got {blocks.dtype} {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.blocks[i]
        return {"input_ids": row, "labels": row.clone()}
