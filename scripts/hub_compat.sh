#!/usr/bin/env bash
# Installs huggingface_hub 1.x (1.33.0, as on the GPU machine), httpx (which hub 1.x uses instead of
# httpx2) and transformers 5.24.0 into a side directory, so the Hub round-trip test can run the newest
# transformers that still accepts hub 1.x against it, with that directory first on PYTHONPATH.
# (transformers 5.17-5.24 need huggingface_hub>=1.31; 5.25 requires >=2.4, so the venv's own
# transformers, when it is 5.25 or later, cannot run with hub 1.x: the import refuses it.)
# Idempotent; prints the directory. tests/test_hub.py calls it (CI needs PyPI for the first run).
# Usage: PYTHONPATH=$(bash scripts/hub_compat.sh) python -c "import huggingface_hub"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vpy=${PYTHON:-$root/.venv/bin/python}
dir=${HUB_COMPAT_DIR:-$root/.venv/compat-hub1-tf524}
if [ ! -f "$dir/.done" ]; then
  rm -rf "$dir"
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --no-deps --target "$dir" "huggingface_hub==1.33.0" "transformers==5.24.0" >&2
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --target "$dir" "httpx>=0.27,<1" >&2
  PYTHONPATH="$dir" "$vpy" -c "
import huggingface_hub as h, transformers as t
assert h.__version__.startswith('1.'), h.__version__
assert t.__version__ == '5.24.0', t.__version__
from transformers import LlamaForCausalLM" >&2
  touch "$dir/.done"
fi
echo "$dir"
