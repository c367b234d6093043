"""`export_remote_code`: a checkpoint that loads with trust_remote_code=True without the package.

transformers' dynamic modules live in one flat folder, so the hybrid modeling code and everything it
imports relatively (also lazily, e.g. the Triton kernels) is copied as `hha_*.py` files with the
relative imports rewritten to those flat names (by walking each module's AST), next to an entry
module `modeling_hybrid.py` that config.json's `auto_map` names.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ..families import FAMILIES
from .card import _read_json

EXPORT_ENTRY = "modeling_hybrid"
EXPORT_PREFIX = "hha_"
_EXPORT_ROOTS = ("hf_hybrid_attn.modeling", "hf_hybrid_attn.attention")
_ENTRY_SOURCE = '''"""trust_remote_code entry point, written by hf_hybrid_attn.hub.export_remote_code.

This folder carries its own copy of the hf_hybrid_attn modeling code (the hha_*.py files), so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without the package.
"""
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .{prefix}attention import ATTN_IMPLEMENTATION, hybrid_attention_forward, hybrid_mask
from .{prefix}modeling import _family_classes

AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hybrid_mask)
{cfg}, {lm} = _family_classes("{base}")
'''


def _top_level_files(folder: str) -> list[str]:
    # Top level only: convert --out dirs hold training checkpoints (*.pt) in sub-folders.
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and not n.startswith("."))


def _module_file(name: str) -> tuple[str, bool]:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"export_remote_code: cannot locate module {name}")
    return spec.origin, spec.submodule_search_locations is not None


def _flat_name(module: str) -> str:
    return EXPORT_PREFIX + module.removeprefix("hf_hybrid_attn.").replace(".", "_")


def _flatten_sources() -> dict[str, str]:
    """{flat file stem: source} for the modeling code and everything it imports relatively (also
    lazily, e.g. the Triton kernels), with relative imports rewritten to the flat names, because
    transformers' dynamic modules are one flat folder."""
    import ast

    todo, done, out = list(_EXPORT_ROOTS), set(), {}
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        path, is_pkg = _module_file(module)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        package = module if is_pkg else module.rpartition(".")[0]
        lines = source.splitlines(keepends=True)
        edits = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hf_hybrid_attn" for a in node.names):
                raise RuntimeError(f"export_remote_code: {path}:{node.lineno} imports hf_hybrid_attn absolutely; "
                                   "the core must use relative imports for the export to be self-contained")
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if (node.module or "").split(".")[0] == "hf_hybrid_attn":
                    raise RuntimeError(f"export_remote_code: {path}:{node.lineno} imports {node.module} absolutely")
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            if node.module:
                target = f"{base}.{node.module}"
                todo.append(target)
                names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
                new = f"from .{_flat_name(target)} import {names}"
            else:  # from . import x
                targets = [f"{base}.{a.name}" for a in node.names]
                todo.extend(targets)
                # transformers copies only the files named by `from .mod import ...` into its
                # dynamic-module folder, so each module is first imported that way
                new = "".join(f"from .{_flat_name(t)} import __name__ as _{_flat_name(t)}_name  # noqa: F401\n"
                              for t in targets)
                new += "from . import " + ", ".join(f"{_flat_name(t)} as {a.asname or a.name}"
                                                    for t, a in zip(targets, node.names))
            edits.append((node.lineno, node.end_lineno, node.col_offset, new))
        for start, end, col, new in sorted(edits, reverse=True):
            lines[start - 1:end] = [" " * col + line + "\n" for line in new.split("\n")]
        out[_flat_name(module)] = "".join(lines)
    return out


def export_remote_code(model_or_dir: Any, out_dir: str) -> str:
    """Write a `trust_remote_code` checkpoint to `out_dir`: the weights, config.json with `auto_map`,
    and a flat copy of the hybrid modeling code, so that
    `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` works without
    hf_hybrid_attn installed (torch + transformers only; triton where the Triton kernels run).
    With the package imported, the folder still loads through the registered classes. Returns out_dir."""
    out_dir = os.fspath(out_dir)
    if isinstance(model_or_dir, (str, os.PathLike)):
        src = os.fspath(model_or_dir)
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise ValueError(f"model_or_dir: {src!r} has no config.json; expected a save_pretrained folder")
        if os.path.abspath(src) != os.path.abspath(out_dir):
            os.makedirs(out_dir, exist_ok=True)
            for n in _top_level_files(src):
                shutil.copy2(os.path.join(src, n), os.path.join(out_dir, n))
    elif hasattr(model_or_dir, "save_pretrained") and hasattr(model_or_dir, "config"):
        if hasattr(model_or_dir, "peft_config"):
            raise ValueError("model_or_dir: a PeftModel; merge it first (merge_and_unload) to export a full model")
        model_or_dir.save_pretrained(out_dir)
    else:
        raise ValueError(f"model_or_dir: expected a converted PreTrainedModel or a folder, got {type(model_or_dir).__name__}")
    config_path = os.path.join(out_dir, "config.json")
    config = _read_json(config_path) or {}
    model_type = str(config.get("model_type", ""))
    if not config.get("hybrid") or not model_type.startswith("hybrid_"):
        raise ValueError(f"model_or_dir: not a converted hybrid checkpoint (model_type={model_type!r})")
    base = model_type.removeprefix("hybrid_")
    if base not in FAMILIES:
        raise ValueError(f"model_or_dir: unsupported base family {base!r}; supported: {sorted(FAMILIES)}")
    family = FAMILIES[base][1].removesuffix("Config")
    cfg_name, lm_name = f"Hybrid{family}Config", f"Hybrid{family}ForCausalLM"
    for stem, source in _flatten_sources().items():
        with open(os.path.join(out_dir, stem + ".py"), "w", encoding="utf-8") as f:
            f.write(source)
    with open(os.path.join(out_dir, EXPORT_ENTRY + ".py"), "w", encoding="utf-8") as f:
        f.write(_ENTRY_SOURCE.format(prefix=EXPORT_PREFIX, cfg=cfg_name, lm=lm_name, base=base))
    shim = os.path.join(out_dir, "hybrid_loader.py")  # the package-requiring shim of save_pretrained
    if os.path.exists(shim):
        os.remove(shim)
    config["auto_map"] = {"AutoConfig": f"{EXPORT_ENTRY}.{cfg_name}", "AutoModelForCausalLM": f"{EXPORT_ENTRY}.{lm_name}"}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return out_dir

