#!/usr/bin/env bash
# Regenerates requirements/lock.txt, the exact stack the README's commands install (pip constraints),
# from a venv on which the whole test suite passed: `bash scripts/lock.sh [VENV]` (default ./.venv).
# Workflow for a new upstream release: rm -rf .venv; bash scripts/setup_env.sh --unlocked;
# bash scripts/run_tests.sh; bash scripts/lock.sh; raise the upper bounds in pyproject.toml to the
# newest minors that passed; commit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
out="$root/requirements/lock.txt"
{
  echo "# Exact versions the test suite passed with (CPU, Python $("$venv/bin/python" -c 'import sys; print(".".join(map(str, sys.version_info[:2])))')), written by scripts/lock.sh on $(date -u +%F)."
  echo "# Used as pip constraints by scripts/setup_env.sh. torch: the CPU wheel here; any build of this version works."
  "$venv/bin/python" -m pip freeze --exclude-editable --all 2>/dev/null \
    | grep -v -E '^(-e |pip==|setuptools==|wheel==|hf[-_]hybrid[-_]attn)' \
    | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' | LC_ALL=C sort -f
} > "$out"
echo "[lock] wrote $out ($(grep -vc '^#' "$out") packages)"
