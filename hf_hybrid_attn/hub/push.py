"""Push converted models and PEFT adapters to the Hub: checks, then one commit with the card.

Everything that can be checked locally is checked before the first request that writes: the token,
the repo id and revision, the files (safetensors only), and the card metadata (locally, then by the
Hub's /api/validate-yaml). The files and the card then go up in ONE commit (`_commit`), so the card
can never be replaced by transformers' default card and a failed upload leaves the previous
revision as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

from .card import (
    _REPO_ID,
    UntrainedFeatureMapsWarning,
    _fmt,
    _read_json,
    feature_maps_untrained,
    load_diagnostics,
    render_model_card,
    validate_card,
)
from .export import _top_level_files, export_remote_code

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SHA = re.compile(r"^[0-9a-f]{40}$")


# ---- checks ------------------------------------------------------------------------------------
def resolve_token(token: str | None) -> str:
    """The token to push with: `token`, else HF_TOKEN / the `hf auth login` token. Raises if none."""
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"token: expected a non-empty Hugging Face token string, got {token!r}")
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise ValueError(
            "token: no Hugging Face token found: pushing needs a token with write access. Pass token=..., "
            "set the HF_TOKEN environment variable, or run `hf auth login`."
        )
    return found


def _check_repo_args(repo_id: Any, revision: Any) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id: expected 'namespace/name' (letters, digits, '-', '_', '.'), got {repo_id!r}")
    if revision is not None and (not isinstance(revision, str) or not revision or _SHA.match(revision)):
        raise ValueError(f"revision: expected a branch name to push to (not a commit sha), got {revision!r}")


def _feature_map_tensors(path: str) -> dict[str, Any]:
    """Only the feature-map tensors of a safetensors file (shards of big models are not loaded whole)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if ".feature_map_" in k}


def _refuse_pickles(files: list[str], where: str) -> None:
    bad = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise ValueError(
            f"{where}: holds pickle weight files {bad}; pushes are safetensors-only. Re-save with "
            "save_pretrained() (safetensors is the default) and remove those files."
        )


# ---- push --------------------------------------------------------------------------------------
def _commit(api, repo_id: str, folder: str, files: list[str], card, extra: dict[str, str], *, revision: str | None,
            private: bool, message: str, stale_patterns: tuple[str, ...]):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    ops: list = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(folder, n))
                 for n in files if n != "README.md"]
    ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in extra.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    # Weights from an earlier push that this one does not replace (e.g. old shards) would be loaded
    # with the new config: delete them in the same commit.
    remote = api.list_repo_files(repo_id, revision=revision)
    new = {op.path_in_repo for op in ops}
    ops += [CommitOperationDelete(path_in_repo=p) for p in remote
            if p not in new and any(re.fullmatch(pat, p) for pat in stale_patterns)]
    return api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)


def _diagnostic_files(diag: dict | None, plot: str | None) -> tuple[dict[str, Any], str | None]:
    extra: dict[str, Any] = {}
    if diag is not None:
        extra["diagnostics/diagnostics.json"] = json.dumps(diag, indent=2, default=str).encode()
    if plot is not None:
        if not os.path.isfile(plot):
            raise ValueError(f"diagnostics: plot {plot!r} does not exist")
        extra["diagnostics/la_share.png"] = plot
    return extra, ("diagnostics/la_share.png" if plot else None)


def push_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    card_data: Mapping[str, Any] | None = None,
    diagnostics: Any = None,
    training: Mapping[str, Any] | None = None,
    private: bool = False,
    commit_message: str | None = None,
    remote_code: bool = False,
):
    """Push a converted model (in memory, or a folder written by save_pretrained / `hf-hybrid convert`)
    with its model card, in one commit. Returns huggingface_hub's CommitInfo (`.oid` = commit sha).

    card_data: extra/overriding card metadata (license, base_model, datasets, tags, ...; 'teacher' sets
    the teacher line). diagnostics: a dict, JSON file or directory (see `load_diagnostics`).
    training: a training record overriding config.hybrid['training'] (absent -> "not trained").
    remote_code: also upload a copy of the modeling code (`export_remote_code`), so that users
    without hf_hybrid_attn can load the repo with trust_remote_code=True.
    Warns (UntrainedFeatureMapsWarning) if the feature maps were never trained."""
    from huggingface_hub import HfApi

    _check_repo_args(repo_id, revision)
    token = resolve_token(token)
    diag, plot = load_diagnostics(diagnostics)
    with tempfile.TemporaryDirectory(prefix="hf-hybrid-push-") as tmp:
        if isinstance(model_or_dir, (str, os.PathLike)):
            folder = os.fspath(model_or_dir)
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise ValueError(f"model_or_dir: {folder!r} has no config.json; expected a save_pretrained folder")
        elif hasattr(model_or_dir, "save_pretrained") and hasattr(model_or_dir, "config"):
            if hasattr(model_or_dir, "peft_config"):
                raise ValueError("model_or_dir: this is a PeftModel; push adapters with push_adapter()")
            folder = tmp
            model_or_dir.save_pretrained(folder)
        else:
            raise ValueError(f"model_or_dir: expected a converted PreTrainedModel or a folder, got {type(model_or_dir).__name__}")
        source_dir = folder if folder != tmp else None
        if remote_code:
            folder = export_remote_code(folder, os.path.join(tmp, "remote_code"))
        files = _top_level_files(folder)
        _refuse_pickles(files, f"model_or_dir {folder!r}")
        weights = [n for n in files if n.endswith(".safetensors")]
        if not weights:
            raise ValueError(f"model_or_dir: {folder!r} has no *.safetensors weights")
        config = _read_json(os.path.join(folder, "config.json")) or {}
        if not config.get("hybrid"):
            raise ValueError(f"model_or_dir: {folder!r} is not a converted hybrid checkpoint (no 'hybrid' in config.json)")
        tensors: dict[str, Any] = {}
        for n in weights:
            tensors.update(_feature_map_tensors(os.path.join(folder, n)))
        untrained = feature_maps_untrained(tensors, config["hybrid"].get("feature_map", "hedgehog")) is True
        extra, plot_in_repo = _diagnostic_files(diag, plot)
        card = render_model_card(config, repo_id, card_data=card_data, diagnostics=diag, plot_in_repo=plot_in_repo,
                                 training=training, untrained_feature_maps=untrained,
                                 source_dir=source_dir, remote_code=remote_code)
        validate_card(card)
        if untrained:
            warnings.warn(UntrainedFeatureMapsWarning(
                f"pushing {repo_id}: the feature maps were never trained (they equal their identity-like "
                "initialisation), so the linear-attention branch is untrained; the card says so. Train first "
                "(`hf-hybrid convert`) unless this untrained baseline is what you mean to publish."), stacklevel=2)
        api = HfApi(token=token)
        return _commit(api, repo_id, folder, files, card, extra, revision=revision, private=private,
                       message=commit_message or "Upload hybrid linear-attention model (hf_hybrid_attn)",
                       stale_patterns=(r".*\.safetensors", r".*\.safetensors\.index\.json", r".*\.bin",
                                       r"hha_.*\.py", r"modeling_hybrid\.py", r"hybrid_loader\.py"))


def push_adapter(
    peft_model_or_dir: Any,
    repo_id: str,
    *,
    base_model: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    card_data: Mapping[str, Any] | None = None,
    diagnostics: Any = None,
    private: bool = False,
    commit_message: str | None = None,
):
    """Push a PEFT adapter (LoRA, optionally with the `hybrid` modules saved) of a converted model.

    base_model: the Hub id of the hybrid base (written into adapter_config.json and the card); by
    default the adapter's own base_model_name_or_path when that is a repo id."""
    from huggingface_hub import HfApi

    _check_repo_args(repo_id, revision)
    token = resolve_token(token)
    diag, plot = load_diagnostics(diagnostics)
    with tempfile.TemporaryDirectory(prefix="hf-hybrid-push-") as tmp:
        base_config: dict[str, Any] | None = None
        if isinstance(peft_model_or_dir, (str, os.PathLike)):
            src = os.fspath(peft_model_or_dir)
            if not os.path.isfile(os.path.join(src, "adapter_config.json")):
                raise ValueError(f"peft_model_or_dir: {src!r} has no adapter_config.json; expected a PEFT adapter folder")
            for n in _top_level_files(src):
                shutil.copy2(os.path.join(src, n), os.path.join(tmp, n))
        elif hasattr(peft_model_or_dir, "peft_config") and hasattr(peft_model_or_dir, "get_base_model"):
            from ..modeling import quiet_base_config_probe

            with quiet_base_config_probe():
                peft_model_or_dir.save_pretrained(tmp)
            base_config = peft_model_or_dir.get_base_model().config.to_dict()
        else:
            raise ValueError(f"peft_model_or_dir: expected a peft.PeftModel or an adapter folder, got {type(peft_model_or_dir).__name__}")
        files = _top_level_files(tmp)
        _refuse_pickles(files, "peft_model_or_dir")
        if "adapter_model.safetensors" not in files:
            raise ValueError("peft_model_or_dir: no adapter_model.safetensors (pushes are safetensors-only)")
        adapter_cfg = _read_json(os.path.join(tmp, "adapter_config.json")) or {}
        original_base = adapter_cfg.get("base_model_name_or_path")
        base_model = base_model or original_base
        if base_model is not None and not (_REPO_ID.match(base_model) and not os.path.exists(base_model)):
            base_model = None  # a local path means nothing on the Hub
        if base_model is not None:
            adapter_cfg["base_model_name_or_path"] = base_model  # so AutoPeftModel can find the base
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(adapter_cfg, f, indent=2, sort_keys=True)
        if base_config is None:
            base_config = _adapter_base_config([original_base, base_model], token)
        if not base_config.get("hybrid"):
            raise ValueError(f"peft_model_or_dir: the adapter's base model {base_model!r} is not a converted hybrid model")
        tensors = _feature_map_tensors(os.path.join(tmp, "adapter_model.safetensors"))
        untrained = feature_maps_untrained(tensors, base_config["hybrid"].get("feature_map", "hedgehog")) is True
        lora = {k: adapter_cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")}
        summary = f"{lora['peft_type'] or 'PEFT'} r={lora['r']}, alpha={lora['lora_alpha']} on {_fmt(lora['target_modules'])}"
        if lora["modules_to_save"]:
            summary += f", with trained copies of {_fmt(lora['modules_to_save'])}"
        extra, plot_in_repo = _diagnostic_files(diag, plot)
        card = render_model_card(base_config, repo_id, card_data=card_data, diagnostics=diag, plot_in_repo=plot_in_repo,
                                 adapter={"base_model": base_model, "summary": summary},
                                 untrained_feature_maps=False)
        validate_card(card)
        if untrained:
            warnings.warn(UntrainedFeatureMapsWarning(
                f"pushing {repo_id}: the adapter's copies of the feature maps equal their identity-like "
                "initialisation (never trained)."), stacklevel=2)
        api = HfApi(token=token)
        return _commit(api, repo_id, tmp, _top_level_files(tmp), card, extra, revision=revision, private=private,
                       message=commit_message or "Upload PEFT adapter for a hybrid model (hf_hybrid_attn)",
                       stale_patterns=(r"adapter_model\..*",))


def _adapter_base_config(candidates: list[str | None], token: str) -> dict[str, Any]:
    """config.json of an adapter folder's base model: a local folder, else a Hub repo."""
    for base in candidates:
        if isinstance(base, str) and os.path.isfile(os.path.join(base, "config.json")):
            return _read_json(os.path.join(base, "config.json")) or {}
    for base in candidates:
        if isinstance(base, str) and _REPO_ID.match(base) and not os.path.exists(base):
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(base, "config.json", token=token)) as f:
                return json.load(f)
    raise ValueError(
        f"peft_model_or_dir: cannot find the base model's config (tried {candidates}); pass "
        "base_model='namespace/name' of the hybrid base on the Hub"
    )

