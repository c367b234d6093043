#!/usr/bin/env bash
# Installs huggingface_hub 1.x (1.33.0, as on the GPU machine) and httpx (which hub 1.x uses instead of
# httpx2) into a side directory, so the Hub round-trip test can run transformers from the venv against
# hub 1.x with that directory first on PYTHONPATH (transformers 5.23 needs huggingface_hub>=1.31).
# Idempotent; prints the directory. tests/test_hub.py calls it (CI needs PyPI for the first run).
# Usage: PYTHONPATH=$(bash scripts/hub_compat.sh) python -c "import huggingface_hub"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vpy=${PYTHON:-$root/.venv/bin/python}
dir=${HUB_COMPAT_DIR:-$root/.venv/compat-hub1}
if [ ! -f "$dir/.done" ]; then
  rm -rf "$dir"
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --no-deps --target "$dir" "huggingface_hub==1.33.0" >&2
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --target "$dir" "httpx>=0.27,<1" >&2
  PYTHONPATH="$dir" "$vpy" -c "import huggingface_hub as h; assert h.__version__.startswith('1.'), h.__version__" >&2
  touch "$dir/.done"
fi
echo "$dir"
