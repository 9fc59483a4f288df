#!/usr/bin/env bash
# Memory checkers on the C/C++ side of the ABI (issue #13, part 2): builds the C99 and C++17
# ABI test programs (tests/c/) and the C++ samples (cpp_examples/) the way tests/c_link.rs
# does, against the release static library, and runs each
#   1. under valgrind memcheck (errors and definite/indirect/possible leaks fail the run), and
#   2. built with AddressSanitizer + UBSan (the C/C++ side is instrumented; the Rust library is
#      not, but its heap traffic goes through the sanitizer's malloc, so overruns of buffers the
#      program allocates, double frees and leaks after destroy are still caught).
# Usage: scripts/memcheck_c.sh [valgrind|asan|all]   (default all). Needs the release static
# library: `cargo build --release` leaves it in target/release/, `cargo test --release` in
# target/release/deps/ (the newer of the two is used).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
candidates=()
for f in target/release/libselfindexkv.a target/release/deps/libselfindexkv.a; do
  [[ -f $f ]] && candidates+=("$f")
done
lib=""
[[ ${#candidates[@]} -gt 0 ]] && lib=$(ls -t "${candidates[@]}" | head -1)
[[ -n $lib ]] || { echo "no libselfindexkv.a under target/release: build first" >&2; exit 2; }
echo "memcheck: $lib"
out=target/tmp/memcheck
mkdir -p "$out"
CC="${CC:-cc}"
CXX="${CXX:-c++}"
seed="${SIKV_TEST_SEED:-0x5eed}"
links=(-lpthread -ldl -lm)
plugin=cpp_examples/trt_plugin_sample

# name, compiler and flags per program, as in tests/c_link.rs
build() { # variant extra-flags...
  local v=$1; shift
  "$CC" -std=c99 -pedantic -Wall -Wextra -Werror -O1 -g "$@" -Iinclude tests/c/abi_c99.c "$lib" "${links[@]}" -o "$out/abi_c99.$v"
  "$CXX" -std=c++17 -Wall -Wextra -Werror -O1 -g "$@" -Iinclude tests/c/abi_cpp17.cpp "$lib" "${links[@]}" -o "$out/abi_cpp17.$v"
  "$CXX" -std=c++17 -Wall -Wextra -Werror -O2 -g "$@" -Iinclude cpp_examples/engine_sample/main.cpp "$lib" "${links[@]}" -o "$out/engine_sample.$v"
  "$CXX" -std=c++17 -Wall -Wextra -Werror -O2 -g "$@" -Iinclude -I"$plugin" "$plugin/harness.cpp" "$plugin/sikv_attention_plugin.cpp" "$lib" "${links[@]}" -o "$out/trt_plugin_sample.$v"
}

# program and arguments of each run (both modes of the ABI programs)
runs() { # variant
  local v=$1
  echo "abi_c99.$v $seed sparse $out/c99-sparse.$v.bin"
  echo "abi_c99.$v $seed full $out/c99-full.$v.bin"
  echo "abi_cpp17.$v $seed sparse $out/cpp17-sparse.$v.bin"
  echo "abi_cpp17.$v $seed full $out/cpp17-full.$v.bin"
  echo "engine_sample.$v --steps 8"
  echo "trt_plugin_sample.$v"
}

fail=0
if [[ $what == valgrind || $what == all ]]; then
  build vg
  while read -r exe args; do
    t0=$SECONDS
    if valgrind --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect,possible \
        --log-file="$out/$exe.valgrind.log" "$out/$exe" $args > "$out/$exe.stdout" 2>&1; then
      r=ok
    else
      r="FAIL (rc $?)"; fail=1
    fi
    summary=$(grep -E "ERROR SUMMARY|definitely lost|in use at exit" "$out/$exe.valgrind.log" | sed 's/^==[0-9]*== //' | tr '\n' ';')
    printf 'valgrind %-26s %-6s %4ds  %s\n' "$exe $(echo $args | cut -d' ' -f2)" "$r" "$((SECONDS - t0))" "$summary"
    [[ $r == ok ]] || { cat "$out/$exe.stdout"; tail -40 "$out/$exe.valgrind.log"; }
  done < <(runs vg)
fi
if [[ $what == asan || $what == all ]]; then
  build asan -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
  while read -r exe args; do
    if ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$out/$exe" $args > "$out/$exe.stdout" 2>&1; then
      r=ok
    else
      r="FAIL (rc $?)"; fail=1
    fi
    errs=$(grep -cE "ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:" "$out/$exe.stdout" || true)
    printf 'asan+ubsan %-26s %-6s sanitizer reports: %s\n' "$exe $(echo $args | cut -d' ' -f2)" "$r" "$errs"
    [[ $r == ok && $errs == 0 ]] || { fail=1; tail -40 "$out/$exe.stdout"; }
  done < <(runs asan)
fi
exit $fail
