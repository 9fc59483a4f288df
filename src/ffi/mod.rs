//! The C ABI: the only place with `extern "C"`, panic boundaries and raw-pointer validation.
//!
//! Every export returns a [`SikvStatus`] (or is infallible), runs inside [`boundary`] so no
//! panic crosses into C, writes its out-parameters only on success, and leaves a message
//! naming the bad argument in a thread-local buffer (`sikv_last_error_message`).

// The exports are C entry points: their pointer contract is the C header's, checked for NULL
// and alignment at the boundary, and marking them `unsafe fn` would change nothing for a C
// caller. Raw-pointer reads happen only through the `unsafe` helpers of `boundary`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod boundary;
pub mod managed;
pub mod stateless;
pub mod types;
pub mod version;

pub use boundary::{boundary, last_error_message};
pub use managed::*;
pub use stateless::*;
pub use types::*;
pub use version::*;
