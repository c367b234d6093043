#!/usr/bin/env bash
# Sets up everything (see setup_env.sh), then runs the whole test suite on CPU, then the core tests
# again against the oldest supported stack (transformers 5.17 + huggingface_hub 1.x, as on the GPU
# machine). Extra args go to the main pytest run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
vpy="${VENV:-$root/.venv}/bin/python"
"$vpy" -m pytest -q tests "$@"
echo "[tests] core suite again on transformers 5.17 + huggingface_hub 1.x"
compat=$(PYTHON="$vpy" bash scripts/install_compat.sh)
PYTHONPATH="$compat" "$vpy" -m pytest -q tests/test_modeling.py tests/test_cache.py -p no:cacheprovider
