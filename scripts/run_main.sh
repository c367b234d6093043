#!/usr/bin/env bash
# Sets up everything (see setup_env.sh), then runs the main job on the embedded default: convert the
# real SmolLM2-135M-Instruct teacher (Q4_1, dequantized) and print its component diagnostics.
# Extra args go to `hf-hybrid demo` (e.g. --limit 50 --out runs/demo).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec "${VENV:-$root/.venv}/bin/hf-hybrid" demo "$@"
