#!/usr/bin/env bash
# GPU validation, run ON the GPU machine from the repo root with the prebuilt bundle in .gpu/
# (made here by scripts/build_gpu_bundle.sh; no cargo needed there):
#   1. nvidia-smi line
#   2. .gpu/gpu_tests: every GPU test, one libtest test per case named <stage>::<case>
#      (setup::, encode::, decode::, graph::; tests/gpu/), then .gpu/gpu_managed_tests
#   3. compute-sanitizer memcheck and racecheck on a reduced run (SIKV_GPU_TEST_QUICK=1)
#   4. .gpu/gpu_bench (our kernels) and scripts/sdpa_baseline.py (PyTorch SDPA cuDNN / flash)
#      and the crossover's path against them (speedup.csv, speedup.png: scripts/bench/speedup_csv.py,
#      plot.py)
#   (step `samples`: the C++ engine sample and TensorRT plugin harness with --device cuda;
#   `sanitize`: every compute-sanitizer tool over every test binary; `profile`: ncu per kernel;
#   `profile_sass`: ncu per SASS instruction, PROFILE_KERNELS / PROFILE_SIZES / PROFILE_COUNT,
#   PROFILE_ONLY (gpu_bench's --only rows, so that the first launches the filter matches are
#   that row's: the combine runs in the sparse rows before the dense decode's);
#   both profile PROFILE_BENCH, a gpu_bench build, default .gpu/gpu_bench;
#   `dense_groups`: the ignored diagnosis decode::dense_decode_groups, three seeds; `probe`:
#   scripts/diag/latency_probe.cu, the fixed costs of launches, barriers and loads; `timeline`:
#   each kernel of a decode step on the device's clock, scripts/bench/step_timeline.py;
#   `crossover`: the dense decode and the sparse step around each of the default crossover's
#   bounds, scripts/bench/crossover_check.py, batches CROSSOVER_B; `ab`: gpu_bench builds
#   against each other in alternating rounds, AB_BUILDS / AB_ARGS / AB_ROUNDS,
#   scripts/bench/ab_rounds.py)
#   5. a summary table (last lines of the output)
# Logs and CSVs go to $OUT (default ./gpu_out). Env: STEPS (default "tests,memcheck,racecheck,
# bench": run a subset, e.g. to stay under a per-command time limit), BENCH_QUICK=1,
# MEMCHECK_CASES / RACECHECK_CASES (comma lists of libtest name filters, substrings of
# <stage>::<case>; memcheck defaults to every case, racecheck to
# "encode::encode_bit_exact,encode::calibrate_bit_exact,decode::select_attend_matrix"),
# SIKV_TEST_SEED to replay a seed (every case prints its own). Bench options (step `bench`):
# BASELINE (older gpu_bench builds timed in the same run; the summary compares the first),
# ROUTE_MSL / ROUTE_N / ROUTE_B (the routed decode under a longer max_seq_len; ROUTE_FORK_AB=1
# times it again with SIKV_ROUTE_FORK=off), FIT_N / FIT_B
# (more sizes for the crossover's break-even), PDL_AB=1, FUSED_AB=1, DENSE_MIN_AB, BENCH_ARGS,
# PROFILES (e.g. 4+1: this build and the baselines again with that storage profile). The `tests`
# step also runs
# the decode and graph tests with SIKV_ATTEND_SPAN=3 (the sparse attend's multi-group splits).
# A run whose filters select no test fails, and so does a GPU test that skipped for want of a
# CUDA device: on the GPU machine that is a broken setup, not a pass.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
declare -A RC
STEPS="${STEPS:-tests,samples,demo,memcheck,racecheck,bench,model}"
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# libtest exits 0 when its filters match no test, and a test without a device returns early as a
# pass; both are failures here. Prints why and returns non-zero.
check_log() {
  local log=$1 what=$2 rc=0
  if ! grep -qE "^running [0-9]+ tests?$" "$log" || grep -qE "^running 0 tests$" "$log"; then
    echo "   $what: no test ran (filters: ${3:-none})"
    rc=4
  fi
  local skipped
  skipped=$(grep -o "skipped: no CUDA device ([^)]*)" "$log" | wc -l)
  if [ "$skipped" -gt 0 ]; then
    echo "   $what: $skipped tests skipped: no CUDA device"
    rc=5
  fi
  return $rc
}
# MEMCHECK_CASES / RACECHECK_CASES: comma list -> libtest filter arguments.
filters() { tr ',' ' ' <<<"$1"; }

# Each step needs its binaries from the bundle: a bench- or profile-only run carries gpu_bench
# alone (the bundle is larger than one transfer can take).
need=()
if want tests || want dense_groups || want memcheck || want racecheck || want sanitize; then need+=(gpu_tests); fi
if want bench || want profile || want profile_sass || want crossover; then need+=(gpu_bench); fi
for b in "${need[@]}"; do
  if [ ! -x ".gpu/$b" ]; then
    echo "gpu_check: .gpu/$b missing for STEPS=$STEPS (run scripts/build_gpu_bundle.sh on the build machine)" >&2
    exit 2
  fi
done
[ -f .gpu/BUILD_INFO ] && cat .gpu/BUILD_INFO

echo "== nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | tee "$OUT/nvidia_smi.log"

SAN=""
for c in compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if command -v "$c" >/dev/null 2>&1; then SAN="$c"; break; fi
done

# One test binary: run it, keep its log, print the lines matching `pattern`, check the log.
run_tests() { # key title binary pattern
  local key=$1 title=$2 bin=$3 pattern=$4 log="$OUT/$3.log" t0=$SECONDS
  echo "== $title"
  ".gpu/$bin" --nocapture --test-threads=1 > "$log" 2>&1
  RC[$key]=$?
  grep -E "$pattern|skipped|panicked|test result" "$log"
  check_log "$log" "$bin" || RC[$key]=$?
  echo "   ($((SECONDS - t0)) s)"
}

if want tests; then
  # One line per case ("test <name> ... <first output line>"), its time, and any failure.
  run_tests tests "gpu tests" gpu_tests "^test |: [0-9]+\.[0-9] s$|gpu tests on"
  # The decode and graph cases again under settings the test sizes would not take: the sparse
  # attend's multi-tile splits (large batch only), the kept entries' splits of 16 and of 32 at
  # every batch (by default 16 at batch 1-2 and 32 at batch 4 of 8 KV heads), the select's
  # chain of launches and the fused select (each taken by some shapes only), and 64 candidate
  # slots per row (rows whose threshold bin overflows them take the final select's one-CTA
  # fallback, in either plan), and the dense decode's candidate chunks at their fewest
  # positions (more chunks per sequence), and one compaction block per row in the chain (each
  # block takes every tile of its row, as long rows at large batch do), and the histograms
  # zeroed by a memset instead of hist_zero, and the chain's final select forced to one CTA
  # per row and to clusters of two (the rule's size follows each case's rows, so the default
  # run alone need not reach every entry), and the score's one-row entry where the rule would
  # take its wide one (the tests' grids are small). '+' joins the settings of one run.
  for env in SIKV_ATTEND_SPAN=3 SIKV_KEPT_SPLIT=16 SIKV_KEPT_SPLIT=32 SIKV_FUSED=off SIKV_FUSED=on SIKV_TOPK=multi:64 SIKV_DENSE_MIN_CHUNK=64 \
    SIKV_COMPACT_BLOCKS=1+SIKV_FUSED=off SIKV_HIST_ZERO=memset+SIKV_FUSED=off \
    SIKV_FINAL_CLUSTER=1+SIKV_FUSED=off SIKV_FINAL_CLUSTER=2+SIKV_FUSED=off SIKV_SCORE_WIDE=off+SIKV_FUSED=off; do
    tag=${env#SIKV_}; tag=${tag%%+*}; tag=$(tr 'A-Z=:' 'a-z__' <<<"$tag")
    echo "== gpu tests, decode with ${env//+/ }"
    log="$OUT/gpu_tests_$tag.log"; t0=$SECONDS
    # shellcheck disable=SC2086 # one word per setting
    env ${env//+/ } .gpu/gpu_tests --nocapture --test-threads=1 decode:: graph:: > "$log" 2>&1
    rc=$?
    grep -E "panicked|test result" "$log"
    check_log "$log" "gpu_tests $env" || rc=$?
    RC[tests_$tag]=$rc
    echo "   ($((SECONDS - t0)) s)"
  done
  run_tests managed "managed cache on the GPU vs the CPU backend" gpu_managed_tests "managed GPU|stateless ABI|seed ="
  run_tests abi "both ABI layers on device memory, graph capture, faults and poisoning" gpu_abi_tests "^test |worst|seed ="
  run_tests adversarial "adversarial inputs, GPU vs CPU" adversarial_tests "GPU = CPU"
  run_tests sharding "tensor-parallel shards vs the unsharded cache" sharding_tests "shards of"
fi

# dense_groups (not in the default STEPS): the ignored diagnosis decode::dense_decode_groups
# (docs/RELIABILITY.md §13), three times with new random seeds; every configuration that missed
# is listed in its log.
if want dense_groups; then
  RC[dense_groups]=0
  for i in 1 2 3; do
    echo "== gpu tests, dense decode by group size ($i)"
    log="$OUT/gpu_tests_dense_groups_$i.log"
    .gpu/gpu_tests --ignored --nocapture --test-threads=1 decode::dense_decode_groups > "$log" 2>&1
    rc=$?
    grep -E "seed =|configurations missed|^  d [0-9]+ G|test result" "$log" | cut -c1-200
    RC[dense_groups]=$(( ${RC[dense_groups]} | rc ))
  done
fi

# probe (not in the default STEPS): scripts/diag/latency_probe.cu, compiled here with this
# machine's nvcc: the fixed costs of launches, barriers, dependent loads and merges.
if want probe; then
  echo "== latency probe"
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if "$NVCC" -O3 -std=c++17 -arch=sm_90 scripts/diag/latency_probe.cu -o "$OUT/latency_probe" > "$OUT/latency_probe_build.log" 2>&1; then
    "$OUT/latency_probe" "$OUT/latency_probe.csv" 2>&1 | tee "$OUT/latency_probe.log"
    RC[probe]=${PIPESTATUS[0]}
  else
    cat "$OUT/latency_probe_build.log"
    RC[probe]=2
  fi
  rm -f "$OUT/latency_probe"
fi

if want samples; then
  # The C++ samples on device memory and their own streams (built by build_gpu_bundle.sh
  # against the CUDA runtime; libcudart from the toolkit here).
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64"
  RC[samples]=0
  for s in "engine_sample_cuda --device cuda --steps 32" "trt_plugin_harness_cuda --device cuda --steps 16"; do
    bin=${s%% *}
    if [ ! -x ".gpu/$bin" ]; then
      echo "== $bin: not in the bundle"
      RC[samples]=2
      continue
    fi
    echo "== $s"
    ".gpu/$bin" ${s#* } > "$OUT/$bin.log" 2>&1
    rc=$?
    tail -4 "$OUT/$bin.log"
    echo "   rc=$rc"
    [ "$rc" = "0" ] || RC[samples]=$rc
  done
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
  # The NVRTC compile test launches nothing: left out of the sanitizer runs.
  # shellcheck disable=SC2046
  SIKV_GPU_TEST_QUICK=1 "$SAN" --tool memcheck --error-exitcode 3 \
    .gpu/gpu_tests $(filters "${MEMCHECK_CASES:-}") --skip nvrtc_compiles_embedded_sources \
    --nocapture --test-threads=1 > "$OUT/memcheck.log" 2>&1
  RC[memcheck]=$?
  grep -E "ERROR SUMMARY|^test |panicked|test result" "$OUT/memcheck.log" | tail -14
  check_log "$OUT/memcheck.log" memcheck "${MEMCHECK_CASES:-}" || RC[memcheck]=$?
  echo "   ($((SECONDS - t0)) s)"
  echo "== compute-sanitizer memcheck, managed cache (quick sizes)"
  SIKV_GPU_TEST_QUICK=1 "$SAN" --tool memcheck --error-exitcode 3 .gpu/gpu_managed_tests --skip create_beyond_device_memory_is_refused_cleanly --nocapture --test-threads=1 > "$OUT/memcheck_managed.log" 2>&1
  RC[memcheck_managed]=$?
  grep -E "ERROR SUMMARY|managed GPU|test result" "$OUT/memcheck_managed.log" | tail -4
  check_log "$OUT/memcheck_managed.log" memcheck_managed || RC[memcheck_managed]=$?
  echo "== compute-sanitizer memcheck, adversarial engine-owned device tables"
  "$SAN" --tool memcheck --error-exitcode 3 .gpu/gpu_abi_tests --exact adversarial_device_tables_stay_inside_the_pools \
    device_fault_word_reports_a_bad_sequence_slot_on_the_next_call --nocapture --test-threads=1 > "$OUT/memcheck_abi.log" 2>&1
  RC[memcheck_abi]=$?
  grep -E "ERROR SUMMARY|reported on the next call|test result" "$OUT/memcheck_abi.log" | tail -12
  check_log "$OUT/memcheck_abi.log" memcheck_abi || RC[memcheck_abi]=$?
fi
if [ -n "$SAN" ] && want racecheck; then
  RACE="${RACECHECK_CASES:-encode::encode_bit_exact,encode::calibrate_bit_exact,decode::select_attend_matrix}"
  echo "== compute-sanitizer racecheck (quick sizes, cases: $RACE)"
  t0=$SECONDS
  # shellcheck disable=SC2046
  SIKV_GPU_TEST_QUICK=1 "$SAN" --tool racecheck --error-exitcode 3 \
    .gpu/gpu_tests $(filters "$RACE") --skip nvrtc_compiles_embedded_sources \
    --nocapture --test-threads=1 > "$OUT/racecheck.log" 2>&1
  RC[racecheck]=$?
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|^test |panicked|test result" "$OUT/racecheck.log" | tail -14
  check_log "$OUT/racecheck.log" racecheck "$RACE" || RC[racecheck]=$?
  echo "   ($((SECONDS - t0)) s)"
fi
if [ -n "$SAN" ] && want sanitize; then
  # Every compute-sanitizer tool over every GPU test binary (quick sizes). Left out: the child
  # process of sticky_cuda_error_poisons_the_handle (faults on purpose) and
  # create_beyond_device_memory_is_refused_cleanly (its refused cuMemAlloc is an API error by
  # design, which memcheck counts).
  echo "== compute-sanitizer, every tool over every GPU test binary (quick sizes)"
  t0=$SECONDS
  RC[sanitize]=0
  # SANITIZE_TOOLS / SANITIZE_BINS (comma lists) narrow the matrix, e.g. to re-run one finding;
  # SANITIZE_SKIP (comma list of test names) leaves tests out; SANITIZE_RUN_TIMEOUT_S bounds
  # each run (default 150 s).
  for tool in $(tr , " " <<<"${SANITIZE_TOOLS:-memcheck,initcheck,synccheck,racecheck}"); do
    for bin in $(tr , " " <<<"${SANITIZE_BINS:-gpu_tests,gpu_managed_tests,gpu_abi_tests,adversarial_tests,sharding_tests}"); do
      log="$OUT/san_${tool}_${bin}.log"
      if [ $((SECONDS - t0)) -gt "${SANITIZE_BUDGET_S:-330}" ]; then
        printf "   %-10s %-18s not run: the step's time budget (%s s) is spent\n" "$tool" "$bin" "${SANITIZE_BUDGET_S:-330}"
        RC[sanitize]=4
        continue
      fi
      t1=$SECONDS
      skips=()
      for t in $(tr , " " <<<"${SANITIZE_SKIP:-}"); do skips+=(--skip "$t"); done
      SIKV_GPU_TEST_QUICK=1 timeout "${SANITIZE_RUN_TIMEOUT_S:-150}" "$SAN" --tool "$tool" --error-exitcode 3 ".gpu/$bin" \
        --skip nvrtc_compiles_embedded_sources --skip sticky_cuda_error_poisons_the_handle \
        --skip create_beyond_device_memory_is_refused_cleanly "${skips[@]}" \
        --nocapture --test-threads=1 > "$log" 2>&1
      rc=$?
      summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
      result=$(grep -E "^test result" "$log" | tail -1)
      printf "   %-10s %-18s rc=%-3s %4s s  %s | %s\n" "$tool" "$bin" "$rc" "$((SECONDS - t1))" "${summary:-no summary}" "${result:-no test result}"
      # rc 3: the tool found something; other non-zero codes are test failures (reported by
      # the tests step) unless the tool printed no summary at all.
      if [ "$rc" = "3" ] || [ -z "$summary" ]; then RC[sanitize]=3; fi
    done
  done
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
  # BENCH_ARGS: extra gpu_bench arguments for this build and the baselines (e.g. --n 65536).
  # shellcheck disable=SC2086
  .gpu/gpu_bench $Q ${BENCH_ARGS:-} --csv "$OUT/gpu_bench.csv" > "$OUT/gpu_bench.log" 2>&1
  RC[bench]=$?
  echo "   ($((SECONDS - t0)) s)"
  # BASELINE=path/to/an/older/gpu_bench[,another] times earlier builds in the same run
  # (before/after): base_gpu_bench.csv, base2_gpu_bench.csv, ...
  BASELINE="${BASELINE:-}"
  PROFILES="${PROFILES:-}"
  # The baselines with extra gpu_bench arguments: bench_baselines RC_KEY FILE_PREFIX LABEL ARGS...
  bench_baselines() {
    local key=$1 prefix=$2 label=$3 i=1 base tag
    shift 3
    for base in ${BASELINE//,/ }; do
      [ -x "$base" ] || continue
      tag=base; [ $i -gt 1 ] && tag=base$i
      echo "== gpu bench, ${label}baseline build $i ($base)"
      # shellcheck disable=SC2086
      "$base" $Q ${BENCH_ARGS:-} "$@" --csv "$OUT/${prefix}${tag}_gpu_bench.csv" > "$OUT/${prefix}${tag}_gpu_bench.log" 2>&1
      RC[$key]=$(( ${RC[$key]:-0} | $? ))
      i=$((i + 1))
    done
  }
  bench_baselines base_bench "" ""
  # PROFILES=4+1[,..]: this build and the baselines again with another storage profile
  # (gpu_bench --profile): p4_1_gpu_bench.csv, p4_1_base_gpu_bench.csv, ...
  for prof in ${PROFILES//,/ }; do
    ptag="p${prof//+/_}"
    echo "== gpu bench, profile $prof"
    # shellcheck disable=SC2086
    .gpu/gpu_bench $Q ${BENCH_ARGS:-} --profile "$prof" --csv "$OUT/${ptag}_gpu_bench.csv" > "$OUT/${ptag}_gpu_bench.log" 2>&1
    RC[profile_bench]=$(( ${RC[profile_bench]:-0} | $? ))
    bench_baselines profile_bench "${ptag}_" "profile $prof, " --profile "$prof"
  done
  # PDL_AB=1: the same build again without programmatic dependent launch (SIKV_PDL=0).
  if [ "${PDL_AB:-0}" = "1" ]; then
    echo "== gpu bench, SIKV_PDL=0"
    SIKV_PDL=0 .gpu/gpu_bench $Q --csv "$OUT/nopdl_gpu_bench.csv" > "$OUT/nopdl_gpu_bench.log" 2>&1
    RC[nopdl_bench]=$?
  fi
  # FUSED_AB=1: the same build with the select's chain of launches at every size
  # (SIKV_FUSED=off) and with the fused select wherever it fits (SIKV_FUSED=on).
  if [ "${FUSED_AB:-0}" = "1" ]; then
    for mode in off on; do
      echo "== gpu bench, SIKV_FUSED=$mode"
      # shellcheck disable=SC2086
      SIKV_FUSED=$mode .gpu/gpu_bench $Q ${BENCH_ARGS:-} --csv "$OUT/fused_${mode}_gpu_bench.csv" > "$OUT/fused_${mode}_gpu_bench.log" 2>&1
      RC[fused_bench]=$(( ${RC[fused_bench]:-0} | $? ))
    done
  fi
  # DENSE_MIN_AB="128 256": the same build with attend_dense's floor on a chunk's positions set
  # to each value at every batch (SIKV_DENSE_MIN_CHUNK), at DENSE_MIN_N x DENSE_MIN_B, and once
  # more with max_seq_len DENSE_MIN_MSL (short sequences under a long declared maximum, where the
  # floor decides how many of the grid's chunks a sequence takes).
  if [ -n "${DENSE_MIN_AB:-}" ]; then
    for m in default $DENSE_MIN_AB; do
      echo "== gpu bench, SIKV_DENSE_MIN_CHUNK=$m"
      env_m=(); [ "$m" = default ] || env_m=(SIKV_DENSE_MIN_CHUNK="$m")
      env "${env_m[@]}" .gpu/gpu_bench --n "${DENSE_MIN_N:-8192,16384,32768,65536}" --batch "${DENSE_MIN_B:-1,2,4,8}" \
        --csv "$OUT/dmc_${m}_gpu_bench.csv" > "$OUT/dmc_${m}_gpu_bench.log" 2>&1
      RC[dmc_bench]=$(( ${RC[dmc_bench]:-0} | $? ))
      env "${env_m[@]}" .gpu/gpu_bench --max-seq-len "${DENSE_MIN_MSL:-131072}" --n 8192,32768 --batch 1,8 \
        --csv "$OUT/dmc_${m}_msl_gpu_bench.csv" > "$OUT/dmc_${m}_msl_gpu_bench.log" 2>&1
      RC[dmc_bench]=$(( ${RC[dmc_bench]:-0} | $? ))
    done
  fi
  # ROUTE_MSL: the stateless decode's device-side crossover where max_seq_len exceeds the live
  # length (an engine that declares a long maximum): gpu_bench at that max_seq_len, shorter N.
  if [ -n "${ROUTE_MSL:-}" ]; then
    echo "== gpu bench, max_seq_len $ROUTE_MSL (routed decode)"
    .gpu/gpu_bench --max-seq-len "$ROUTE_MSL" --n "${ROUTE_N:-8192,32768}" --batch "${ROUTE_B:-1,4}" \
      --csv "$OUT/msl_gpu_bench.csv" > "$OUT/msl_gpu_bench.log" 2>&1
    RC[msl_bench]=$?
    grep -E "^(step|dense_ours|routed) " "$OUT/msl_gpu_bench.log"
    # ROUTE_FORK_AB=1: the same with the routed decode's paths in stream order under the graph
    # capture (SIKV_ROUTE_FORK=off) instead of parallel branches.
    if [ "${ROUTE_FORK_AB:-0}" = "1" ]; then
      echo "== gpu bench, max_seq_len $ROUTE_MSL, SIKV_ROUTE_FORK=off"
      SIKV_ROUTE_FORK=off .gpu/gpu_bench --max-seq-len "$ROUTE_MSL" --n "${ROUTE_N:-8192,32768}" --batch "${ROUTE_B:-1,4}" \
        --csv "$OUT/msl_nofork_gpu_bench.csv" > "$OUT/msl_nofork_gpu_bench.log" 2>&1
      RC[msl_bench]=$(( ${RC[msl_bench]} | $? ))
      grep -E "^routed " "$OUT/msl_nofork_gpu_bench.log"
    fi
  fi
  # FIT_N: more context lengths (this build only, FIT_B batches) for the crossover's
  # break-even fit: the sparse step and the dense decode side by side (fit_gpu_bench.csv).
  if [ -n "${FIT_N:-}" ]; then
    echo "== gpu bench, crossover fit (N = $FIT_N)"
    t0=$SECONDS
    .gpu/gpu_bench --n "$FIT_N" --batch "${FIT_B:-1,2,4,8}" --csv "$OUT/fit_gpu_bench.csv" > "$OUT/fit_gpu_bench.log" 2>&1
    RC[fit_bench]=$?
    echo "   ($((SECONDS - t0)) s)"
  fi
  # ROWS: several query rows per sequence (gpu_bench --rows), this build only, at ROWS_N x
  # ROWS_B: the step with R rows per sequence (per-row and mean-query selection) beside the
  # one-row step of the same run (rows_gpu_bench.csv).
  if [ -n "${ROWS:-}" ]; then
    echo "== gpu bench, query rows per sequence: $ROWS"
    t0=$SECONDS
    .gpu/gpu_bench --n "${ROWS_N:-8192,32768,131072}" --batch "${ROWS_B:-1,8}" --rows "$ROWS" \
      --csv "$OUT/rows_gpu_bench.csv" > "$OUT/rows_gpu_bench.log" 2>&1
    RC[rows_bench]=$?
    echo "   ($((SECONDS - t0)) s)"
  fi
  echo "== managed sikv_attend vs stateless sikv_kernel_decode"
  .gpu/managed_bench $Q --csv "$OUT/managed_bench.csv" > "$OUT/managed_bench.log" 2>&1
  RC[managed_bench]=$?
  cat "$OUT/managed_bench.log"
  echo "== sdpa baseline"
  t0=$SECONDS
  python3 scripts/sdpa_baseline.py $Q --csv "$OUT/sdpa_baseline.csv" > "$OUT/sdpa_baseline.log" 2>&1
  RC[sdpa]=$?
  echo "   ($((SECONDS - t0)) s)"
  # The crossover's path against cuDNN and flash per context and batch (speedup.csv, graph
  # timings; speedup_cold.csv, cold, goes into the archive) and its plot (speedup.png, where
  # matplotlib is installed).
  echo "== speedup of the crossover's path against SDPA"
  # (From the repository root, as every path here: a relative OUT names a folder there.)
  S=scripts/bench
  { python3 $S/speedup_csv.py --bench "$OUT/gpu_bench.csv" --sdpa "$OUT/sdpa_baseline.csv" --out "$OUT/speedup.csv" &&
    python3 $S/speedup_csv.py --time cold --bench "$OUT/gpu_bench.csv" --sdpa "$OUT/sdpa_baseline.csv" \
      --out "$OUT/speedup_cold.csv" > /dev/null &&
    python3 $S/plot.py --csv "$OUT/speedup.csv" --out "$OUT/speedup.png" --step auto_us --baselines cudnn_us,flash_us \
      --title "decode (the crossover's path) against PyTorch SDPA, graph timings"; } > "$OUT/speedup.log" 2>&1
  RC[speedup]=$?
  cat "$OUT/speedup.log"
fi

# Nsight Compute's command line, or nothing when it is not installed.
find_ncu() {
  local c
  for c in ncu /usr/local/cuda/bin/ncu; do
    if command -v "$c" >/dev/null 2>&1; then echo "$c"; return; fi
  done
}

if want profile; then
  # Nsight Compute over the kernels of one decode step (the first select and the first sparse
  # attend of gpu_bench) at PROFILE_SIZES (N:B list): duration, launch shape, occupancy and
  # warp stall reasons per kernel, as CSV.
  NCU=$(find_ncu)
  if [ -z "$NCU" ]; then
    echo "== ncu not found: profile skipped"
  else
    echo "== ncu profile of one decode step"
    t0=$SECONDS
    RC[profile]=0
    STALLS=smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio
    for nb in ${PROFILE_SIZES:-131072:1 131072:8 8192:1}; do
      n=${nb%%:*} b=${nb##*:}
      for part in "select:^sikv_(score_d|topk_compact|topk_final|topk_stage1|rerank_score_d|topk_stage2).*:6" "attend:^sikv_(attend_d[0-9]|combine_d[0-9]).*:2" "dense:^sikv_attend_dense_d.*:1"; do
        IFS=: read -r name rx cnt <<<"$part"
        "$NCU" --kernel-name "regex:$rx" --launch-count "$cnt" --section SpeedOfLight --section LaunchStats \
          --section Occupancy --section WarpStateStats --metrics "$STALLS" --csv --page details \
          "${PROFILE_BENCH:-.gpu/gpu_bench}" --quick --iters 5 --n "$n" --batch "$b" > "$OUT/ncu_${name}_${n}_${b}.log" 2>&1 || RC[profile]=$?
      done
    done
    python3 scripts/ncu_summary.py "$OUT"/ncu_*.log | tee "$OUT/ncu_summary.txt"
    echo "   ($((SECONDS - t0)) s)"
  fi
fi

if want profile_sass; then
  # Nsight Compute's full set with per-instruction warp-stall sampling for the kernels matching
  # PROFILE_KERNELS (a regex) at PROFILE_SIZES: the source page as CSV (sass_N_B.csv), the
  # hottest instructions of each kernel (sass_top.txt, scripts/ncu_sass_top.py) and its stall
  # samples per basic block (sass_blocks.txt, scripts/ncu_blocks.py).
  NCU=$(find_ncu)
  if [ -z "$NCU" ]; then
    echo "== ncu not found: profile_sass skipped"
  else
    echo "== ncu per-instruction profile"
    t0=$SECONDS
    RC[profile_sass]=0
    rx="${PROFILE_KERNELS:-^sikv_(score_d|topk_compact|topk_final|rerank_score_d|topk_stage2|attend_d[0-9]|combine_d).*}"
    for nb in ${PROFILE_SIZES:-131072:1}; do
      n=${nb%%:*} b=${nb##*:}
      "$NCU" --set full --import-source no --kernel-name "regex:$rx" --launch-count "${PROFILE_COUNT:-7}" \
        -f -o "$OUT/sass_${n}_${b}" "${PROFILE_BENCH:-.gpu/gpu_bench}" --quick --iters 5 --n "$n" --batch "$b" \
        ${PROFILE_ONLY:+--only "$PROFILE_ONLY"} > "$OUT/sass_${n}_${b}.log" 2>&1 || RC[profile_sass]=$?
      "$NCU" -i "$OUT/sass_${n}_${b}.ncu-rep" --page source --csv --print-source sass \
        > "$OUT/sass_${n}_${b}.csv" 2>>"$OUT/sass_${n}_${b}.log" || RC[profile_sass]=$?
      "$NCU" -i "$OUT/sass_${n}_${b}.ncu-rep" --page details --csv > "$OUT/sass_details_${n}_${b}.csv" 2>&1
      echo "## $n x $b" >> "$OUT/sass_top.txt"
      python3 scripts/ncu_sass_top.py "$OUT/sass_${n}_${b}.csv" >> "$OUT/sass_top.txt" 2>&1
      echo "## $n x $b" >> "$OUT/sass_blocks.txt"
      python3 scripts/ncu_blocks.py "$OUT/sass_${n}_${b}.csv" 12 >> "$OUT/sass_blocks.txt" 2>&1
    done
    echo "   ($((SECONDS - t0)) s; $OUT/sass_top.txt, $OUT/sass_blocks.txt)"
  fi
fi

# timeline (not in the default STEPS): scripts/bench/step_timeline.py through the C ABI of
# .gpu/libselfindexkv.so: each kernel of a decode step on the device's clock (what it adds to the
# critical path of back-to-back calls in a CUDA graph) at TIMELINE_N / TIMELINE_B (comma lists).
if want timeline; then
  echo "== step timeline"
  t0=$SECONDS
  python3 scripts/bench/step_timeline.py --lib .gpu/libselfindexkv.so --n "${TIMELINE_N:-131072}" \
    --batch "${TIMELINE_B:-1,8}" --csv "$OUT/step_timeline.csv" > "$OUT/step_timeline.log" 2>&1
  RC[timeline]=$?
  grep -vE "UserWarning|_warn_once" "$OUT/step_timeline.log" | tail -40
  echo "   ($((SECONDS - t0)) s)"
fi

if want ab; then
  # Builds against each other in alternating rounds (scripts/bench/ab_rounds.py): AB_BUILDS
  # "name=path/to/gpu_bench,..." (the first is the base), AB_ARGS their gpu_bench arguments,
  # AB_ROUNDS (default 2). ab_gpu_bench.csv holds every row with its build and round.
  echo "== A/B rounds"
  t0=$SECONDS
  ab=(); for spec in ${AB_BUILDS//,/ }; do ab+=(--build "$spec"); done
  # shellcheck disable=SC2086 # AB_ARGS is a list of gpu_bench arguments
  python3 scripts/bench/ab_rounds.py "${ab[@]}" --rounds "${AB_ROUNDS:-2}" --csv "$OUT/ab_gpu_bench.csv" \
    -- ${AB_ARGS:---only step} > "$OUT/ab.log" 2>&1
  RC[ab]=$?
  cat "$OUT/ab.log"
  echo "   ($((SECONDS - t0)) s)"
fi

# crossover (not in the default STEPS): the default crossover's bounds (config.rs
# DENSE_AUTO_TOKENS) against this device: both paths at 75-125 % of each band's bound
# (CROSSOVER_FACTORS: other fractions, e.g. wider for a refit), where the bound picks the slower
# one, and each batch's interpolated break-even (what a refit on another GPU starts from).
if want crossover; then
  echo "== crossover check"
  t0=$SECONDS
  factors=(); [ -n "${CROSSOVER_FACTORS:-}" ] && factors=(--factors "$CROSSOVER_FACTORS")
  python3 scripts/bench/crossover_check.py --bench .gpu/gpu_bench --csv "$OUT/crossover_gpu_bench.csv" \
    --batches "${CROSSOVER_B:-1,2,4,8,16,32}" "${factors[@]}" > "$OUT/crossover.log" 2>&1
  RC[crossover]=$?
  tail -45 "$OUT/crossover.log"
  echo "   ($((SECONDS - t0)) s)"
fi

if want model; then
  # The whole-model decode step and append/calibrate against PyTorch (scripts/bench), through
  # the C ABI of .gpu/libselfindexkv.so.
  Q=""
  [ "${BENCH_QUICK:-0}" = "1" ] && Q="--quick"
  echo "== whole-model and append/calibrate benchmarks"
  t0=$SECONDS
  OUT="$OUT" bash scripts/bench/run_all.sh $Q --lib .gpu/libselfindexkv.so > "$OUT/model_bench.log" 2>&1
  RC[model]=$?
  tail -40 "$OUT/model_bench.log"
  echo "   ($((SECONDS - t0)) s)"
fi

echo
echo "== summary"
for k in tests tests_attend_span_3 tests_kept_split_16 tests_kept_split_32 tests_fused_off tests_fused_on tests_topk_multi_64 tests_dense_min_chunk_64 tests_compact_blocks_1 tests_hist_zero_memset tests_final_cluster_1 tests_final_cluster_2 tests_score_wide_off managed abi adversarial sharding dense_groups samples demo memcheck memcheck_managed memcheck_abi racecheck sanitize bench base_bench profile_bench fused_bench dmc_bench nopdl_bench msl_bench fit_bench rows_bench managed_bench sdpa speedup profile profile_sass ab crossover model; do
  [ -n "${RC[$k]+x}" ] && printf "  %-16s rc=%s\n" "$k" "${RC[$k]}"
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
sc = {}  # SDPA cold_us (scripts/sdpa_baseline.py)
for r in sdpa:
    if r.get("median_us"):
        s[(r["backend"], int(r["N"]), int(r["batch"]))] = float(r["median_us"])
    if r.get("cold_us"):
        sc[(r["backend"], int(r["N"]), int(r["batch"]))] = float(r["cold_us"])
keys = sorted({(n, b) for (_, n, b) in t})
hdr = f"  {'N':>7} {'B':>2} {'k':>5} {'score':>7} {'topk':>7} {'rerank':>7} {'attend':>7} {'step':>8} {'dense':>8} {'cudnn':>8} {'flash':>8} {'x dense':>7} {'x cudnn':>7} {'x flash':>7}  score GB/s  attend GB/s {'step cold':>9} {'cudnn cold':>10}"
print("  times in us (median); x = speedup of the sparse step; cold = graph copies after an L2 flush (cold_us)")
print(hdr)
for n, b in keys:
    g = lambda k: float(t[(k, n, b)]["median_us"]) if (k, n, b) in t else float("nan")
    bw = lambda k: float(t[(k, n, b)]["GBps"]) if (k, n, b) in t else float("nan")
    step, dense = g("step"), g("dense_ours")
    cu = s.get(("cudnn", n, b), float("nan"))
    fl = s.get(("flash", n, b), float("nan"))
    k = t[("step", n, b)]["k"] if ("step", n, b) in t else "?"
    cold = float(t[("step", n, b)].get("cold_us") or "nan") if ("step", n, b) in t else float("nan")
    cuc = sc.get(("cudnn", n, b), float("nan"))
    print(f"  {n:>7} {b:>2} {k:>5} {g('score'):>7.1f} {g('topk'):>7.1f} {g('rerank'):>7.1f} {g('attend'):>7.1f} {step:>8.1f} {dense:>8.1f} {cu:>8.1f} {fl:>8.1f} {dense/step:>7.2f} {cu/step:>7.2f} {fl/step:>7.2f}  {bw('score'):>10.0f}  {bw('attend'):>11.0f} {cold:>9.1f} {cuc:>10.1f}")
# ROUTE_MSL: the stateless decode's choice on the device under a longer max_seq_len.
msl = load("msl_gpu_bench.csv")
if msl:
    m = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in msl}
    print("  routed decode under a longer max_seq_len, graph us: sparse step, dense, routed (the call)")
    for n, b in sorted({(n, b) for (_, n, b) in m}):
        gm = lambda k: m.get((k, n, b), float("nan"))
        print(f"  {n:>7} {b:>2} {gm('step'):>8.1f} {gm('dense_ours'):>8.1f} {gm('routed'):>8.1f}")
# BASELINE: the first baseline build against this one, graph us per stage (base -> this build).
base = load("base_gpu_bench.csv")
if base:
    g0 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in base}
    g1 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in ours}
    stages = ["score", "topk", "rerank", "attend", "step", "dense_ours"]
    print("  graph us, baseline build 1 -> this build")
    print(f"  {'N':>7} {'B':>2} " + " ".join(f"{k:>15}" for k in stages))
    for n, b in keys:
        cells = []
        for k in stages:
            a, c = g0.get((k, n, b)), g1.get((k, n, b))
            cells.append(f"{a:>6.1f} -> {c:>5.1f}" if a is not None and c is not None else f"{'-':>15}")
        print(f"  {n:>7} {b:>2} " + " ".join(cells))
# PROFILES: each further storage profile, baseline build 1 -> this build (graph us).
for name in sorted(f for f in os.listdir(out) if f.startswith("p") and f.endswith("_gpu_bench.csv") and "_base" not in f):
    tag = name[: -len("_gpu_bench.csv")]
    g1 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in load(name)}
    g0 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in load(tag + "_base_gpu_bench.csv")}
    stages = ["score", "topk", "rerank", "attend", "step", "dense_ours"]
    print(f"  profile {tag[1:].replace('_', '+')}, graph us, baseline build 1 -> this build")
    print(f"  {'N':>7} {'B':>2} " + " ".join(f"{k:>15}" for k in stages))
    for n, b in sorted({(n, b) for (_, n, b) in g1}):
        cells = []
        for k in stages:
            a, c = g0.get((k, n, b)), g1.get((k, n, b))
            cells.append(f"{a:>6.1f} -> {c:>5.1f}" if a is not None and c is not None else (f"{c:>15.1f}" if c is not None else f"{'-':>15}"))
        print(f"  {n:>7} {b:>2} " + " ".join(cells))
# FUSED_AB: the select and the step, graph us: chain of launches / fused select / this build.
f0 = load("fused_off_gpu_bench.csv")
f1 = load("fused_on_gpu_bench.csv")
if f0 and f1:
    m0 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in f0}
    m1 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in f1}
    m2 = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in ours}
    print("  graph us: chain (SIKV_FUSED=off) / fused (=on) / this build's default")
    print(f"  {'N':>7} {'B':>2} {'select':>26} {'step':>26}")
    for n, b in sorted({(n, b) for (_, n, b) in m0}):
        cell = lambda k: f"{m0.get((k, n, b), float('nan')):>7.1f} {m1.get((k, n, b), float('nan')):>7.1f} {m2.get((k, n, b), float('nan')):>7.1f}"
        print(f"  {n:>7} {b:>2}    {cell('select')}    {cell('step')}")
# DENSE_MIN_AB: the dense decode (and the routed decode under a long max_seq_len), graph us, by
# the fewest positions per candidate chunk.
dmc = sorted(f[len("dmc_"):-len("_gpu_bench.csv")] for f in os.listdir(out)
             if f.startswith("dmc_") and f.endswith("_gpu_bench.csv") and "_msl_" not in f)
if dmc:
    for suffix, kernels in (("", ("dense_ours",)), ("_msl", ("dense_ours", "routed"))):
        tabs = {m: {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"])
                    for r in load(f"dmc_{m}{suffix}_gpu_bench.csv")} for m in dmc}
        for k in kernels:
            print(f"  {k}{' (long max_seq_len)' if suffix else ''}, graph us, SIKV_DENSE_MIN_CHUNK = " + " / ".join(dmc))
            for n, b in sorted({(n, b) for t in tabs.values() for (kk, n, b) in t if kk == k}):
                print(f"  {n:>7} {b:>2} " + " ".join(f"{tabs[m].get((k, n, b), float('nan')):>8.1f}" for m in dmc))
# ROWS: R query rows per sequence in one step against R one-row steps (graph us).
rows = load("rows_gpu_bench.csv")
if rows:
    m = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in rows}
    rs = sorted({int(k[len("step_rows"):]) for (k, _, _) in m if k.startswith("step_rows")})
    print("  query rows per sequence, graph us: R one-row steps, one step of R rows (per row, mean query)")
    for n, b in sorted({(n, b) for (_, n, b) in m}):
        one = m.get(("step", n, b), float("nan"))
        cells = [f"R={r}: {r * one:>7.1f} {m.get((f'step_rows{r}', n, b), float('nan')):>7.1f} {m.get((f'step_mean{r}', n, b), float('nan')):>7.1f}" for r in rs]
        print(f"  {n:>7} {b:>2} one {one:>6.1f}  " + "  ".join(cells))
# FIT_N: the crossover's break-even points (graph us).
fit = load("fit_gpu_bench.csv")
if fit:
    m = {(r["kernel"], int(r["N"]), int(r["batch"])): float(r["graph_us"]) for r in fit}
    print("  crossover fit, graph us: sparse step, dense, faster path")
    for n, b in sorted({(n, b) for (_, n, b) in m}):
        st, de = m.get(("step", n, b), float("nan")), m.get(("dense_ours", n, b), float("nan"))
        print(f"  {n:>7} {b:>2} {st:>8.1f} {de:>8.1f} {'dense' if de < st else 'sparse':>7}")
EOF
# Everything in one archive plus the two CSVs, so that all of it comes back from the GPU machine.
# (The CSVs of a second and later BASELINE go into the archive too: $OUT returns few files.)
(cd "$OUT" && shopt -s nullglob && tar czf logs.tgz --exclude=logs.tgz ./*.log base[2-9]_gpu_bench.csv speedup_cold*.csv 2>/dev/null \
  && rm -f ./*.log base[2-9]_gpu_bench.csv speedup_cold*.csv)
fail=0
for k in "${!RC[@]}"; do [ "${RC[$k]}" != "0" ] && fail=1; done
exit $fail
