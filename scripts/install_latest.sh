#!/usr/bin/env bash
# Installs the newest transformers and huggingface_hub releases on PyPI today (with whatever they
# need, at its newest) into a side directory that is put first on PYTHONPATH, so the core suites
# can run against the stack a user who installs today may get next, ignoring requirements/lock.txt
# and pyproject's upper bounds. Re-resolved once a day. Prints the directory.
# Usage: PYTHONPATH=$(bash scripts/install_latest.sh) python -m pytest ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vpy=${PYTHON:-$root/.venv/bin/python}
dir=${LATEST_DIR:-$root/.venv/latest-tf}
today=$(date -u +%F)
if [ "$(cat "$dir/.done" 2>/dev/null)" != "$today" ]; then
  rm -rf "$dir"
  env -u PIP_CONSTRAINT "$vpy" -m pip install -q --upgrade --target "$dir" transformers huggingface_hub >&2
  echo "$today" > "$dir/.done"
fi
echo "$dir"
