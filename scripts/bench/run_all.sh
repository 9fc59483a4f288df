#!/usr/bin/env bash
# Python benchmarks of issue #11 parts 4 and 5, run ON the GPU machine from the repo root with
# the prebuilt library (no cargo there):
#   1. sikv_ctypes.py     struct layouts vs the header, CPU end-to-end decode through ctypes
#   2. append_calibrate.py append (B = 1..64) and calibrate (8K/32K/128K) at one layer vs SDPA
#   3. whole_model.py     Llama-3.1-8B-shaped decode step as one CUDA graph: SDPA cuDNN / flash
#                         vs the library, 32K and 128K, B = 1, 8 and the largest that fits
#   4. plot.py            only when PLOT_CSV names a kernel-level CSV (columns via PLOT_ARGS)
# Usage: scripts/bench/run_all.sh [--quick | --smoke] [--lib PATH]
# Env: OUT (default ./bench_out) gets the CSVs and logs; the tables are printed last.
# Expected time on one H200: about 4 minutes, --quick about 1.5 minutes.
set -u
cd "$(dirname "$0")/../.."
QUICK=""
LIB=".gpu/libselfindexkv.so"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --smoke) QUICK="--smoke" ;; # tiny shapes on the CPU: checks the scripts without a GPU
    --lib) LIB="$2"; shift ;;
    *) echo "run_all: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
if [ ! -f "$LIB" ]; then
  echo "run_all: $LIB missing (build it with SIKV_CUDA_ARCHS=90 cargo build --release and copy target/release/libselfindexkv.so)" >&2
  exit 2
fi
declare -A RC
# Per-step time limits keep a hung step from eating the whole device session.
if [ -n "$QUICK" ]; then T_AC=150; T_WM=240; else T_AC=200; T_WM=420; fi

step() { # name, limit, log, command...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  echo "== $name"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$log" 2>&1
  RC[$name]=$?
  echo "   rc=${RC[$name]} ($((SECONDS - t0)) s), log $log"
  if [ "${RC[$name]}" != "0" ]; then tail -n 15 "$log"; fi
}

step ctypes 60 "$OUT/sikv_ctypes.log" python3 scripts/bench/sikv_ctypes.py --lib "$LIB"
step append_calibrate $T_AC "$OUT/append_calibrate.log" \
  python3 scripts/bench/append_calibrate.py $QUICK --lib "$LIB" --csv "$OUT/append_calibrate.csv"
step whole_model $T_WM "$OUT/whole_model.log" \
  python3 scripts/bench/whole_model.py $QUICK --lib "$LIB" --csv "$OUT/whole_model.csv"
if [ -n "${PLOT_CSV:-}" ]; then
  # shellcheck disable=SC2086 # PLOT_ARGS is a list of options
  step plot 60 "$OUT/plot.log" python3 scripts/bench/plot.py --csv "$PLOT_CSV" --out "$OUT/speedup.png" ${PLOT_ARGS:-}
fi

echo
echo "== results"
cat "$OUT/sikv_ctypes.log" 2>/dev/null | tail -n 6
for f in append_calibrate whole_model; do
  # The tables follow each script's closing "total N s" line.
  if [ -f "$OUT/$f.log" ]; then
    if grep -q '^total [0-9.]* s$' "$OUT/$f.log"; then sed -n '/^total [0-9.]* s$/,$p' "$OUT/$f.log"
    else tail -n 3 "$OUT/$f.log"; fi
  fi
done
echo
fail=0
for k in "${!RC[@]}"; do
  printf "  %-18s rc=%s\n" "$k" "${RC[$k]}"
  [ "${RC[$k]}" != "0" ] && fail=1
done
exit $fail
