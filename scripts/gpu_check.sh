#!/usr/bin/env bash
# GPU validation, run ON the GPU machine from the repo root with the prebuilt bundle in .gpu/
# (made here by scripts/build_gpu_bundle.sh; no cargo needed there):
#   1. nvidia-smi line
#   2. .gpu/gpu_tests: every GPU test (kernels vs CPU stages, long sequence, CUDA graph)
#   3. compute-sanitizer memcheck and racecheck on a reduced run (SIKV_GPU_TEST_QUICK=1)
#   4. .gpu/gpu_bench (our kernels) and scripts/sdpa_baseline.py (PyTorch SDPA cuDNN / flash)
#   5. a summary table (last lines of the output)
# Logs and CSVs go to $OUT (default ./gpu_out). Env: STEPS (default "tests,memcheck,racecheck,
# bench": run a subset, e.g. to stay under a per-command time limit), BENCH_QUICK=1,
# MEMCHECK_CASES / RACECHECK_CASES (comma lists of case-name substrings; racecheck defaults to
# "encode,calibrate,select_attend_matrix"), SIKV_GPU_TEST_SEED to replay a seed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
declare -A RC
STEPS="${STEPS:-tests,demo,memcheck,racecheck,bench}"
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if [ ! -x .gpu/gpu_tests ]; then
  echo "gpu_check: .gpu/gpu_tests missing (run scripts/build_gpu_bundle.sh on the build machine)" >&2
  exit 2
fi
[ -f .gpu/BUILD_INFO ] && cat .gpu/BUILD_INFO

echo "== nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | tee "$OUT/nvidia_smi.log"

SAN=""
for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if command -v "$c" >/dev/null 2>&1; then SAN="$c"; break; fi
done

if want tests; then
  echo "== gpu tests"
  t0=$SECONDS
  .gpu/gpu_tests --nocapture --test-threads=1 > "$OUT/gpu_tests.log" 2>&1
  RC[tests]=$?
  grep -E "^  (ok|FAIL|PANIC)|gpu tests|seed|nvrtc|skipped|test result" "$OUT/gpu_tests.log"
  echo "   ($((SECONDS - t0)) s)"
  echo "== managed cache on the GPU vs the CPU backend"
  t0=$SECONDS
  .gpu/gpu_managed_tests --nocapture --test-threads=1 > "$OUT/gpu_managed.log" 2>&1
  RC[managed]=$?
  grep -E "managed GPU|skipped|test result|panicked" "$OUT/gpu_managed.log"
  echo "   ($((SECONDS - t0)) s)"
fi

if want demo; then
  echo "== demo (the README's first command) on the GPU"
  .gpu/sikv_demo --steps 8 > "$OUT/demo.log" 2>&1
  RC[demo]=$?
  cat "$OUT/demo.log"
fi

if [ -n "$SAN" ] && want memcheck; then
  echo "== compute-sanitizer memcheck (quick sizes)"
  t0=$SECONDS
  SIKV_GPU_TEST_QUICK=1 SIKV_GPU_TEST_ONLY="${MEMCHECK_CASES:-}" "$SAN" --tool memcheck --error-exitcode 3 \
    .gpu/gpu_tests --exact gpu --nocapture --test-threads=1 > "$OUT/memcheck.log" 2>&1
  RC[memcheck]=$?
  grep -E "ERROR SUMMARY|^  (ok|FAIL|PANIC)" "$OUT/memcheck.log" | tail -12
  echo "   ($((SECONDS - t0)) s)"
  echo "== compute-sanitizer memcheck, managed cache (quick sizes)"
  SIKV_GPU_TEST_QUICK=1 "$SAN" --tool memcheck --error-exitcode 3 .gpu/gpu_managed_tests --nocapture --test-threads=1 > "$OUT/memcheck_managed.log" 2>&1
  RC[memcheck_managed]=$?
  grep -E "ERROR SUMMARY|managed GPU|test result" "$OUT/memcheck_managed.log" | tail -4
fi
if [ -n "$SAN" ] && want racecheck; then
  echo "== compute-sanitizer racecheck (quick sizes, cases: ${RACECHECK_CASES:-encode,calibrate,select_attend_matrix})"
  t0=$SECONDS
  SIKV_GPU_TEST_QUICK=1 SIKV_GPU_TEST_ONLY="${RACECHECK_CASES:-encode,calibrate,select_attend_matrix}" \
    "$SAN" --tool racecheck --error-exitcode 3 .gpu/gpu_tests --exact gpu --nocapture --test-threads=1 > "$OUT/racecheck.log" 2>&1
  RC[racecheck]=$?
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|^  (ok|FAIL|PANIC)" "$OUT/racecheck.log" | tail -12
  echo "   ($((SECONDS - t0)) s)"
fi
if [ -z "$SAN" ]; then
  echo "== compute-sanitizer not found: memcheck / racecheck skipped"
fi

if want bench; then
  Q=""
  [ "${BENCH_QUICK:-0}" = "1" ] && Q="--quick"
  echo "== gpu bench"
  t0=$SECONDS
  .gpu/gpu_bench $Q --csv "$OUT/gpu_bench.csv" > "$OUT/gpu_bench.log" 2>&1
  RC[bench]=$?
  echo "   ($((SECONDS - t0)) s)"
  echo "== sdpa baseline"
  t0=$SECONDS
  python3 scripts/sdpa_baseline.py $Q --csv "$OUT/sdpa_baseline.csv" > "$OUT/sdpa_baseline.log" 2>&1
  RC[sdpa]=$?
  echo "   ($((SECONDS - t0)) s)"
fi

echo
echo "== summary"
for k in tests managed demo memcheck memcheck_managed racecheck bench sdpa; do
  [ -n "${RC[$k]+x}" ] && printf "  %-10s rc=%s\n" "$k" "${RC[$k]}"
done
python3 - "$OUT" <<'EOF'
import csv, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return list(csv.DictReader(f))
ours = load("gpu_bench.csv")
sdpa = load("sdpa_baseline.csv")
if not ours:
    print("  (no bench results)")
    sys.exit(0)
t = {}
for r in ours:
    t[(r["kernel"], int(r["N"]), int(r["batch"]))] = r
s = {}
for r in sdpa:
    if r.get("median_us"):
        s[(r["backend"], int(r["N"]), int(r["batch"]))] = float(r["median_us"])
keys = sorted({(n, b) for (_, n, b) in t})
hdr = f"  {'N':>7} {'B':>2} {'k':>5} {'score':>7} {'topk':>7} {'rerank':>7} {'attend':>7} {'step':>8} {'dense':>8} {'cudnn':>8} {'flash':>8} {'x dense':>7} {'x cudnn':>7} {'x flash':>7}  score GB/s  attend GB/s"
print("  times in us (median); x = speedup of the sparse step")
print(hdr)
for n, b in keys:
    g = lambda k: float(t[(k, n, b)]["median_us"]) if (k, n, b) in t else float("nan")
    bw = lambda k: float(t[(k, n, b)]["GBps"]) if (k, n, b) in t else float("nan")
    step, dense = g("step"), g("dense_ours")
    cu = s.get(("cudnn", n, b), float("nan"))
    fl = s.get(("flash", n, b), float("nan"))
    k = t[("step", n, b)]["k"] if ("step", n, b) in t else "?"
    print(f"  {n:>7} {b:>2} {k:>5} {g('score'):>7.1f} {g('topk'):>7.1f} {g('rerank'):>7.1f} {g('attend'):>7.1f} {step:>8.1f} {dense:>8.1f} {cu:>8.1f} {fl:>8.1f} {dense/step:>7.2f} {cu/step:>7.2f} {fl/step:>7.2f}  {bw('score'):>10.0f}  {bw('attend'):>11.0f}")
EOF
# Everything in one archive plus the two CSVs, so that all of it comes back from the GPU machine.
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./*.log 2>/dev/null && rm -f ./*.log)
fail=0
for k in "${!RC[@]}"; do [ "${RC[$k]}" != "0" ] && fail=1; done
exit $fail
