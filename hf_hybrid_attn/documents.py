"""Documents of real text and the held-out split by document, shared by training (which trains on
the split's training side) and evaluation (which scores perplexity on the held-out side).

Sources (`load_documents`):
  "sotu" | "austen" | "boolq"  the offline corpora (`hf_hybrid_attn.assets.load_corpus`)
  path/to/file.txt         one document per block of text separated by blank lines
  path/to/file.jsonl       one document per line (field `text_field`)
  path/to/dir              every *.txt file in it (sorted) is one document
  hf:NAME[:CONFIG][@SPLIT] a `datasets` hub dataset (needs network or a local cache)
  arrow:PATH               a dataset saved with `datasets.save_to_disk`
  a datasets.Dataset, or a list of strings
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

CORPORA = ("sotu", "austen", "boolq")
DEFAULT_VAL_FRACTION = 0.05  # documents held out for validation (also what diagnostics score perplexity on)
DEFAULT_SEED = 0


def load_documents(source: Any, text_field: str = "text") -> list[str]:
    """The documents of `source` (see the module docstring), in a fixed order."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(d, str) for d in source):
            raise ValueError("data: a list source must contain strings (documents)")
        return [d for d in source if d.strip()]
    if hasattr(source, "column_names"):  # a datasets.Dataset
        if text_field not in source.column_names:
            raise ValueError(f"data: the dataset has no column {text_field!r}; columns are {source.column_names}")
        return [t for t in source[text_field] if isinstance(t, str) and t.strip()]
    if not isinstance(source, str):
        raise ValueError(f"data: expected a corpus name, a path, 'hf:NAME' or a list of strings, got {type(source).__name__}")
    if source in CORPORA:
        return _corpus_documents(source)
    if source.startswith("hf:"):
        import datasets

        spec, _, split = source[3:].partition("@")
        name, _, config = spec.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split or "train")
        return load_documents(ds, text_field)
    if source.startswith("arrow:"):
        import datasets

        ds = datasets.load_from_disk(source[len("arrow:") :])
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return load_documents(ds, text_field)
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.endswith(".txt"))
        if not files:
            raise ValueError(f"data: directory {source!r} contains no .txt files")
        docs = []
        for f in files:
            with open(os.path.join(source, f), encoding="utf-8") as fh:
                docs.append(fh.read())
        return [d for d in docs if d.strip()]
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as fh:
            if source.endswith(".jsonl"):
                return [d for d in (json.loads(line)[text_field] for line in fh if line.strip()) if d.strip()]
            text = fh.read()
        return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    raise ValueError(
        f"data: {source!r} is not one of the corpora {CORPORA}, an existing file or directory, 'hf:NAME' or 'arrow:PATH'"
    )


def _corpus_documents(name: str) -> list[str]:
    try:
        from .assets import load_corpus
    except ImportError as e:
        raise ValueError(f"data: the offline corpus {name!r} needs hf_hybrid_attn.assets ({e})") from e
    corpus = load_corpus(name)
    if isinstance(corpus, str):
        return [d.strip() for d in re.split(r"\n\s*\n", corpus) if d.strip()]
    if hasattr(corpus, "column_names"):
        return load_documents(corpus)
    docs = [d if isinstance(d, str) else d.get("text", "") for d in corpus]
    return [d for d in docs if d.strip()]


def split_documents(docs: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic held-out split by document: a seeded permutation, the first ceil(n*f) held out.

    The relative order of documents inside each split is kept."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {val_fraction!r}")
    n = len(docs)
    if n < 2:
        raise ValueError(f"data: {n} document(s); a validation split by document needs at least 2")
    n_val = min(max(1, math.ceil(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = set(perm[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val
