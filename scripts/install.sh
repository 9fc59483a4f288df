#!/usr/bin/env bash
# Installs libselfindexkv for C and C++ consumers:
#
#   scripts/install.sh --prefix DIR            # cargo build --release, then lay out DIR
#   scripts/install.sh --prefix DIR --from LIBDIR --no-build
#                                              # lay out libraries already built in LIBDIR
#
# DIR/lib/libselfindexkv.a            static library (links with -lpthread -ldl -lm only)
# DIR/lib/libselfindexkv.so           shared library
# DIR/include/selfindexkv.h           the generated C header
# DIR/include/selfindexkv.hpp         the header-only C++17 wrapper
# DIR/lib/cmake/selfindexkv/         find_package(selfindexkv CONFIG): selfindexkv::selfindexkv
#                                     (static) and selfindexkv::selfindexkv_shared
# DIR/lib/pkgconfig/selfindexkv.pc    static (use pkg-config --static); selfindexkv-shared.pc
#
# The CMake package locates itself relative to its own file, so the tree can be moved; the
# pkg-config files hold DIR as written (an absolute path is made of a relative one).
#
# Why a script and not cargo-c: cargo-c builds from source with the whole of cargo (about 420
# crates, well over the CI budget on two cores), needs a `capi` feature and package metadata in
# Cargo.toml and its own header step beside build.rs's cbindgen, and writes no CMake package.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
prefix="" from="" build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --from) from="${2:?--from needs a directory}"; shift 2 ;;
    --from=*) from="${1#--from=}"; shift ;;
    --no-build) build=0; shift ;;
    -h|--help) usage ;;
    *) echo "install.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[ -n "$prefix" ] || usage
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

if [ "$build" = 1 ]; then
  (cd "$root" && cargo build --release --lib)
fi
if [ -z "$from" ]; then
  target="${CARGO_TARGET_DIR:-$root/target}"
  from="$target/release"
fi
for f in libselfindexkv.a libselfindexkv.so; do
  [ -f "$from/$f" ] || { echo "install.sh: $from/$f is missing (build with cargo build --release)" >&2; exit 1; }
done

# The crate version is the package version: the first `version = "..."` in [package].
version="$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$root/Cargo.toml" | head -n 1)"
[ -n "$version" ] || { echo "install.sh: no version in Cargo.toml" >&2; exit 1; }

install -d "$prefix/lib" "$prefix/include" "$prefix/lib/cmake/selfindexkv" "$prefix/lib/pkgconfig"
install -m 644 "$from/libselfindexkv.a" "$prefix/lib/"
install -m 755 "$from/libselfindexkv.so" "$prefix/lib/"
install -m 644 "$root/include/selfindexkv.h" "$root/include/selfindexkv.hpp" "$prefix/include/"

templates="$root/scripts/packaging"
fill() { # template -> destination, with @PREFIX@ and @VERSION@ substituted
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" "$templates/$1" > "$2"
  chmod 644 "$2"
}
fill selfindexkvConfig.cmake.in "$prefix/lib/cmake/selfindexkv/selfindexkvConfig.cmake"
fill selfindexkvConfigVersion.cmake.in "$prefix/lib/cmake/selfindexkv/selfindexkvConfigVersion.cmake"
fill selfindexkv.pc.in "$prefix/lib/pkgconfig/selfindexkv.pc"
fill selfindexkv-shared.pc.in "$prefix/lib/pkgconfig/selfindexkv-shared.pc"

echo "installed selfindexkv $version into $prefix"
