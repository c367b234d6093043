#!/usr/bin/env bash
# Installs the GPU machine's older stack (transformers 5.17 + huggingface_hub 1.x) into a side
# directory that is put first on PYTHONPATH, so the suite can check the oldest supported versions.
# Prints the directory. Usage: PYTHONPATH=$(bash scripts/install_compat.sh) python -m pytest ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vpy=${PYTHON:-$root/.venv/bin/python}
dir=${COMPAT_DIR:-$root/.venv/compat-tf517}
if [ ! -f "$dir/.done" ]; then
  rm -rf "$dir"
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --no-deps --target "$dir" "transformers==5.17.0" "huggingface_hub==1.33.0" >&2
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --target "$dir" "httpx>=0.27,<1" >&2
  touch "$dir/.done"
fi
echo "$dir"
