//! The installed tree (`scripts/install.sh`) works for consumers: a C++ program built through
//! the CMake package (`find_package(selfindexkv CONFIG)`, the static and the shared imported
//! target) and a C program built with `pkg-config --cflags --libs --static selfindexkv`, each
//! run and checked.
//!
//! The script lays out the libraries this test was linked with (`--from … --no-build`), so no
//! second cargo build runs inside the test. Without cmake or pkg-config a test prints one line
//! `skipped: <tool> not found (<test>)`; with `SIKV_REQUIRE_HOST_TOOLS=1` (CI sets it) a
//! missing tool fails instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A fresh prefix with the install script's layout, from the libraries of this build.
fn install(test: &str) -> PathBuf {
    let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("install").join(test);
    let _ = std::fs::remove_dir_all(&prefix);
    let libdir = common::static_lib().parent().unwrap().to_path_buf();
    run(Command::new("bash")
        .arg(format!("{ROOT}/scripts/install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--from")
        .arg(&libdir)
        .arg("--no-build"));
    for f in [
        "lib/libselfindexkv.a",
        "lib/libselfindexkv.so",
        "include/selfindexkv.h",
        "include/selfindexkv.hpp",
        "lib/cmake/selfindexkv/selfindexkvConfig.cmake",
        "lib/cmake/selfindexkv/selfindexkvConfigVersion.cmake",
        "lib/pkgconfig/selfindexkv.pc",
        "lib/pkgconfig/selfindexkv-shared.pc",
    ] {
        assert!(prefix.join(f).is_file(), "the install lacks {f}");
    }
    let version = std::fs::read_to_string(prefix.join("lib/cmake/selfindexkv/selfindexkvConfigVersion.cmake")).unwrap();
    assert!(
        version.contains(&format!("set(PACKAGE_VERSION \"{}\")", env!("CARGO_PKG_VERSION"))),
        "selfindexkvConfigVersion.cmake does not carry the crate version {}",
        env!("CARGO_PKG_VERSION")
    );
    prefix
}

fn check_output(out: &str, want: &str) {
    print!("{out}");
    assert!(out.starts_with(want), "expected `{want}…`, got:\n{out}");
    assert!(
        out.contains(&format!("{} (kernels:", env!("CARGO_PKG_VERSION"))),
        "the consumer did not report version {}:\n{out}",
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn cmake_consumer_builds_and_runs() {
    let test = "cmake_consumer_builds_and_runs";
    if !common::host_tool("cmake", test) {
        return;
    }
    let prefix = install(test);
    let build = prefix.with_extension("cmake-build");
    let _ = std::fs::remove_dir_all(&build);
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(format!("{ROOT}/tests/install/cmake_consumer"))
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()));
    if let Ok(cxx) = std::env::var("CXX") {
        configure.arg(format!("-DCMAKE_CXX_COMPILER={cxx}"));
    }
    run(&mut configure);
    run(Command::new("cmake").arg("--build").arg(&build));
    // The static target needs nothing at run time; the shared one finds the library through
    // the rpath CMake gives build-tree executables.
    check_output(&run(&mut Command::new(build.join("app"))), "ok c++ cmake: ");
    check_output(&run(&mut Command::new(build.join("app_shared"))), "ok c++ cmake: ");
}

#[test]
fn pkgconfig_consumer_builds_and_runs() {
    let test = "pkgconfig_consumer_builds_and_runs";
    if !common::host_tool("pkg-config", test) {
        return;
    }
    let prefix = install(test);
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "--static", "selfindexkv"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")));
    for want in ["-lpthread", "-ldl", "-lm", "libselfindexkv.a"] {
        assert!(
            flags.contains(want),
            "pkg-config --static gave `{}`, lacking {want}",
            flags.trim()
        );
    }
    let exe = prefix.with_extension("c_app");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    run(Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(format!("{ROOT}/tests/install/pkgconfig_consumer.c"))
        .args(flags.split_whitespace())
        .arg("-o")
        .arg(&exe));
    // Moved away from the prefix, the program still runs: the static library is inside it.
    std::fs::rename(
        prefix.join("lib/libselfindexkv.so"),
        prefix.join("lib/libselfindexkv.so.away"),
    )
    .unwrap();
    check_output(&run(&mut Command::new(&exe)), "ok c pkg-config: ");
}
