"""`examples/reproduce_paper.py --smoke`: the whole reproduction pipeline on a 2-layer cut of the
real SmolLM2 teacher (conversions of every recipe, window and seed, the softmax-sinks arm, every
evaluation piece, the report), then resuming: a second run redoes nothing, and a removed piece is
the only thing recomputed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce_paper.py"
sys.path.insert(0, str(ROOT / "examples"))
import reproduce_paper as rp  # noqa: E402

RECIPES = ("lolcats", "linear_only", "hedgecats", "ssd")
MODES = ("hybrid", "swa_only", "linear_only")


def _run(out, runs, *extra):
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--no-progress", "--out", str(out), "--runs", str(runs), *extra]
    # a hang guard only: the study shares the 2-core machine with a second pytest worker
    # (scripts/run_tests.sh), where its first run took 508 s against 272-400 s alone
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    out, runs = root / "out", root / "runs"
    log = _run(out, runs)
    return out, runs, log


def test_every_conversion_and_evaluation_piece_is_there(study):
    out, runs, log = study
    converts = [line for line in log.splitlines() if "] convert " in line]
    assert len(converts) == 13 and all(f"--checkpoint-every {rp.STAGE1_CHECKPOINT_EVERY} " in c for c in converts)
    res = json.loads((out / "results.json").read_text())
    names = [f"{r}_w{w}_s{s}" for w, seeds in ((64, (0, 1)), (16, (0,))) for s in seeds for r in RECIPES]
    arms = [n for n in res["models"] if "_sinks4_" in n]
    assert len(arms) == 1 and arms[0].endswith("_w64_s0")
    assert set(res["models"]) == {"teacher", *names, *arms}
    for name in [*names, *arms]:
        m = res["models"][name]
        w = str(m["conversion"]["window"])
        for corpus in ("sotu", "austen"):
            assert set(m["ppl"][corpus]) == set(MODES)
            for mode in MODES:
                r = m["ppl"][corpus][mode][w]
                assert math.isfinite(r["inside"]) and math.isfinite(r["beyond"])
        assert set(m["passkey"]) == set(MODES)
        assert set(m["passkey"]["hybrid"]) == {"16", "48", "256"}
        assert set(m["tasks"]["arc_easy"]) == set(MODES) and set(m["tasks"]["piqa"]) == {"hybrid", "swa_only"}
        assert len(m["share"]) == 2 and len(m["share"][0]) == 9  # 2 converted layers x 9 heads
        curve = res["conversions"][name]["stages"]["finetune"]["linear_share_curve"]
        assert curve[0]["step"] == 0 and len(curve) >= 2
        saved = json.loads((runs / name / "config.json").read_text())["hybrid"]
        assert saved["window"] == int(w) and saved["training"]["recipe"] == m["conversion"]["recipe"]
        assert saved.get("softmax_sinks", 0) == (4 if name in arms else 0)
    # the same training data for both seeds, different training
    a, b = (json.loads((runs / f"lolcats_w64_s{s}" / "training_log.json").read_text()) for s in (0, 1))
    assert a["data"] == b["data"] and a["data"]["val_blocks"] == rp.SMOKE.max_val_blocks == 2
    assert a["stages"]["transfer"]["train_curve"] != b["stages"]["transfer"]["train_curve"]
    # the five-task suite ran for the teacher and every w=64 model (hybrid only), right after its conversion
    suite = {n for n, m in res["models"].items() if "winogrande" in m["tasks"]}
    assert suite == {"teacher", *(n for n in [*names, *arms] if "_w64_" in n)}
    for n in suite - {"teacher"}:
        assert set(res["models"][n]["tasks"]["winogrande"]) == {"hybrid"}
        assert set(res["models"][n]["tasks"]["arc_challenge"]) == {"hybrid"}
    assert sorted(res["best_of_recipe"]) == sorted(RECIPES)
    assert all(v.endswith(("_w64_s0", "_w64_s1")) and "_sinks" not in v for v in res["best_of_recipe"].values())
    arm = json.loads((out / "sinks_arm.json").read_text())
    assert arms[0] == f"{arm['recipe']}_sinks4_w64_s0" and arm["recipe"] == min(arm["beyond_ppl"], key=arm["beyond_ppl"].get)
    md = (out / "results.md").read_text()
    for heading in ("## Conversions", "## Perplexity, sotu", "## Passkey retrieval", "## Zero-shot",
                    "## hybrid − swa_only", "## Share of the teacher", "## Five-task suite", "## Seed spread", "## Cost"):
        assert heading in md
    for png in ("perplexity_beyond.png", "passkey.png", "linear_share.png"):
        assert (out / png).stat().st_size > 1000


def test_modes_were_evaluated_separately_and_agree_where_the_math_says(study):
    """Items no longer than w see no key beyond the window: hybrid and swa_only must score them the
    same (their linear branch is empty), while linear_only is a different function. Computed from
    the separately evaluated pieces, so a mode wired to the wrong computation fails here."""
    out, _, _ = study
    checked = 0
    for name in ("hedgecats_w64_s0", "lolcats_w64_s1"):
        pieces = {m: json.loads((out / "eval" / name / f"task_arc_easy_{m}.json").read_text()) for m in MODES}
        lengths = pieces["hybrid"]["lengths"]
        for i, L in enumerate(lengths):
            if L <= 64:
                assert pieces["hybrid"]["correct"][i] == pieces["swa_only"]["correct"][i]
                checked += 1
        # perplexity inside the window: hybrid == swa_only exactly, linear_only differs
        nll = {m: json.loads((out / "eval" / name / f"ppl_sotu_{m}.json").read_text())["nll"][0] for m in MODES}
        assert nll["hybrid"][:64] == pytest.approx(nll["swa_only"][:64], rel=1e-4)
        assert nll["hybrid"][64:] != pytest.approx(nll["swa_only"][64:], rel=1e-3)
        assert nll["linear_only"][:64] != pytest.approx(nll["hybrid"][:64], rel=1e-3)
    assert checked > 0


def test_rerun_skips_everything_and_recomputes_only_a_removed_piece(study):
    out, runs, _ = study
    before = json.loads((out / "results.json").read_text())
    log = _run(out, runs)
    assert "convert " not in log.replace("skip convert", "")
    assert "evaluate " not in log.replace("skip evaluate", "")
    after = json.loads((out / "results.json").read_text())
    assert after["models"] == before["models"]
    piece = out / "eval" / "ssd_w16_s0" / "passkey_passkey_swa_only.json"
    old = json.loads(piece.read_text())
    piece.unlink()
    log = _run(out, runs)
    redone = [line for line in log.splitlines() if "] evaluate " in line]
    assert len(redone) == 1 and "ssd_w16_s0: passkey passkey [swa_only]" in redone[0]
    assert json.loads(piece.read_text())["distances"] == old["distances"]  # deterministic


def test_a_lost_checkpoint_is_converted_again_only_for_missing_pieces(study):
    """runs/ need not survive a sitting: a model whose pieces are all there is never converted
    again; one with a missing piece is (last), and its first record is kept beside the rerun's."""
    import shutil

    out, runs, _ = study
    shutil.rmtree(runs / "ssd_w16_s0")  # every piece there: nothing to do
    shutil.rmtree(runs / "linear_only_w64_s1")
    (out / "eval" / "linear_only_w64_s1" / "task_winogrande_hybrid.json").unlink()
    first = json.loads((out / "conversions" / "linear_only_w64_s1.json").read_text())
    log = _run(out, runs)
    converted = [line for line in log.splitlines() if "] convert " in line]
    assert len(converted) == 1 and "convert linear_only_w64_s1:" in converted[0]
    redone = [line for line in log.splitlines() if "] evaluate " in line]
    assert len(redone) == 1 and "linear_only_w64_s1: task winogrande [hybrid]" in redone[0]
    rec = json.loads((out / "conversions" / "linear_only_w64_s1.json").read_text())
    assert rec["total_wall_s"] == first["total_wall_s"] and len(rec["reconversions"]) == 1
    assert rec["reconversions"][0]["max_abs_diff"] < 1e-3  # same seed and data: the same model


def test_a_differently_sized_study_is_refused(study, tmp_path):
    out, runs, _ = study
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--runs", str(runs),
                           "--tokens", "4096", "--plan"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "differently sized study" in proc.stderr


def test_a_stamp_from_before_a_study_field_existed():
    """study.json written before Study.max_val_blocks existed still matches the study it recorded when
    that study has the field's default (the full study ran with 64 validation blocks); anything else
    is a different study."""
    from dataclasses import asdict

    old_full = {k: v for k, v in json.loads(json.dumps(asdict(rp.FULL))).items() if k != "max_val_blocks"}
    assert rp.same_study(old_full, rp.FULL)
    old_smoke = {k: v for k, v in json.loads(json.dumps(asdict(rp.SMOKE))).items() if k != "max_val_blocks"}
    assert not rp.same_study(old_smoke, rp.SMOKE)  # the smoke study keeps 2, not the default
    assert rp.same_study(json.loads(json.dumps(asdict(rp.SMOKE))), rp.SMOKE)
    assert not rp.same_study({**old_full, "tokens": 1}, rp.FULL)
    assert not rp.same_study({**old_full, "unknown_field": 1}, rp.FULL)


def test_statistics():
    lo, hi = rp.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)  # textbook values
    assert rp.wilson(0, 20)[0] == 0.0 and rp.wilson(20, 20)[1] == 1.0
    d = rp.paired_diff([1, 1, 0, 1], [0, 1, 0, 0])
    assert d["mean"] == 0.5 and d["low"] < 0.5 < d["high"] and d["n"] == 4
    s = rp.ppl_split([[math.log(2.0)] * 4 + [math.log(8.0)] * 4], 4)
    assert s["inside"] == pytest.approx(2.0) and s["beyond"] == pytest.approx(8.0)
    s = rp.ppl_split([[math.log(2.0)] * 4 + [math.log(4.0)] * 2 + [math.log(16.0)] * 2], 4, train_len=6)
    assert s["beyond"] == pytest.approx(8.0) and s["beyond_trained"] == pytest.approx(4.0)
    assert s["past_train"] == pytest.approx(16.0) and s["train_len"] == 6
    assert "past_train" not in rp.ppl_split([[0.0] * 8], 4, train_len=4)  # nothing between w and the length
    t = rp.task_summary({"correct": [1, 0, 1, 1], "lengths": [10, 70, 80, 20], "metric": "acc"}, 64)
    assert t["acc"] == 0.75 and t["share_longer"] == 0.5 and t["acc_longer"] == 0.5 and t["n_longer"] == 2
