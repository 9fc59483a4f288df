//! CUDA dispatch: cudarc driver API in the device's primary context, module loading (embedded
//! fatbin, else NVRTC), and one launcher per stage.

/// What build.rs embedded: the fatbin (when nvcc was found) and/or the kernel sources.
pub mod embed {
    include!(concat!(env!("OUT_DIR"), "/kernels_embed.rs"));
}
