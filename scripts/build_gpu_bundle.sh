#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything scripts/gpu_check.sh runs on the GPU machine,
# and copies it into .gpu/ with stable names:
#   .gpu/gpu_tests          the test executable of tests/gpu/ (every GPU stage, one test per
#                           case; release); one binary, so that the bundle carries one copy of
#                           the embedded fatbin for all of them
#   .gpu/gpu_managed_tests  the tests/gpu_managed.rs test executable (release)
#   .gpu/gpu_abi_tests      the tests/gpu_abi.rs test executable (release)
#   .gpu/adversarial_tests  the tests/adversarial.rs test executable (release)
#   .gpu/sharding_tests     the tests/sharding.rs test executable (release)
#   .gpu/gpu_bench          the examples/gpu_bench.rs binary (release)
#   .gpu/sikv_demo          the demo binary (release)
#   .gpu/BUILD_INFO         git revision, kernel build path, nvcc
# Then: run `bash scripts/gpu_check.sh` from the repo root on the GPU machine.
#
# The kernels are compiled with nvcc into the embedded fatbin (all targets by default; set
# SIKV_CUDA_ARCHS=90 for an H200-only bundle that builds in a fraction of the time).
# SIKV_REQUIRE_NVCC=1 makes a missing nvcc fail the build instead of falling back to NVRTC.
set -euo pipefail
cd "$(dirname "$0")/.."
export SIKV_REQUIRE_NVCC="${SIKV_REQUIRE_NVCC:-1}"
# Each binary embeds the kernels' fatbin (about 9 MB at sm_90 alone, uncompressed); nvcc's size
# compression makes it about 0.7 MB, so that the whole bundle fits one transfer to the GPU
# machine. SIKV_FATBIN_COMPRESS=none builds it as the library's default build does.
export SIKV_FATBIN_COMPRESS="${SIKV_FATBIN_COMPRESS:-size}"
mkdir -p .gpu
rm -f .gpu/managed_bench .gpu/gpu_tests .gpu/gpu_managed_tests .gpu/gpu_abi_tests .gpu/adversarial_tests .gpu/sharding_tests .gpu/gpu_bench .gpu/sikv_demo .gpu/libselfindexkv.so .gpu/BUILD_INFO

json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo test --release --no-run --message-format=json --test gpu --test gpu_managed --test gpu_abi --test adversarial --test sharding > "$json"
cargo build --release --bin sikv_demo --message-format=json >> "$json"
cargo build --release --example gpu_bench --example managed_bench --message-format=json >> "$json"
# The shared library, for the Python benchmarks (ctypes) in scripts/bench.
cargo build --release --lib
cp "${CARGO_TARGET_DIR:-target}"/release/libselfindexkv.so .gpu/libselfindexkv.so

python3 - "$json" <<'EOF'
import json, shutil, sys
want = {("test", "gpu"): ".gpu/gpu_tests", ("test", "gpu_managed"): ".gpu/gpu_managed_tests", ("test", "gpu_abi"): ".gpu/gpu_abi_tests", ("test", "adversarial"): ".gpu/adversarial_tests", ("test", "sharding"): ".gpu/sharding_tests", ("example", "gpu_bench"): ".gpu/gpu_bench", ("example", "managed_bench"): ".gpu/managed_bench", ("bin", "sikv_demo"): ".gpu/sikv_demo"}
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    for kind in t.get("kind", []):
        key = (kind, t["name"])
        if key in want:
            found[key] = m["executable"]
for key, dst in want.items():
    if key not in found:
        sys.exit(f"build_gpu_bundle: no executable for {key}")
    shutil.copy2(found[key], dst)
    print(f"{dst} <- {found[key]}")
EOF

# Debug info off (the bundle travels to the GPU machine with a 64 MiB limit; the embedded
# fatbin of all targets is ~19 MB per binary).
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug .gpu/managed_bench .gpu/gpu_tests .gpu/gpu_managed_tests .gpu/gpu_abi_tests .gpu/adversarial_tests .gpu/sharding_tests .gpu/gpu_bench .gpu/sikv_demo .gpu/libselfindexkv.so
fi

# The C++ samples' --device cuda builds (engine_sample, the TensorRT plugin harness), when the
# CUDA runtime headers and libcudart are here (CUDA_RUNTIME_ROOT, else the pip wheel
# nvidia-cuda-runtime of python3): linked against libcudart.so.13, which the GPU machine's
# toolkit provides at run time.
rm -f .gpu/engine_sample_cuda .gpu/trt_plugin_harness_cuda
cuda_rt="${CUDA_RUNTIME_ROOT:-$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))' 2>/dev/null || true)}"
if [ -n "$cuda_rt" ] && [ -f "$cuda_rt/include/cuda_runtime_api.h" ] && ls "$cuda_rt"/lib/libcudart.so.* >/dev/null 2>&1; then
  cargo build --release --lib
  rt=$(basename "$(ls "$cuda_rt"/lib/libcudart.so.* | head -1)")
  flags=(-std=c++17 -O2 -Wall -Wextra -Werror -DSIKV_WITH_CUDA_RUNTIME -Iinclude -isystem "$cuda_rt/include")
  libs=("${CARGO_TARGET_DIR:-target}"/release/libselfindexkv.a -L"$cuda_rt/lib" -l:"$rt" -lpthread -ldl -lm)
  c++ "${flags[@]}" cpp_examples/engine_sample/main.cpp "${libs[@]}" -o .gpu/engine_sample_cuda
  c++ "${flags[@]}" -Icpp_examples/trt_plugin_sample cpp_examples/trt_plugin_sample/harness.cpp \
    cpp_examples/trt_plugin_sample/sikv_attention_plugin.cpp "${libs[@]}" -o .gpu/trt_plugin_harness_cuda
  strip --strip-debug .gpu/engine_sample_cuda .gpu/trt_plugin_harness_cuda 2>/dev/null || true
else
  echo "build_gpu_bundle: no CUDA runtime headers/libcudart found: the samples' --device cuda builds are left out" >&2
fi

{
  echo "revision: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  grep -h 'BUILD_PATH' "${CARGO_TARGET_DIR:-target}"/release/build/selfindexkv-*/out/kernels_embed.rs 2>/dev/null | sort -u | tail -1
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > .gpu/BUILD_INFO
cat .gpu/BUILD_INFO
ls -la .gpu
total=$(du -cb .gpu/managed_bench .gpu/gpu_tests .gpu/gpu_managed_tests .gpu/gpu_abi_tests .gpu/adversarial_tests .gpu/sharding_tests .gpu/gpu_bench .gpu/sikv_demo .gpu/libselfindexkv.so | tail -1 | cut -f1)
echo "bundle: $total bytes"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "warning: bundle is over 60 MiB; rebuild with SIKV_CUDA_ARCHS=90 (sm_90 only) and SIKV_FATBIN_COMPRESS=size" >&2
fi
