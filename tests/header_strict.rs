//! The headers under both compiler families and every language standard we promise:
//! `selfindexkv.h` as C99 and C11, `selfindexkv.hpp` as C++17 and C++20, each with gcc and
//! clang at `-Wall -Wextra -Werror -pedantic`. The C and C++ programs of `tests/c/` are
//! compiled, linked against the static library with `-lpthread -ldl -lm` and run; every build
//! of one program must write the same records for the same seed (`tests/c_link.rs` checks
//! those records against the Rust API; here the point is that the header means the same thing
//! to every compiler and standard).
//!
//! Without clang the clang builds print `skipped: clang not found (<test>)`; with
//! `SIKV_REQUIRE_HOST_TOOLS=1` (CI sets it) a missing compiler fails instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// (C compiler, C++ compiler) of each family.
const FAMILIES: [(&str, &str); 2] = [("gcc", "g++"), ("clang", "clang++")];

fn scratch_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("header_strict");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds `source` with every available compiler of `pick` at each of `stds`, runs each build
/// in both modes with one seed, and requires identical records from all of them.
fn check(test: &str, source: &str, stds: &[&str], pick: fn((&'static str, &'static str)) -> &'static str) {
    let seed = common::seed(test);
    let mut built = 0;
    for family in FAMILIES {
        let compiler = pick(family);
        if !common::host_tool(compiler, test) {
            continue;
        }
        for std in stds {
            let name = format!("{test}-{compiler}-{std}");
            let exe = scratch_dir().join(&name);
            run(Command::new(compiler)
                .arg(format!("-std={std}"))
                .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-O1"])
                .arg(format!("-I{ROOT}/include"))
                .arg(format!("{ROOT}/{source}"))
                .arg(common::static_lib())
                .args(["-lpthread", "-ldl", "-lm", "-o"])
                .arg(&exe));
            built += 1;
            for mode in ["sparse", "full"] {
                let file = scratch_dir().join(format!("{name}-{mode}.bin"));
                let out = run(Command::new(&exe).arg(format!("{seed:#x}")).arg(mode).arg(&file));
                print!("{compiler} -std={std}: {out}");
                let reference = scratch_dir().join(format!("{test}-reference-{mode}.bin"));
                if built == 1 {
                    std::fs::copy(&file, &reference).unwrap();
                } else {
                    assert!(
                        std::fs::read(&file).unwrap() == std::fs::read(&reference).unwrap(),
                        "{source} built by {compiler} -std={std} wrote different {mode} records from the first build"
                    );
                }
            }
        }
    }
    assert!(built > 0, "no compiler built {source}");
}

#[test]
fn c_header_gcc_clang_c99_c11() {
    check(
        "c_header_gcc_clang_c99_c11",
        "tests/c/abi_c99.c",
        &["c99", "c11"],
        |f| f.0,
    );
}

#[test]
fn cpp_header_gcc_clang_cpp17_cpp20() {
    check(
        "cpp_header_gcc_clang_cpp17_cpp20",
        "tests/c/abi_cpp17.cpp",
        &["c++17", "c++20"],
        |f| f.1,
    );
}
