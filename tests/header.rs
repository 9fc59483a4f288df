//! The committed header must be exactly what cbindgen generates from the current sources.

#[test]
fn committed_header_matches_generated() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/selfindexkv.h"))
        .expect("include/selfindexkv.h is missing");
    let generated = selfindexkv::ffi::GENERATED_HEADER;
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/selfindexkv.h differs from the generated header (first difference at line {}); \
             regenerate it with `SIKV_UPDATE_HEADER=1 cargo build` and commit it",
            first + 1
        );
    }
}

#[test]
fn header_declares_every_status_and_version_query() {
    let h = selfindexkv::ffi::GENERATED_HEADER;
    for name in [
        "SIKV_OK = 0",
        "SIKV_ERR_INVALID_ARGUMENT = 1",
        "SIKV_ERR_NO_DEVICE = 11",
        "SIKV_ERR_OUT_OF_MEMORY = 16",
        "sikv_version(void)",
        "sikv_abi_version(void)",
        "sikv_last_error_message(void)",
        "#define SIKV_ABI_VERSION",
    ] {
        assert!(h.contains(name), "generated header lacks `{name}`");
    }
    // Rust-internal constants must not leak into the C namespace.
    for name in ["QUANT_GROUP", "ATTEND_SPLIT", "MAX_PAGE_SIZE"] {
        assert!(
            !h.contains(&format!("#define {name} ")),
            "`{name}` leaked into the header"
        );
    }
}
