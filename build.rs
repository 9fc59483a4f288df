//! Build script: (1) writes the kernels' header (layout constants, launch geometry, fault bits
//! and the `SikvParams` struct, all from Rust sources; build/abi.rs), (2) compiles `kernels/*.cu`
//! into one embedded fatbin when nvcc is found (else embeds the sources for NVRTC), (3)
//! generates the C header with cbindgen.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

#[path = "build/abi.rs"]
mod abi;
#[path = "build/kernels.rs"]
mod kernels;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=SIKV_UPDATE_HEADER");

    abi::generate(&root, &out);
    kernels::build(&root, &out);
    generate_c_header(&root, &out);
}

/// Generates the C header into OUT_DIR (the crate embeds it so a test can diff it against the
/// committed copy); with SIKV_UPDATE_HEADER=1 it also rewrites include/selfindexkv.h.
fn generate_c_header(root: &Path, out: &Path) {
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let mut builder = cbindgen::Builder::new().with_crate(root).with_config(config);
    // Only SIKV_-prefixed constants belong to the C API; the rest are Rust-internal.
    for entry in walk(&root.join("src")) {
        let src = fs::read_to_string(&entry).unwrap();
        for line in src.lines() {
            if let Some(rest) = line.trim().strip_prefix("pub const ") {
                if let Some((name, _)) = rest.split_once(':') {
                    let name = name.trim();
                    if !name.starts_with("SIKV_") {
                        builder = builder.exclude_item(name);
                    }
                }
            }
        }
    }
    let header = out.join("selfindexkv.h");
    match builder.generate() {
        Ok(b) => {
            b.write_to_file(&header);
        }
        Err(e) => panic!("cbindgen failed: {e}"),
    }
    if env::var("SIKV_UPDATE_HEADER").map(|v| v == "1").unwrap_or(false) {
        fs::copy(&header, root.join("include/selfindexkv.h")).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else if p.extension().map(|x| x == "rs").unwrap_or(false) {
            files.push(p);
        }
    }
    files.sort();
    files
}
