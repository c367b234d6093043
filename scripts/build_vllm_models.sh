#!/usr/bin/env bash
# Builds the vLLM tests' checkpoints and HF references with the MAIN venv (tests/vllm/build_models.py:
# tiny random Llama / Qwen3 / partially converted Llama, the converted SmolLM2 teacher, bad-input
# configs, and HF generate() references), one thread, cached under $VLLM_VENV/cache/models-<key>, the key
# hashing the sources they depend on. Prints that folder as its last line; progress goes to stderr.
# Run by scripts/run_vllm_tests.sh beside the vLLM venv's install, and by scripts/run_tests.sh ahead of
# the vLLM stage, beside the core-suite stages.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv_dir=${VLLM_VENV:-$root/.venv-vllm}
main_py="${VENV:-$root/.venv}/bin/python"
[ -x "$main_py" ] || bash scripts/setup_env.sh >&2
key=$(cat tests/vllm/build_models.py tests/vllm/cases.py hf_hybrid_attn/*.py kernels/*.py | sha256sum | cut -c1-16)
models="$venv_dir/cache/models-$key"
if [ ! -f "$models/references.json" ]; then
  echo "[vllm-build] building the test checkpoints and HF references ($models)" >&2
  rm -rf "$venv_dir"/cache/models-*
  mkdir -p "$venv_dir/cache"
  if ! OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
      "$main_py" tests/vllm/build_models.py "$models.tmp" > "$models.log" 2>&1 || [ ! -f "$models.tmp/references.json" ]; then
    echo "[vllm-build] build failed; the end of $models.log:" >&2
    tail -n 40 "$models.log" >&2
    exit 1
  fi
  grep '^\[build\]' "$models.log" >&2 || true
  mv "$models.tmp" "$models"
fi
echo "$models"
