"""One loader for teachers and converted checkpoints, shared by the CLIs, the demo and the tests.

    from hf_hybrid_attn.loading import load_model
    model, tok = load_model("smollm2", num_layers=4)        # the offline teacher, first 4 layers
    model, tok = load_model("runs/hedgecats")                # a save_pretrained folder (teacher or hybrid)
    model, tok = load_model("model.Q8_0.gguf", "bfloat16")   # a GGUF file, dequantised

`name` is a named offline teacher (`NAMED_TEACHERS`), a directory saved with `save_pretrained`, or a
`.gguf` file. The model comes back in eval mode; the tokenizer has a pad token (EOS when it had none).
Bad arguments raise one ValueError that starts with the argument's name (`name: ...`,
`num_layers: ...`, `dtype: ...`); `cli_load_model` turns it into a SystemExit naming the CLI flag.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from .families import GEMMA_DESCRIPTION, TEACHER_DESCRIPTION

DTYPES = ("float32", "bfloat16", "float16")


class NamedTeacher(NamedTuple):
    """An offline teacher reachable by name: `load(torch_dtype, num_layers)` -> (model, tokenizer)."""

    description: str
    load: Callable[[Any, int | None], tuple[Any, Any]]


def _load_smollm2(torch_dtype, num_layers: int | None):
    from .assets import load_teacher

    # load_teacher cuts the config before loading (only the kept layers are read); its num_layers
    # error has the same form as truncate_layers'
    return load_teacher(dtype=torch_dtype, num_layers=num_layers)


def _load_gemma3(torch_dtype, num_layers: int | None):
    from .assets import load_teacher

    return load_teacher(dtype=torch_dtype, num_layers=num_layers, teacher="gemma3-270m")


#: name -> offline teacher
NAMED_TEACHERS: dict[str, NamedTeacher] = {
    "smollm2": NamedTeacher(TEACHER_DESCRIPTION, _load_smollm2),
    "gemma3-270m": NamedTeacher(GEMMA_DESCRIPTION, _load_gemma3),
}


def _expected() -> str:
    names = ", ".join(repr(n) for n in NAMED_TEACHERS)
    return f"{names}, an existing model directory or a .gguf file"


def display_name(name: str) -> str:
    """The name reports show for `name`: a named teacher's description, else `name` itself."""
    teacher = NAMED_TEACHERS.get(name)
    return teacher.description if teacher else str(name)


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES} or a torch.dtype, got {dtype!r}")
    return getattr(torch, dtype)


def _check_num_layers(num_layers, total: int | None = None) -> None:
    if num_layers is None:
        return
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1 or (
            total is not None and num_layers > total):
        want = f"an int in 1..{total}" if total is not None else "an int >= 1"
        raise ValueError(f"num_layers: expected {want}, got {num_layers!r}")


def truncate_layers(model, num_layers: int | None):
    """Keep the first `num_layers` decoder layers of `model` (in place; returns it).

    config.num_hidden_layers and config.layer_types (where the config has them) follow, so the model
    saves and reloads as the cut model. None keeps every layer."""
    if num_layers is None:
        return model
    total = model.config.num_hidden_layers
    _check_num_layers(num_layers, total)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:num_layers]
    return model


def _load_gguf(path: str, torch_dtype):
    """Load a GGUF checkpoint and copy it into a plain (saveable) model: transformers refuses to
    save GGUF-loaded models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch_dtype)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    return model, tok


def load_model(name: str, dtype="float32", num_layers: int | None = None, device=None):
    """(model, tokenizer) for `name`: a named offline teacher ('smollm2'), a save_pretrained
    directory (a teacher or a converted hybrid folder: importing this package registers the hybrid
    classes) or a .gguf file (dequantised into a plain, saveable model).

    dtype: 'float32', 'bfloat16', 'float16' or a torch.dtype. num_layers: keep only the first N
    decoder layers (quick runs). device: move the model there (default: where it loads, the CPU).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"name: expected {_expected()}, got {type(name).__name__}")
    name = os.fspath(name)
    torch_dtype = _torch_dtype(dtype)
    _check_num_layers(num_layers)
    if name in NAMED_TEACHERS:
        model, tok = NAMED_TEACHERS[name].load(torch_dtype, num_layers)
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ValueError(f"name: GGUF file {name!r} does not exist")
        model, tok = _load_gguf(name, torch_dtype)
    elif os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"name: directory {name!r} has no config.json (not a save_pretrained folder)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(name)
    else:
        raise ValueError(f"name: {name!r} is not {_expected()}")
    truncate_layers(model, num_layers)  # a no-op where the named loader already cut the model
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tok


#: load_model's argument -> the CLI flag that sets it (the model's own flag differs per command)
_CLI_FLAGS = {"num_layers": "--num-layers", "dtype": "--dtype"}


def cli_load_model(name: str, dtype="float32", num_layers: int | None = None, device=None, *, flag: str = "--model"):
    """`load_model` for a command line: a bad argument exits (SystemExit) with load_model's message,
    the argument renamed to its flag (`flag` for `name`: '--model', or 'MODEL' for a positional)."""
    try:
        return load_model(name, dtype, num_layers, device)
    except ValueError as e:
        arg, sep, detail = str(e).partition(": ")
        cli = flag if arg == "name" else _CLI_FLAGS.get(arg)
        raise SystemExit(f"{cli}: {detail}" if sep and cli else str(e)) from None
