"""Push converted models and PEFT adapters to the Hugging Face Hub, with a model card.

    from hf_hybrid_attn.hub import push_to_hub, push_adapter
    push_to_hub(model_or_dir, "me/smollm2-hybrid", diagnostics="runs/diag")   # model + card, one commit
    push_adapter(peft_model, "me/smollm2-hybrid-lora", base_model="me/smollm2-hybrid")

Everything that can be checked locally is checked before the first request that writes: the token,
the files (safetensors only), and the card metadata (locally, then by the Hub's /api/validate-yaml).
The files and the card then go up in ONE commit, so the card can never be replaced by
transformers' default card and a failed upload leaves the previous revision as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

from .families import FAMILIES, TEACHER_BASE_MODEL, TEACHER_DESCRIPTION

TAG = "hybrid-linear-swa"
SMOLLM2_TEACHER = TEACHER_DESCRIPTION
TEMPLATE = os.path.join(os.path.dirname(__file__), "templates", "hybrid_model_card.md.j2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DIAGNOSTICS_JSON = ("diagnostics.json", "demo.json")
MODES = ("hybrid", "swa_only", "linear_only", "sinks_only", "none")
_REPO_ID = re.compile(r"^([\w.-]+/)?[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class UntrainedFeatureMapsWarning(UserWarning):
    """Pushed model's feature maps equal their identity-like initialisation (never trained)."""


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


def feature_maps_untrained(tensors: Mapping[str, Any], feature_map: str) -> bool | None:
    """True if every parametric feature map in `tensors` (a state dict) equals its initialisation.

    The init is deterministic (identity-like, `reset_parameters`), so a fresh map built with the same
    shape is the reference. None when there is nothing to judge (no parametric feature maps)."""
    import torch

    from .feature_maps import build_feature_map

    groups: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        m = re.match(r"^(.*\.feature_map_[qk])\.([^.]+)$", name)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = value
    judged = False
    for params in groups.values():
        weight = params.get("weight")
        if weight is None or weight.dim() != 3:
            continue
        heads, head_dim, feature_dim = weight.shape
        fresh = build_feature_map(feature_map, heads, head_dim, feature_dim)
        reference = dict(fresh.state_dict())
        if set(reference) != set(params):
            continue
        judged = True
        for key, ref in reference.items():
            if not torch.equal(params[key].detach().cpu().to(ref.dtype), ref):
                return False
    return True if judged else None


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


# ---- what goes into the card -------------------------------------------------------------------
def _is_smollm2_135m(config: Mapping[str, Any]) -> bool:
    # Shape fingerprint of SmolLM2-135M, the only teacher of this shape this package ships (GGUF Q4_1).
    return (config.get("hidden_size"), config.get("vocab_size"), config.get("num_attention_heads"),
            config.get("num_key_value_heads")) == (576, 49152, 9, 3)


def _base_info(config: Mapping[str, Any], source_dir: str | None, card_data: Mapping[str, Any]) -> dict[str, Any]:
    """base_model / license / teacher: explicit card_data first, then what the checkpoint tells."""
    info: dict[str, Any] = {"base_model": None, "license": None, "teacher": None}
    log = _read_json(os.path.join(source_dir, "training_log.json")) if source_dir else None
    teacher_name = (log or {}).get("model")
    if teacher_name == "smollm2" or (teacher_name is None and _is_smollm2_135m(config)):
        info.update(base_model=TEACHER_BASE_MODEL, license="apache-2.0", teacher=SMOLLM2_TEACHER)
    elif isinstance(teacher_name, str) and os.path.isfile(os.path.join(teacher_name, "README.md")):
        info["license"] = _card_license(os.path.join(teacher_name, "README.md"))  # inherited from the base
    for key in ("base_model", "license"):
        if card_data.get(key) is not None:
            info[key] = card_data[key]
    if card_data.get("teacher") is not None:
        info["teacher"] = card_data["teacher"]
    return info


def _card_license(readme: str) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a base README without valid metadata simply gives no license
        return None


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings -> [(dotted key, leaf)]."""
    out = []
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def training_summary(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Card view of config.hybrid['training'] (see training.recipes.training_record); {} -> not trained."""
    record = dict(record or {})
    stages_in = record.get("stages") or {}
    stages = []
    for name, s in stages_in.items():
        s = s or {}
        stages.append({"name": name, "steps": _fmt(s.get("steps_done", s.get("steps"))), "tokens": _fmt(s.get("tokens")),
                       "initial_val_loss": _fmt(s.get("initial_val_loss")), "final_val_loss": _fmt(s.get("final_val_loss")),
                       "stopped_early": _fmt(s.get("stopped_early"))})
    tokens = record.get("tokens")
    if tokens is None:
        counted = [s.get("tokens") for s in stages_in.values() if s and isinstance(s.get("tokens"), int)]
        tokens = sum(counted) if counted else None
    steps = [s.get("steps_done", s.get("steps")) for s in stages_in.values() if s]
    trained = bool(record.get("recipe")) and (bool(tokens) or any(isinstance(x, int) and x > 0 for x in steps))
    config = dict(record.get("config") or {})
    description = config.pop("description", None) or record.get("description")
    config.pop("name", None)
    hyper = [(k, json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in _flatten(config)
             if v is not None and v != {} and v != []]
    data = record.get("data") or {}
    return {
        "trained": trained, "recipe": record.get("recipe"), "description": description, "stages": stages,
        "total_tokens": tokens,
        "total_tokens_text": f"{tokens:,} ({tokens / 1e6:.3g}M)" if isinstance(tokens, int) else "not recorded",
        "hyperparameters": hyper, "data_source": data.get("source"),
    }


def load_diagnostics(diagnostics: Any) -> tuple[dict | None, str | None]:
    """(diagnostics dict, LA-share PNG path) from a dict, a JSON file, or a directory holding
    diagnostics.json / demo.json and a PNG whose name contains 'share'."""
    if diagnostics is None:
        return None, None
    if isinstance(diagnostics, Mapping):
        return dict(diagnostics), None
    if not isinstance(diagnostics, (str, os.PathLike)):
        raise ValueError(f"diagnostics: expected a dict, a JSON file or a directory, got {type(diagnostics).__name__}")
    path = os.fspath(diagnostics)
    if os.path.isfile(path):
        if path.lower().endswith(".png"):
            return None, path
        with open(path) as f:
            return json.load(f), None
    if not os.path.isdir(path):
        raise ValueError(f"diagnostics: {path!r} is neither a JSON file nor a directory")
    data = next((_read_json(os.path.join(path, n)) for n in DIAGNOSTICS_JSON if os.path.isfile(os.path.join(path, n))), None)
    pngs = sorted(n for n in os.listdir(path) if n.lower().endswith(".png") and "share" in n.lower())
    if data is None and not pngs:
        raise ValueError(f"diagnostics: {path!r} holds none of {DIAGNOSTICS_JSON} and no '*share*.png' plot")
    return data, os.path.join(path, pngs[0]) if pngs else None


def diagnostics_tables(diag: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Markdown-ready tables: every dict keyed by component modes (mode -> metrics) becomes one table
    with a row per mode and a column per numeric leaf; dicts keyed task -> mode are transposed; a
    per-layer LA share list becomes a one-row table."""
    if not diag:
        return []
    tables = []

    def by_mode(title: str, rows: Mapping[str, Any]) -> None:
        cols: list[str] = []
        flat = {}
        for mode in MODES:
            if mode in rows:
                leaves = rows[mode] if isinstance(rows[mode], Mapping) else {"value": rows[mode]}
                flat[mode] = {k: v for k, v in _flatten(leaves) if isinstance(v, (int, float)) and not isinstance(v, bool)}
                cols += [k for k in flat[mode] if k not in cols]
        if cols:
            tables.append({"title": title, "columns": ["mode", *cols],
                           "rows": [[f"`{m}`", *(_fmt(flat[m].get(c)) for c in cols)] for m in flat]})

    def walk(node: Any, title: str) -> None:
        if not isinstance(node, Mapping):
            return
        if sum(m in node for m in MODES) >= 2:
            by_mode(title, node)
            return
        children = [v for v in node.values() if isinstance(v, Mapping)]
        if children and all(sum(m in c for m in MODES) >= 2 and all(not isinstance(x, Mapping) for x in c.values())
                            for c in children):  # task -> mode -> score
            present = [m for m in MODES if any(m in c for c in children)]
            by_mode(title, {m: {t: c.get(m) for t, c in node.items() if isinstance(c, Mapping)} for m in present})
            return
        for key, value in node.items():
            walk(value, f"{title} / {key}" if title else str(key))

    walk(diag, "")
    share = diag.get("linear_share_per_layer")
    if isinstance(share, list) and share and all(isinstance(x, (int, float)) for x in share):
        tables.append({"title": "LA share of the normaliser, per layer (mean over heads)",
                       "columns": [f"L{i}" for i in range(len(share))], "rows": [[f"{x:.3f}" for x in share]]})
    return tables


def render_model_card(
    config: Mapping[str, Any],
    repo_id: str,
    *,
    card_data: Mapping[str, Any] | None = None,
    diagnostics: Mapping[str, Any] | None = None,
    plot_in_repo: str | None = None,
    training: Mapping[str, Any] | None = None,
    untrained_feature_maps: bool = False,
    adapter: Mapping[str, Any] | None = None,
    source_dir: str | None = None,
    template: str | None = None,
    remote_code: bool = False,
):
    """The card (a huggingface_hub.ModelCard) of a converted model (`config` = its config.json dict)
    or, with `adapter`, of a PEFT adapter on it. Metadata comes from the checkpoint, then `card_data`
    (which may add keys and tags and override others; the `hybrid-linear-swa` tag always stays)."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    card_data = dict(card_data or {})
    hybrid = dict(config.get("hybrid") or {})
    if not hybrid:
        raise ValueError("model: config has no 'hybrid' entry; push converted models (hf_hybrid_attn.convert)")
    record = dict(hybrid.get("training") or {})
    record.update(training or {})
    train = training_summary(record)
    base = _base_info(config, source_dir, card_data)
    if adapter and card_data.get("base_model") is None:
        base["base_model"] = adapter.get("base_model")
    n_layers = config.get("num_hidden_layers")
    layers = hybrid.get("layers")
    tags = [TAG, "linear-attention", "sliding-window-attention", "hf_hybrid_attn"]
    tags += [t for t in ([train["recipe"]] if train["recipe"] else []) + (["peft", "lora"] if adapter else [])]
    user_tags = card_data.pop("tags", None)
    if user_tags is not None:
        if not isinstance(user_tags, list) or not all(isinstance(t, str) and t for t in user_tags):
            raise ValueError(f"card_data: 'tags' must be a list of non-empty strings, got {user_tags!r}")
        tags += user_tags
    source = train["data_source"]
    meta: dict[str, Any] = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "base_model": base["base_model"],
        "license": base["license"],
        "datasets": [source] if isinstance(source, str) and re.match(r"^[\w.-]+/[\w.-]+$", source) else None,
        "tags": list(dict.fromkeys(tags)),
    }
    card_data.pop("teacher", None)
    meta.update(card_data)
    meta = {k: v for k, v in meta.items() if v is not None}
    data = ModelCardData(**meta)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.dirname(template or TEMPLATE)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    body = env.get_template(os.path.basename(template or TEMPLATE)).render(
        title=repo_id.split("/")[-1], repo_id=repo_id, adapter=adapter, base_model=meta.get("base_model"),
        teacher=base["teacher"], license=meta.get("license"), hybrid=hybrid, training=train,
        untrained_feature_maps=untrained_feature_maps, remote_code=remote_code,
        model_type=str(config.get("model_type", "?")).removeprefix("hybrid_"), num_layers=n_layers,
        num_heads=config.get("num_attention_heads"), num_kv_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim") or (config.get("hidden_size", 0) // max(config.get("num_attention_heads") or 1, 1)),
        converted_layers=f"all {n_layers}" if layers is None else ", ".join(map(str, layers)),
        diagnostics={"tables": diagnostics_tables(diagnostics), "plot": plot_in_repo},
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def validate_card(card, check_remote: bool = True) -> None:
    """Refuse an invalid card with one clear error, before anything is uploaded: the metadata must
    round-trip through ModelCardData, and (check_remote) pass the Hub's /api/validate-yaml."""
    from huggingface_hub import ModelCard

    meta = card.data.to_dict()
    for key in ("license", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"card_data: the model card metadata is invalid: '{key}' must be a string, got {meta[key]!r}")
    for key in ("base_model", "datasets"):
        value = meta.get(key)
        values = [value] if isinstance(value, str) else value
        if value is not None and (not isinstance(values, list) or not all(isinstance(v, str) for v in values)):
            raise ValueError(f"card_data: the model card metadata is invalid: '{key}' must be a repo id or a list of them, got {value!r}")
    base = meta.get("base_model")
    for value in [base] if isinstance(base, str) else (base or []):
        if not _REPO_ID.match(value):
            raise ValueError(f"card_data: the model card metadata is invalid: 'base_model' must be a Hub repo id "
                             f"('namespace/name'), got {value!r}")
    ModelCard(str(card))  # YAML round trip
    if check_remote:
        _remote_validate(str(card))


def _remote_validate(text: str) -> None:
    """POST the card to {HF_ENDPOINT}/api/validate-yaml. Not ModelCard.validate(): huggingface_hub 1.x
    hard-codes https://huggingface.co there, which ignores HF_ENDPOINT (mirrors, the loopback hub)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    response = get_session().post(f"{constants.ENDPOINT}/api/validate-yaml", json={"repoType": "model", "content": text},
                                  headers={"Accept": "application/json"})
    if response.status_code == 400:
        try:
            reason = response.json().get("error") or response.text
        except ValueError:
            reason = response.text
        raise ValueError(f"card_data: the model card metadata was refused by the Hub (nothing was uploaded): {reason}")
    hf_raise_for_status(response)


# ---- push --------------------------------------------------------------------------------------
def _top_level_files(folder: str) -> list[str]:
    # Top level only: convert --out dirs hold training checkpoints (*.pt) in sub-folders.
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and not n.startswith("."))


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
            from .modeling import quiet_base_config_probe

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


# ---- trust_remote_code export -------------------------------------------------------------------
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


# ---- CLI ---------------------------------------------------------------------------------------
def add_push_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="push a converted model or a PEFT adapter folder to the Hub, with its model card",
        description="Push DIR (a converted model saved with save_pretrained / `hf-hybrid convert`, or a PEFT "
                    "adapter folder) to the Hub repo REPO, with a generated model card. Needs HF_TOKEN or "
                    "`hf auth login`.")
    p.add_argument("dir", help="model folder (config.json with 'hybrid') or adapter folder (adapter_config.json)")
    p.add_argument("repo", help="Hub repo id, namespace/name")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument("--card-from", default=None, metavar="DIR",
                   help="folder with diagnostics.json (or demo.json) and an LA-share *share*.png for the card")
    p.add_argument("--base-model", default=None, help="Hub id of the base model (card metadata; adapters: the hybrid base)")
    p.add_argument("--license", default=None, help="license id for the card (default: inherited from the base)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--remote-code", action="store_true",
                   help="also upload the modeling code, so the repo loads with trust_remote_code=True without the package")
    p.set_defaults(func=run_push)


def run_push(args) -> int:
    folder = args.dir
    if not os.path.isdir(folder):
        raise SystemExit(f"DIR: {folder!r} is not a directory")
    if args.remote_code and os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise SystemExit("--remote-code: DIR is a PEFT adapter; the modeling code goes with the base model "
                         "(push the base with --remote-code)")
    card_data = {k: v for k, v in {"base_model": args.base_model, "license": args.license}.items() if v is not None}
    common = dict(revision=args.revision, card_data=card_data, diagnostics=args.card_from, private=args.private,
                  commit_message=args.commit_message)
    try:
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            card_data.pop("base_model", None)
            info = push_adapter(folder, args.repo, base_model=args.base_model, **common)
        else:
            info = push_to_hub(folder, args.repo, remote_code=args.remote_code, **common)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps({"repo": args.repo, "revision": args.revision or "main", "commit": info.oid,
                      "url": info.commit_url}))
    return 0
