"""The reproduction study of arXiv 2510.05901 at CPU scale, in one resumable command.

    python examples/reproduce_paper.py                 # the whole study (hours on 2 CPU cores)
    python examples/reproduce_paper.py --plan          # what it would run, and what is done already
    python examples/reproduce_paper.py --smoke         # the same pipeline on a 2-layer cut (4-5.5 min, 2 cores)
    python examples/reproduce_paper.py --report-only   # rebuild the tables and plots from what is done

Question: does a LoLCATs conversion collapse onto its softmax window, and do HedgeCATs and SSD keep
the linear branch in use? On the SmolLM2-135M teacher (docs/ASSETS.md), SOTU training text, seq 512,
every recipe gets the same token budget and the same data (the document split is fixed by
`--data-seed 0`; only the training seed varies):

  * w = 64: lolcats, linear_only (then inference-time hybridisation), hedgecats, ssd; 2 seeds each;
  * w = 16: the same four recipes, 1 seed (most short-benchmark items are longer than 16 tokens);
  * the softmax-sinks arm (`HybridConfig.softmax_sinks`, docs/SPEC.md): the best w=64 recipe again,
    with the first 4 tokens kept in the softmax branch and out of the linear state.

Every model (and the teacher) is evaluated in the component modes hybrid / swa_only / linear_only:
perplexity on held-out SOTU speeches and on the Austen novels (never trained on), in 1024-token
blocks split inside / beyond w; passkey retrieval at 16..512 tokens, inside the window as well as
beyond it; zero-shot PIQA / ARC-Easy / HellaSwag (hybrid and swa_only, linear_only on ARC-Easy),
per item, so that scores on the items longer than w can be reported alone; the LA share of the
normaliser per layer and head, and its curve during stage 2 (from the training log). The best model
of each recipe also runs ARC-Challenge and Winogrande (the five-task suite).

Resuming: each conversion runs `hf-hybrid convert --resume` into RUNS/<name>; each evaluation piece
(one model, one mode, one measurement) is a JSON file under OUT/eval/<model>/, written atomically.
Re-running skips what is finished, so the study can run in several sittings. Results:
OUT/results.json, OUT/results.md, OUT/*.png; training logs are copied to OUT/conversions/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("lolcats", "linear_only", "hedgecats", "ssd")
MODES = ("hybrid", "swa_only", "linear_only")
CORPORA = ("sotu", "austen")
DATA_SEED = 0
#: stage-1 checkpoint every N optimizer steps (`hf-hybrid convert --checkpoint-every`): the full study's
#: stage 1 has 32 steps of about 25 s, above the default of 50, so without this an abrupt end of a
#: sitting (no KeyboardInterrupt) lost the whole stage. Not part of the study's identity: it changes
#: when state is saved, not what is computed.
STAGE1_CHECKPOINT_EVERY = 4


@dataclass(frozen=True)
class Study:
    """Everything that sizes the study; `FULL` and `SMOKE` differ only here."""

    name: str
    num_layers: int | None  # None: the whole 30-layer teacher
    tokens: int  # per conversion, both stages together
    seq_len: int
    seeds: dict = field(default_factory=dict)  # window -> training seeds
    recipes: tuple[str, ...] = RECIPES
    softmax_sinks: int = 4
    finetune_eval_every: int = 4  # stage-2 validation (+ LA share) every N optimizer steps
    finetune_eval_blocks: int = 16
    ppl_blocks: int = 16
    ppl_block_size: int = 1024
    probe_distances: tuple[int, ...] = (16, 32, 48, 128, 256, 512)
    probe_items: int = 20
    zero_shot: dict = field(default_factory=dict)  # task -> item limit (None: all)
    zero_shot_linear_only: tuple[str, ...] = ("arc_easy",)
    full_suite: dict = field(default_factory=dict)  # tasks added for the best model of each recipe
    share_blocks: int = 2
    batch_size: int = 16
    max_val_blocks: int = 64  # validation blocks a conversion keeps (`hf-hybrid convert --max-val-blocks`, always passed)


FULL = Study(
    name="full", num_layers=None, tokens=262_144, seq_len=512, seeds={64: (0, 1), 16: (0,)},
    zero_shot={"piqa": 500, "arc_easy": None, "hellaswag": 500},
    full_suite={"arc_challenge": 500, "winogrande": 500},
)
SMOKE = Study(
    name="smoke", num_layers=2, tokens=2048, seq_len=128, seeds={64: (0, 1), 16: (0,)},
    finetune_eval_every=1, finetune_eval_blocks=2, ppl_blocks=1, ppl_block_size=256, probe_distances=(16, 48, 256),
    probe_items=2,
    zero_shot={"piqa": 4, "arc_easy": 4, "hellaswag": 4}, full_suite={"arc_challenge": 4, "winogrande": 4},
    share_blocks=1, batch_size=8, max_val_blocks=2,
)


@dataclass(frozen=True)
class Conversion:
    recipe: str
    window: int
    seed: int
    softmax_sinks: int = 0

    @property
    def name(self) -> str:
        sinks = f"_sinks{self.softmax_sinks}" if self.softmax_sinks else ""
        return f"{self.recipe}{sinks}_w{self.window}_s{self.seed}"


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# --- statistics ------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def paired_diff(a: list[float], b: list[float], z: float = 1.96) -> dict:
    """Mean of a - b over paired items with a normal 95% interval (the same items for both)."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff: expected equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    sd = statistics.stdev(d) if n > 1 else float("nan")
    half = z * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


# --- the pipeline ----------------------------------------------------------------------------------


class Runner:
    def __init__(self, study: Study, out: Path, runs: Path, progress: bool):
        self.study, self.out, self.runs, self.progress = study, out, runs, progress
        self._block_cache: dict = {}

    # conversions
    def conversions(self) -> list[Conversion]:
        s = self.study
        order = [(64, 0), (16, 0)] + [(w, seed) for w, seeds in s.seeds.items() for seed in seeds if seed != 0]
        return [Conversion(r, w, seed) for w, seed in order if seed in s.seeds.get(w, ()) for r in s.recipes]

    def record_path(self, c: Conversion) -> Path:
        return self.out / "conversions" / f"{c.name}.json"

    def converted(self, c: Conversion) -> bool:
        return (self.runs / c.name / "training_log.json").is_file() and self.record_path(c).is_file()

    def convert(self, c: Conversion) -> None:
        from hf_hybrid_attn.cli import main as hf_hybrid

        s = self.study
        target = self.runs / c.name
        if (target / "training_log.json").is_file():
            log(f"skip convert {c.name}: finished")
        else:
            argv = ["convert", "--model", "smollm2", "--recipe", c.recipe, "--tokens", str(s.tokens),
                    "--seq-len", str(s.seq_len), "--window", str(c.window), "--seed", str(c.seed),
                    "--data-seed", str(DATA_SEED), "--data", "sotu", "--out", str(target), "--resume",
                    "--set", f"finetune.eval_every={s.finetune_eval_every}",
                    "--set", f"finetune.eval_blocks={s.finetune_eval_blocks}",
                    "--set", f"finetune.share_blocks={s.share_blocks}", "--max-val-blocks", str(s.max_val_blocks),
                    "--checkpoint-every", str(STAGE1_CHECKPOINT_EVERY)]
            if s.num_layers:
                argv += ["--num-layers", str(s.num_layers)]
            if c.softmax_sinks:
                argv += ["--set", f"hybrid.softmax_sinks={c.softmax_sinks}"]
            if not self.progress:
                argv.append("--no-progress")
            log(f"convert {c.name}: hf-hybrid {' '.join(argv)}")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                rc = hf_hybrid(argv)
            if rc:
                raise SystemExit(f"convert {c.name}: hf-hybrid convert exited with {rc}")
            log(f"converted {c.name} in {time.perf_counter() - t0:.0f} s")
        record = json.loads((target / "training_log.json").read_text())
        record["study_conversion"] = asdict(c)
        path = self.record_path(c)
        first = _read_json(path)
        if first is not None and first.get("total_wall_s") != record.get("total_wall_s"):
            # converted again (its checkpoint did not survive, and pieces were still missing): the
            # results keep the first record, whose model produced the pieces already there, and note
            # how closely the same seed and data reproduced it
            again = {k: v.get("final_val_loss") for k, v in record["stages"].items()}
            before = {k: v.get("final_val_loss") for k, v in first["stages"].items()}
            diff = max(abs(again[k] - before[k]) for k in again if again[k] is not None and before.get(k) is not None)
            log(f"{c.name} converted again: final val losses {again} (first conversion {before}; max diff {diff:.2e})")
            first.setdefault("reconversions", []).append(
                {"final_val_loss": again, "max_abs_diff": diff, "wall_s": record.get("wall_s_including_load")})
            record = first
        _write_json(path, record)

    # evaluation
    def pieces(self, model_name: str, hybrid: bool, extra_tasks: dict | None = None) -> list[tuple[str, str, str]]:
        """(kind, target, mode) of every evaluation piece of one model."""
        s = self.study
        modes = MODES if hybrid else ("base",)
        out = [("ppl", corpus, m) for m in modes for corpus in CORPORA]
        out += [("passkey", "passkey", m) for m in modes]
        if extra_tasks is not None:  # the five-task suite's added tasks: the model as served (hybrid)
            return [("task", t, "hybrid" if hybrid else "base") for t in extra_tasks]
        for t in s.zero_shot:
            for m in modes:
                if m == "linear_only" and t not in s.zero_shot_linear_only:
                    continue
                out.append(("task", t, m))
        if hybrid:
            out.append(("share", "share", "hybrid"))
        return out

    def piece_path(self, model_name: str, piece: tuple[str, str, str]) -> Path:
        kind, target, mode = piece
        return self.out / "eval" / model_name / f"{kind}_{target}_{mode}.json"

    def todo(self, model_name: str, pieces: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """The pieces not computed yet."""
        return [p for p in pieces if not self.piece_path(model_name, p).is_file()]

    def teacher_pieces(self) -> list[tuple[str, str, str]]:
        return self.pieces("teacher", False) + self.pieces("teacher", False, self.study.full_suite)

    def evaluate(self, model_name: str, path: str, hybrid: bool, pieces: list[tuple[str, str, str]]) -> None:
        """Computes the missing ones of `pieces` (one model load for all of them)."""
        todo = self.todo(model_name, pieces)
        if not todo:
            log(f"skip evaluate {model_name}: finished")
            return
        import torch

        from hf_hybrid_attn.evaluation.scorer import LoglikelihoodScorer
        from hf_hybrid_attn.loading import cli_load_model

        num_layers = self.study.num_layers if path == "smollm2" else None
        model, tok = cli_load_model(path, "float32", num_layers, "cpu")
        model.eval()
        scorer = LoglikelihoodScorer(model, tok, batch_size=self.study.batch_size, progress=self.progress)
        for piece in todo:
            kind, target, mode = piece
            log(f"evaluate {model_name}: {kind} {target} [{mode}]")
            t0 = time.perf_counter()
            with self._mode(model, mode), torch.no_grad():
                result = getattr(self, f"_eval_{kind}")(model, tok, scorer, target)
            result.update({"model": model_name, "kind": kind, "target": target, "mode": mode,
                           "wall_s": round(time.perf_counter() - t0, 2)})
            _write_json(self.piece_path(model_name, piece), result)
        del model, scorer
        gc.collect()

    @staticmethod
    def _mode(model, mode: str):
        if mode == "base":
            return contextlib.nullcontext()
        from hf_hybrid_attn.modeling import component_mode

        return component_mode(model, mode)

    def _blocks(self, tok, corpus: str, size: int, n: int, held_out):
        """corpus_blocks, tokenised once per sitting (every model shares the teacher's tokenizer)."""
        from hf_hybrid_attn.evaluation.perplexity import corpus_blocks

        key = (corpus, size, n, held_out)
        if key not in self._block_cache:
            self._block_cache[key] = corpus_blocks(tok, corpus, size, n, held_out=held_out)
        return self._block_cache[key]

    def _eval_ppl(self, model, tok, scorer, corpus: str) -> dict:
        from hf_hybrid_attn.evaluation.perplexity import nll_per_position

        s = self.study
        # SOTU: the documents every conversion held out (data seed fixed); Austen: never trained on
        held_out = (_val_fraction(), DATA_SEED) if corpus == "sotu" else None
        blocks = self._blocks(tok, corpus, s.ppl_block_size, s.ppl_blocks, held_out)
        per_block = [nll_per_position(model, blocks[i : i + 1], batch_size=1).tolist() for i in range(len(blocks))]
        return {"blocks": len(per_block), "block_size": s.ppl_block_size, "nll": per_block}

    def _eval_passkey(self, model, tok, scorer, _target: str) -> dict:
        from hf_hybrid_attn.evaluation.probes import doc_lengths, key_distance, passkey_docs
        from hf_hybrid_attn.evaluation.scorer import evaluate_docs

        out = {}
        for d in self.study.probe_distances:
            docs = passkey_docs(tok, d, n_items=self.study.probe_items, seed=0)
            res = evaluate_docs(scorer, docs, desc=f"passkey@{d}")
            out[str(d)] = {"correct": [int(p["pred"] == p["gold"]) for p in res["predictions"]],
                           "distance_tokens": key_distance(tok, docs[0]), "length": max(doc_lengths(tok, docs)),
                           "chance": 1 / len(docs[0].choices)}
        return {"distances": out}

    def _eval_task(self, model, tok, scorer, task: str) -> dict:
        from hf_hybrid_attn.evaluation.probes import doc_lengths
        from hf_hybrid_attn.evaluation.scorer import evaluate_docs
        from hf_hybrid_attn.evaluation.tasks import load_task, task_info

        limit = {**self.study.zero_shot, **self.study.full_suite}[task]
        docs = load_task(task, limit)
        res = evaluate_docs(scorer, docs, desc=task)
        metric = task_info(task).primary_metric
        key = {"acc": "pred", "acc_norm": "pred_norm", "acc_norm_cont": "pred_norm_cont"}[metric]
        return {"metric": metric, "doc_ids": [d.doc_id for d in docs], "lengths": doc_lengths(tok, docs),
                "correct": [int(p[key] == p["gold"]) for p in res["predictions"]]}

    def _eval_share(self, model, tok, scorer, _target: str) -> dict:
        from hf_hybrid_attn.modeling import collect_linear_share, iter_hybrid_attention

        blocks = self._blocks(tok, "sotu", self.study.ppl_block_size, self.study.share_blocks,
                              (_val_fraction(), DATA_SEED))
        share = collect_linear_share(model, blocks)
        return {"share": share.float().tolist(), "layers": [i for i, _ in iter_hybrid_attention(model)]}

    # the plan
    def all_pieces(self, c: Conversion) -> list[tuple[str, str, str]]:
        """Every evaluation piece of one conversion: the standard ones, and at w=64 the five-task suite's
        added tasks (hybrid), run for every w=64 model right after its conversion so that the best of
        each recipe can be read off later without its checkpoint (runs/ need not survive a sitting)."""
        out = self.pieces(c.name, True)
        if c.window == 64:
            out += self.pieces(c.name, True, self.study.full_suite)
        return out

    def run_conversion(self, c: Conversion) -> None:
        if not self.todo(c.name, self.all_pieces(c)) and self.record_path(c).is_file():
            log(f"skip {c.name}: converted and evaluated")
            return
        self.convert(c)
        self.evaluate(c.name, str(self.runs / c.name), True, self.all_pieces(c))
        self.report(draw=False)  # the results so far; the plots are drawn once, at the end of the sitting

    def needs_reconversion(self, c: Conversion) -> bool:
        """Converted and evaluated before, but pieces are missing and the checkpoint is gone."""
        return bool(self.todo(c.name, self.all_pieces(c))) and self.record_path(c).is_file() and not self.converted(c)

    def run(self) -> None:
        t_start = time.perf_counter()
        self.evaluate("teacher", "smollm2", False, self.teacher_pieces())
        convs = self.conversions()
        first = [c for c in convs if (c.window, c.seed) == (64, 0)]
        # conversions that would only be redone for a few missing pieces go last
        deferred = [c for c in convs if self.needs_reconversion(c)]
        for c in first:
            if c not in deferred:
                self.run_conversion(c)
        arm = self.sinks_arm()
        if arm is not None:
            self.run_conversion(arm)
        for c in convs:
            if c not in first and c not in deferred:
                self.run_conversion(c)
        for c in deferred:
            self.run_conversion(c)
        self.report()
        log(f"study {self.study.name} finished this sitting in {time.perf_counter() - t_start:.0f} s; "
            f"report: {self.out / 'results.md'}")

    def _seed0_beyond(self) -> dict[str, float]:
        """Recipe -> hybrid perplexity beyond w=64 on held-out SOTU of its seed-0 conversion (those evaluated)."""
        scores = {}
        for r in self.study.recipes:
            v = self._ppl(Conversion(r, 64, 0).name, "sotu", "hybrid", 64)
            if v is not None:
                scores[r] = v["beyond"]
        return scores

    def best_for_sinks(self) -> str | None:
        """The w=64 recipe with the lowest hybrid perplexity beyond w on held-out SOTU, seed 0 (the
        sinks arm runs once all w=64 seed-0 conversions are evaluated, before any other seed)."""
        scores = self._seed0_beyond()
        return min(scores, key=scores.get) if scores else None

    def sinks_arm(self, decide: bool = True) -> Conversion | None:
        """The softmax-sinks arm: the best w=64 recipe (`best_for_sinks`) with `softmax_sinks` on,
        decided once every w=64 seed-0 conversion has its perplexity, then recorded in
        sinks_arm.json so that later results (other seeds) cannot change which arm the study ran."""
        if not self.study.softmax_sinks:
            return None
        path = self.out / "sinks_arm.json"
        rec = _read_json(path)
        if rec is None:
            scores = self._seed0_beyond()
            if not (decide and len(scores) == len(self.study.recipes)):
                return None
            rec = {"recipe": min(scores, key=scores.get),
                   "rule": "lowest hybrid perplexity beyond w=64 on held-out SOTU, seed 0", "beyond_ppl": scores}
            _write_json(path, rec)
        return Conversion(rec["recipe"], 64, 0, self.study.softmax_sinks)

    def best_of_each_recipe(self) -> dict[str, str]:
        """Per recipe, its w=64 conversion (no sinks) with the highest hybrid three-task zero-shot
        average, among those evaluated so far."""
        out = {}
        for r in self.study.recipes:
            cands = {}
            for c in self.conversions():
                if c.recipe == r and c.window == 64:
                    scores = [self._task(c.name, t, "hybrid") for t in self.study.zero_shot]
                    if all(s is not None for s in scores):
                        cands[c.name] = sum(s["acc"] for s in scores) / len(scores)
            if cands:
                out[r] = max(cands, key=cands.get)
        return out

    # reading pieces back
    def _piece(self, model: str, kind: str, target: str, mode: str):
        return _read_json(self.piece_path(model, (kind, target, mode)))

    def _ppl(self, model: str, corpus: str, mode: str, window: int) -> dict | None:
        p = self._piece(model, "ppl", corpus, mode)
        if p is None:
            return None
        return ppl_split(p["nll"], window, self.study.seq_len)

    def _task(self, model: str, task: str, mode: str, window: int | None = None) -> dict | None:
        p = self._piece(model, "task", task, mode)
        if p is None:
            return None
        return task_summary(p, window)

    def report(self, draw: bool = True) -> None:
        write_report(self, draw)


def _val_fraction() -> float:
    from hf_hybrid_attn.documents import DEFAULT_VAL_FRACTION

    return DEFAULT_VAL_FRACTION


# --- summaries -------------------------------------------------------------------------------------


def ppl_split(nll_blocks: list[list[float]], window: int, train_len: int | None = None) -> dict:
    """Perplexity inside (query positions < w) and beyond, with the spread over blocks. With
    `train_len` (the conversion's training sequence length), "beyond" is also split into the
    positions a training sequence has (w <= position < train_len: `beyond_trained`) and those past
    every training sequence (position >= train_len: `past_train`), where the linear state holds
    more tokens than it ever did in training."""
    def ppl(rows):
        vals = [x for r in rows for x in r]
        return math.exp(sum(vals) / len(vals)) if vals else float("nan")

    inside = [r[:window] for r in nll_blocks]
    beyond = [r[window:] for r in nll_blocks]
    per_block = [math.exp(sum(r) / len(r)) for r in beyond if r]
    out = {"inside": ppl(inside), "beyond": ppl(beyond), "blocks": len(nll_blocks),
           "beyond_block_sd": statistics.stdev(per_block) if len(per_block) > 1 else float("nan")}
    if train_len is not None and train_len > window:
        out["beyond_trained"] = ppl([r[window:train_len] for r in nll_blocks])
        out["past_train"] = ppl([r[train_len:] for r in nll_blocks])
        out["train_len"] = train_len
    return out


def task_summary(piece: dict, window: int | None) -> dict:
    correct, lengths = piece["correct"], piece["lengths"]
    n, k = len(correct), sum(correct)
    out = {"acc": k / n, "n": n, "ci": wilson(k, n), "metric": piece["metric"]}
    if window is not None:
        long = [c for c, L in zip(correct, lengths) if L > window]
        out["share_longer"] = len(long) / n
        out["n_longer"] = len(long)
        out["acc_longer"] = sum(long) / len(long) if long else float("nan")
        out["ci_longer"] = wilson(sum(long), len(long))
    return out


def passkey_summary(piece: dict) -> dict:
    return {d: {"acc": sum(v["correct"]) / len(v["correct"]), "n": len(v["correct"]),
                "ci": wilson(sum(v["correct"]), len(v["correct"])), "length": v["length"],
                "distance_tokens": v["distance_tokens"]} for d, v in piece["distances"].items()}


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci and not math.isnan(ci[0]) else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _models(runner: Runner) -> list[tuple[str, Conversion | None]]:
    out = [("teacher", None)]
    convs = runner.conversions()
    arm = runner.sinks_arm(decide=False)
    if arm is not None:
        convs.append(arm)
    out += [(c.name, c) for c in convs if (runner.out / "eval" / c.name).is_dir()]
    return out


def collect(runner: Runner) -> dict:
    s = runner.study
    res: dict = {"study": asdict(s), "machine": machine(), "models": {}, "conversions": {},
                 "best_of_recipe": runner.best_of_each_recipe(), "sinks_arm": _read_json(runner.out / "sinks_arm.json")}
    for name, conv in _models(runner):
        window = conv.window if conv else None
        modes = MODES if conv else ("base",)
        m: dict = {"conversion": asdict(conv) if conv else None, "ppl": {}, "passkey": {}, "tasks": {}, "wall_s": 0.0}
        for piece in sorted(set(runner.pieces(name, conv is not None) + runner.pieces(name, conv is not None, s.full_suite))):
            p = _read_json(runner.piece_path(name, piece))
            if p is None:
                continue
            m["wall_s"] = round(m["wall_s"] + p.get("wall_s", 0.0), 2)
        for corpus in CORPORA:
            for mode in modes:
                for w in ((window,) if window else sorted(s.seeds)):
                    r = runner._ppl(name, corpus, mode, w)
                    if r is not None:
                        m["ppl"].setdefault(corpus, {}).setdefault(mode, {})[str(w)] = r
        for mode in modes:
            p = runner._piece(name, "passkey", "passkey", mode)
            if p is not None:
                m["passkey"][mode] = passkey_summary(p)
        for t in {**s.zero_shot, **s.full_suite}:
            for mode in modes:
                for w in ((window,) if window else sorted(s.seeds)):
                    r = runner._task(name, t, mode, w)
                    if r is not None:
                        m["tasks"].setdefault(t, {}).setdefault(mode, {})[str(w)] = r
        share = runner._piece(name, "share", "share", "hybrid")
        if share is not None:
            m["share"] = share["share"]
            m["share_per_layer"] = [sum(h) / len(h) for h in share["share"]]
        # paired gap hybrid - swa_only per task (the same items), on all items and on items > w
        if conv:
            for t in s.zero_shot:
                a, b = runner._piece(name, "task", t, "hybrid"), runner._piece(name, "task", t, "swa_only")
                if a and b:
                    longer = [i for i, L in enumerate(a["lengths"]) if L > window]
                    m.setdefault("gap", {})[t] = {
                        "all": paired_diff(a["correct"], b["correct"]),
                        "longer": paired_diff([a["correct"][i] for i in longer], [b["correct"][i] for i in longer])
                        if longer else None}
        res["models"][name] = m
        if conv:
            rec = _read_json(runner.record_path(conv))
            if rec:
                res["conversions"][name] = conversion_summary(rec)
    return res


def conversion_summary(rec: dict) -> dict:
    stages = {}
    for k, v in rec["stages"].items():
        stages[k] = {key: v.get(key) for key in ("tokens", "tokens_per_s", "wall_s", "initial_val_loss",
                                                  "final_val_loss", "best_val_loss", "steps_done", "stopped_early")}
        if v.get("linear_share_curve"):
            stages[k]["linear_share_curve"] = [{"step": h["step"], "linear_share": h["linear_share"]}
                                               for h in v["linear_share_curve"]]
    return {"stages": stages, "val_loss_by_mode": rec.get("val_loss_by_mode"),
            "wall_s": rec.get("wall_s_including_load"), "argv": rec.get("argv")}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def teacher_average(res: dict, window: int, tasks) -> float | None:
    t = res["models"].get("teacher", {}).get("tasks", {})
    vals = [t.get(task, {}).get("base", {}).get(str(window), {}).get("acc") for task in tasks]
    return sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None


def render(res: dict) -> str:
    s = res["study"]
    zs = list(s["zero_shot"])
    cut = f" cut to {s['num_layers']} layers" if s["num_layers"] else ""
    lines = [f"# Reproduction study ({s['name']})", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, torch {res['machine']['torch']}. "
             f"Teacher: SmolLM2-135M{cut}; "
             f"{s['tokens']} tokens per conversion at seq {s['seq_len']}, data seed {DATA_SEED}. "
             "Generated by `examples/reproduce_paper.py`" + (" --smoke" if s["name"] == "smoke" else "") + ".", ""]

    # conversions
    rows = []
    for name, c in res["conversions"].items():
        st = c["stages"]
        rows.append([name] + [f"{_fmt(st.get(k, {}).get('tokens'))} @ {_fmt(st.get(k, {}).get('tokens_per_s'), 0)}/s"
                              for k in ("transfer", "finetune")]
                    + [_fmt(c["wall_s"], 0), _fmt(st.get("finetune", {}).get("final_val_loss")),
                       " → ".join(_fmt(h["linear_share"], 2) for h in st.get("finetune", {}).get("linear_share_curve", []))])
    lines += ["## Conversions", "", *_table(["model", "stage 1 tokens @ tok/s", "stage 2 tokens @ tok/s", "wall s",
                                             "stage-2 val loss", "LA share during stage 2 (each eval)"], rows), ""]

    # perplexity
    for corpus in CORPORA:
        rows = []
        for name, m in res["models"].items():
            for mode, by_w in m["ppl"].get(corpus, {}).items():
                for w, r in by_w.items():
                    rows.append([name, mode, w, _fmt(r["inside"], 2), _fmt(r["beyond"], 2),
                                 _fmt(r.get("beyond_trained"), 2), _fmt(r.get("past_train"), 2),
                                 _fmt(r["beyond_block_sd"], 2)])
        lines += [f"## Perplexity, {corpus} ({'held-out speeches' if corpus == 'sotu' else 'never trained on'}),"
                  f" {s['ppl_blocks']} blocks of {s['ppl_block_size']}", "",
                  f"\"beyond w\" split at the training sequence length {s['seq_len']}: positions w..{s['seq_len'] - 1} "
                  f"occur in training sequences; from {s['seq_len']} on, the linear state holds more tokens than it "
                  "ever did in training.", "",
                  *_table(["model", "mode", "w", "inside w", "beyond w", f"w..{s['seq_len'] - 1}",
                           f">= {s['seq_len']}", "sd over blocks (beyond)"], rows), ""]

    # passkey
    dists = [str(d) for d in s["probe_distances"]]
    rows = []
    for name, m in res["models"].items():
        for mode, by_d in m["passkey"].items():
            rows.append([name, mode] + [f"{by_d[d]['acc']:.2f}" if d in by_d else "–" for d in dists])
    lengths = next((m["passkey"][md] for m in res["models"].values() for md in m["passkey"]), {})
    lines += [f"## Passkey retrieval ({s['probe_items']} items per distance, 5 choices, chance 0.20)", "",
              "Prompt length (tokens) per distance: " + ", ".join(f"{d}: {lengths[d]['length']}" for d in dists if d in lengths), "",
              *_table(["model", "mode"] + [f"@{d}" for d in dists], rows), ""]

    # zero-shot
    rows = []
    for name, m in res["models"].items():
        for t in [*zs, *s["full_suite"]]:
            for mode, by_w in m["tasks"].get(t, {}).items():
                for w, r in by_w.items():
                    rows.append([name, t, mode, w, f"{r['acc']:.3f} {_ci(r['ci'])}", f"{r['share_longer']:.2f}",
                                 f"{_fmt(r['acc_longer'])} {_ci(r['ci_longer'])} (n={r['n_longer']})"])
    lines += ["## Zero-shot (primary metric, 95% Wilson intervals)", "",
              *_table(["model", "task", "mode", "w", "score", "share of items > w", "score on items > w"], rows), ""]

    # paired gaps
    rows = []
    for name, m in res["models"].items():
        for t, g in m.get("gap", {}).items():
            lo = g["longer"]
            rows.append([name, t, f"{g['all']['mean']:+.3f} [{g['all']['low']:+.3f}, {g['all']['high']:+.3f}]",
                         f"{lo['mean']:+.3f} [{lo['low']:+.3f}, {lo['high']:+.3f}] (n={lo['n']})" if lo else "–"])
    lines += ["## hybrid − swa_only on the same items (paired, 95% normal interval)", "",
              *_table(["model", "task", "all items", "items > w"], rows), ""]

    # fraction of the teacher
    rows = []
    for name, m in res["models"].items():
        conv = m["conversion"]
        if not conv:
            continue
        w = conv["window"]
        base = teacher_average(res, w, zs)
        for mode in ("hybrid", "swa_only"):
            vals = [m["tasks"].get(t, {}).get(mode, {}).get(str(w), {}).get("acc") for t in zs]
            if base and all(v is not None for v in vals):
                rows.append([name, mode, f"{sum(vals) / len(vals):.3f}", f"{100 * sum(vals) / len(vals) / base:.1f}%"])
        lin = m["tasks"].get("arc_easy", {}).get("linear_only", {}).get(str(w))
        tb = res["models"].get("teacher", {}).get("tasks", {}).get("arc_easy", {}).get("base", {}).get(str(w))
        if lin and tb:
            rows.append([name, "linear_only (ARC-E only)", f"{lin['acc']:.3f}", f"{100 * lin['acc'] / tb['acc']:.1f}%"])
    lines += [f"## Share of the teacher's zero-shot average ({', '.join(zs)})", "",
              *_table(["model", "mode", "average", "of teacher"], rows), ""]

    # the five-task suite: every w=64 model ran it (hybrid); the best of each recipe is marked
    suite = zs + list(s["full_suite"])
    base5 = teacher_average(res, 64, suite)
    best = set(res.get("best_of_recipe", {}).values())
    rows = []
    for name, m in res["models"].items():
        mode = "hybrid" if m["conversion"] else "base"
        vals = [m["tasks"].get(t, {}).get(mode, {}).get("64", {}).get("acc") for t in suite]
        if all(v is not None for v in vals):
            avg = sum(vals) / len(vals)
            rows.append([name + (" (best of recipe)" if name in best else ""), mode] + [f"{v:.3f}" for v in vals]
                        + [f"{avg:.3f}", f"{100 * avg / base5:.1f}%" if base5 else "–"])
    lines += ["## Five-task suite (w=64 models in hybrid; best of recipe = highest three-task hybrid average)", "",
              *_table(["model", "mode", *suite, "average", "of teacher"], rows), ""]

    # seeds
    rows = []
    by_recipe: dict = {}
    for m in res["models"].values():
        conv = m["conversion"]
        if conv and not conv["softmax_sinks"]:
            r = m["ppl"].get("sotu", {}).get("hybrid", {}).get(str(conv["window"]))
            if r:
                by_recipe.setdefault((conv["recipe"], conv["window"]), []).append(r["beyond"])
    for (recipe, w), vals in sorted(by_recipe.items()):
        spread = f"{(max(vals) - min(vals)) / 2:.2f}" if len(vals) > 1 else "–"
        rows.append([recipe, str(w), str(len(vals)), f"{statistics.fmean(vals):.2f}", spread])
    lines += ["## Seed spread: hybrid perplexity beyond w, SOTU", "",
              *_table(["recipe", "w", "seeds", "mean", "half-range"], rows), ""]

    wall = sum(c["wall_s"] or 0 for c in res["conversions"].values())
    ev = sum(m["wall_s"] for m in res["models"].values())
    lines += ["## Cost", "", f"Conversions {wall / 3600:.2f} h, evaluation {ev / 3600:.2f} h of wall time on this machine.", ""]
    for png in ("perplexity_beyond.png", "passkey.png", "linear_share.png"):
        lines.append(f"![{png}]({png})")
    return "\n".join(lines) + "\n"


def plots(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(n, m) for n, m in res["models"].items() if m["conversion"]]
    if not models:
        return
    # perplexity beyond w per mode
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(models) + 2), 4))
    width = 0.27
    for j, mode in enumerate(MODES):
        ys = [m["ppl"].get("sotu", {}).get(mode, {}).get(str(m["conversion"]["window"]), {}).get("beyond", float("nan"))
              for _, m in models]
        ax.bar([i + (j - 1) * width for i in range(len(models))], ys, width, label=mode)
    t = res["models"].get("teacher", {}).get("ppl", {}).get("sotu", {}).get("base", {})
    if "64" in t:
        ax.axhline(t["64"]["beyond"], color="k", ls="--", lw=1, label="teacher (beyond 64)")
    ax.set_xticks(range(len(models)), [n for n, _ in models], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity beyond w (held-out SOTU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "perplexity_beyond.png", dpi=110)
    plt.close(fig)
    # passkey
    dists = [str(d) for d in res["study"]["probe_distances"]]
    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 3.6), sharey=True)
    for ax, mode in zip(axes, MODES):
        for n, m in [("teacher", res["models"].get("teacher"))] + models:
            if m is None:
                continue
            by_d = m["passkey"].get("base" if n == "teacher" else mode)
            if by_d:
                ax.plot([int(d) for d in dists], [by_d[d]["acc"] for d in dists], marker="o", ms=3, label=n,
                        color="k" if n == "teacher" else None, lw=2 if n == "teacher" else 1)
        ax.set_xscale("log", base=2)
        ax.axhline(0.2, color="gray", ls=":", lw=1)
        ax.set_title(mode)
        ax.set_xlabel("key distance (tokens)")
    axes[0].set_ylabel("passkey accuracy")
    axes[-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "passkey.png", dpi=110)
    plt.close(fig)
    # LA share: final per layer, and during stage 2
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for n, m in models:
        if "share_per_layer" in m:
            a1.plot(m["share_per_layer"], label=n, lw=1)
        curve = res["conversions"].get(n, {}).get("stages", {}).get("finetune", {}).get("linear_share_curve")
        if curve:
            a2.plot([h["step"] for h in curve], [h["linear_share"] for h in curve], marker=".", label=n, lw=1)
    a1.set_xlabel("layer")
    a1.set_ylabel("LA share of the normaliser (positions ≥ w)")
    a2.set_xlabel("stage-2 optimizer step")
    a2.set_ylabel("mean LA share")
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "linear_share.png", dpi=110)
    plt.close(fig)


def write_report(runner: Runner, draw: bool = True) -> None:
    """results.json and results.md; with `draw`, the plots too (about 3 s, so only at the end of a
    sitting and in --report-only, not after every model)."""
    res = collect(runner)
    _write_json(runner.out / "results.json", res)
    (runner.out / "results.md").write_text(render(res))
    if draw:
        plots(res, runner.out)


# --- command line ----------------------------------------------------------------------------------


def plan_text(runner: Runner) -> str:
    lines = [f"study {runner.study.name}: out {runner.out}, runs {runner.runs}"]
    def missing(name, pieces):
        n = len(runner.todo(name, pieces))
        return "done" if n == 0 else f"{n} of {len(pieces)} pieces to do"

    lines.append(f"  evaluate teacher: {missing('teacher', runner.teacher_pieces())}")
    arm = runner.sinks_arm(decide=False)
    for c in runner.conversions() + ([arm] if arm else []):
        record = runner.record_path(c).is_file()
        state = ("checkpoint here" if runner.converted(c) else
                 "done, checkpoint gone" + (" (converted again, last)" if runner.needs_reconversion(c) else "")
                 if record else "to do")
        lines.append(f"  {c.name}: convert {state}; evaluate {missing(c.name, runner.all_pieces(c))}")
    if arm is None and runner.study.softmax_sinks:
        lines.append(f"  the softmax-sinks arm: after the w=64 seed-0 conversions (best so far: {runner.best_for_sinks()})")
    est = estimate(runner)
    if est:
        lines.append(f"  measured so far: {est['done_h']:.2f} h; estimated remaining {est['left_h']:.2f} h "
                     f"(conversion {est['conversion_h']:.2f} h each, evaluation {est['evaluation_h']:.2f} h per "
                     "converted model, from the finished ones)")
    return "\n".join(lines)


def estimate(runner: Runner) -> dict | None:
    """Hours spent and left, from the wall times of finished conversions and evaluation pieces."""
    conv = [_read_json(runner.record_path(c)) for c in runner.conversions()]
    conv_s = [c.get("wall_s_including_load") for c in conv if c]
    ev, suite = {}, {}
    for c in runner.conversions():
        pieces = [_read_json(runner.piece_path(c.name, p)) for p in runner.pieces(c.name, True)]
        if all(pieces):
            ev[c.name] = sum(p["wall_s"] for p in pieces)
        pieces = [_read_json(runner.piece_path(c.name, p)) for p in runner.pieces(c.name, True, runner.study.full_suite)]
        if all(pieces):
            suite[c.name] = sum(p["wall_s"] for p in pieces)
    if not conv_s or not ev:
        return None
    per_conv, per_eval = statistics.fmean(conv_s) / 3600, statistics.fmean(ev.values()) / 3600
    per_suite = statistics.fmean(suite.values()) / 3600 if suite else per_eval / 4
    arm = runner.sinks_arm(decide=False)
    convs = runner.conversions() + ([arm] if arm else [Conversion("?", 64, 0, 1)] if runner.study.softmax_sinks else [])
    left = 0.0
    for c in convs:
        if not runner.record_path(c).is_file() or runner.needs_reconversion(c):
            left += per_conv
        left += 0 if c.name in ev else per_eval
        left += 0 if c.window != 64 or c.name in suite else per_suite
    teacher = sum((_read_json(runner.piece_path("teacher", p)) or {}).get("wall_s", 0)
                  for p in runner.teacher_pieces()) / 3600
    return {"done_h": sum(conv_s) / 3600 + sum(ev.values()) / 3600 + sum(suite.values()) / 3600 + teacher, "left_h": left,
            "conversion_h": per_conv, "evaluation_h": per_eval}


def same_study(recorded: dict, study: Study) -> bool:
    """Whether a study.json stamp records `study`. A field the stamp lacks (added to Study since the
    stamp was written) matches when `study` has that field's default: the older study ran with it."""
    now = json.loads(json.dumps(asdict(study)))
    defaults = {f.name: f.default for f in fields(Study) if f.default is not MISSING}
    old = {k: recorded.get(k, json.loads(json.dumps(defaults.get(k)))) for k in now}
    return old == now and set(recorded) <= set(now)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same pipeline on a 2-layer cut, tiny budgets (CI)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/reproduction[_smoke])")
    ap.add_argument("--runs", default=None, help="converted checkpoints (default runs/reproduction[_smoke])")
    ap.add_argument("--tokens", type=int, default=None, help="override the tokens per conversion")
    ap.add_argument("--plan", action="store_true", help="print what would run and what is finished, run nothing")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.{json,md} and the plots only")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    study = SMOKE if args.smoke else FULL
    if args.tokens is not None:
        if args.tokens < study.seq_len * 8:
            raise SystemExit(f"--tokens: expected at least one optimizer step ({study.seq_len * 8}), got {args.tokens}")
        study = replace(study, tokens=args.tokens)
    suffix = "_smoke" if args.smoke else ""
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"reproduction{suffix}")
    runs = Path(args.runs or ROOT / "runs" / f"reproduction{suffix}")
    stamp = out / "study.json"
    if stamp.is_file() and not same_study(_read_json(stamp)["study"], study):
        raise SystemExit(f"--out: {out} holds results of a differently sized study ({stamp}); "
                         "use another --out or remove it")
    _write_json(stamp, {"study": asdict(study)})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runner = Runner(study, out, runs, progress=not args.no_progress)
    if args.plan:
        print(plan_text(runner))
        return 0
    if args.report_only:
        runner.report()
        return 0
    runner.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
