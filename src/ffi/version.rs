//! Version and build queries, and the last-error accessor.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

use super::boundary::{last_cuda_code, last_error_ptr};

pub const SIKV_VERSION_MAJOR: u32 = 0;
pub const SIKV_VERSION_MINOR: u32 = 1;
pub const SIKV_VERSION_PATCH: u32 = 0;
/// Bumped whenever a struct, signature or constant of the C ABI changes incompatibly.
pub const SIKV_ABI_VERSION: u32 = 1;

/// The library version and how its kernels were built, e.g.
/// "0.1.0 (kernels: fatbin:nvcc 13.5:sm_80,...)" or "0.1.0 (kernels: nvrtc)". Static storage;
/// never NULL. The version number is everything before the first space.
#[no_mangle]
pub extern "C" fn sikv_version() -> *const c_char {
    static VERSION: OnceLock<CString> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            CString::new(format!(
                "{} (kernels: {})",
                env!("CARGO_PKG_VERSION"),
                crate::gpu::embed::BUILD_PATH
            ))
            .unwrap_or_default()
        })
        .as_ptr()
}

/// The ABI version this library implements (compare with SIKV_ABI_VERSION from the header).
#[no_mangle]
pub extern "C" fn sikv_abi_version() -> u32 {
    SIKV_ABI_VERSION
}

/// How the kernels were built: "fatbin:<targets>" (nvcc at build time), "nvrtc" (sources
/// compiled at first use) or "none". Static storage; never NULL.
#[no_mangle]
pub extern "C" fn sikv_build_info() -> *const c_char {
    static INFO: OnceLock<CString> = OnceLock::new();
    INFO.get_or_init(|| {
        CString::new(format!(
            "selfindexkv {} kernels={}",
            env!("CARGO_PKG_VERSION"),
            crate::gpu::embed::BUILD_PATH
        ))
        .unwrap_or_default()
    })
    .as_ptr()
}

/// The message of the last failed call on the calling thread ("" if none). The pointer stays
/// valid until the next failed call on this thread; never NULL.
#[no_mangle]
pub extern "C" fn sikv_last_error_message() -> *const c_char {
    last_error_ptr()
}

/// The CUDA driver's `CUresult` behind the last failed call on the calling thread, when that
/// call returned `SIKV_ERR_CUDA`; 0 otherwise. Its name and description are in the message.
#[no_mangle]
pub extern "C" fn sikv_last_error_cuda_code() -> i32 {
    last_cuda_code()
}

/// The C header cbindgen generated in this build; a test diffs it against the committed copy.
pub const GENERATED_HEADER: &str = include_str!(concat!(env!("OUT_DIR"), "/selfindexkv.h"));
