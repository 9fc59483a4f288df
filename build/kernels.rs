//! Kernel build: compiles `kernels/*.cu` with nvcc into one fatbin embedded in the library, or
//! embeds the sources for NVRTC when no nvcc is found. Writes `OUT_DIR/kernels_embed.rs`.

use std::fs;
use std::path::Path;

pub fn build(root: &Path, out: &Path) {
    let _ = root;
    // Placeholder until the kernels exist: no fatbin, no sources.
    fs::write(
        out.join("kernels_embed.rs"),
        "pub const FATBIN: Option<&[u8]> = None;\npub const SOURCES: &[(&str, &str)] = &[];\npub const BUILD_PATH: &str = \"none\";\n",
    )
    .unwrap();
}
