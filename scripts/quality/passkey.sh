#!/usr/bin/env bash
# Long-context retrieval (passkey) table in one command: builds what run.sh builds (downloads on first use),
# fetches Gemma 3 270M, runs passkey.py over both models and writes the per-method table.
# usage: scripts/quality/passkey.sh [OUT] [-- PASSKEY_PY_ARGS...]
#   OUT defaults to $EVAL_DIR/passkey; the table goes to OUT/passkey.csv and OUT/passkey.md, every answer
#   to OUT/passkey_rows.csv.gz
#   (docs/quality/passkey.csv is this CSV). PASSKEY_PY_ARGS override passkey.py's defaults, e.g.
#   --runs smollm2:4096 --keys 1 --jobs 2 --threads 1; anything after a second -- goes to the evaluator.
# SIKV_INCLUDE/SIKV_LIB: a prebuilt libselfindexkv (header directory, static library); else run.sh builds it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EVAL_DIR="${EVAL_DIR:-$ROOT/.eval}"
OUT="$EVAL_DIR/passkey"
if [[ $# -gt 0 && "$1" != "--" ]]; then OUT="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
LIB_ARGS=()
[[ -n "${SIKV_LIB:-}" ]] && LIB_ARGS=(--sikv-include "${SIKV_INCLUDE:-$ROOT/include}" --sikv-lib "$SIKV_LIB")
EVAL_DIR="$EVAL_DIR" bash "$ROOT/scripts/quality/run.sh" --build-only "${LIB_ARGS[@]}"
EVAL_DIR="$EVAL_DIR" bash "$ROOT/scripts/quality/fetch_gemma.sh"
mkdir -p "$OUT"
python3 "$ROOT/scripts/quality/passkey.py" --bin "$EVAL_DIR/eval-build/llama_cpp_eval" \
  --models-dir "$EVAL_DIR/model" --out "$OUT" --csv "$OUT/passkey.csv" --markdown "$OUT/passkey.md" \
  --rows "$OUT/passkey_rows.csv.gz" "$@"
