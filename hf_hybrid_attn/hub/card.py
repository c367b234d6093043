"""The model card of a pushed hybrid model or PEFT adapter: metadata, training, diagnostics.

Pure and offline: everything here works on config dicts, training records and diagnostics dicts
(or files), and imports neither torch nor transformers at module level (jinja2 and huggingface_hub
are imported when a card is rendered or validated; torch only by `feature_maps_untrained`).
`validate_card` checks locally, then (check_remote) with the Hub's /api/validate-yaml.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from ..config import COMPONENT_MODES
from ..families import TEACHER_BASE_MODEL, TEACHER_DESCRIPTION

TAG = "hybrid-linear-swa"
TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "templates", "hybrid_model_card.md.j2")
DIAGNOSTICS_JSON = ("diagnostics.json", "demo.json")
_REPO_ID = re.compile(r"^([\w.-]+/)?[\w.-]+$")


class UntrainedFeatureMapsWarning(UserWarning):
    """Pushed model's feature maps equal their identity-like initialisation (never trained)."""


def feature_maps_untrained(tensors: Mapping[str, Any], feature_map: str) -> bool | None:
    """True if every parametric feature map in `tensors` (a state dict) equals its initialisation.

    The init is deterministic (identity-like, `reset_parameters`), so a fresh map built with the same
    shape is the reference. None when there is nothing to judge (no parametric feature maps)."""
    import torch

    from ..feature_maps import build_feature_map

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
        info.update(base_model=TEACHER_BASE_MODEL, license="apache-2.0", teacher=TEACHER_DESCRIPTION)
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
        for mode in COMPONENT_MODES:
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
        if sum(m in node for m in COMPONENT_MODES) >= 2:
            by_mode(title, node)
            return
        children = [v for v in node.values() if isinstance(v, Mapping)]
        if children and all(sum(m in c for m in COMPONENT_MODES) >= 2 and all(not isinstance(x, Mapping) for x in c.values())
                            for c in children):  # task -> mode -> score
            present = [m for m in COMPONENT_MODES if any(m in c for c in children)]
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

