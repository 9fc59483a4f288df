//! Status codes (fixed numbers, part of the ABI) and the crate's error type.

use std::fmt;

/// Result of every exported call. The numbers are part of the ABI and never change.
#[repr(C)]
#[allow(non_camel_case_types)] // the variants are the C header's SIKV_* names
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SikvStatus {
    /// Success.
    SIKV_OK = 0,
    /// An argument has a value the call cannot accept (see the last-error message).
    SIKV_ERR_INVALID_ARGUMENT = 1,
    /// A required pointer argument was NULL.
    SIKV_ERR_NULL_POINTER = 2,
    /// A size or count exceeds the bounds declared in the configuration.
    SIKV_ERR_OUT_OF_BOUNDS = 3,
    /// An enum value is unknown, or a combination of settings is not supported.
    SIKV_ERR_UNSUPPORTED = 4,
    /// The page pool has no free page left for the request.
    SIKV_ERR_OUT_OF_PAGES = 5,
    /// A sequence id is not in the cache.
    SIKV_ERR_UNKNOWN_SEQUENCE = 6,
    /// A sequence id is already in the cache.
    SIKV_ERR_SEQUENCE_EXISTS = 7,
    /// The sequence has not been calibrated for this layer yet.
    SIKV_ERR_NOT_CALIBRATED = 8,
    /// The sequence was already calibrated for this layer.
    SIKV_ERR_ALREADY_CALIBRATED = 9,
    /// A caller buffer (workspace, pool) is smaller than required.
    SIKV_ERR_BUFFER_TOO_SMALL = 10,
    /// No CUDA driver or device is available.
    SIKV_ERR_NO_DEVICE = 11,
    /// A CUDA driver call failed.
    SIKV_ERR_CUDA = 12,
    /// A previous call on this handle panicked; the handle must be destroyed.
    SIKV_ERR_POISONED = 13,
    /// An internal error (a caught panic). The handle is poisoned.
    SIKV_ERR_INTERNAL = 14,
    /// A pointer is not aligned as the call requires.
    SIKV_ERR_MISALIGNED = 15,
    /// A host or device allocation failed at create time.
    SIKV_ERR_OUT_OF_MEMORY = 16,
}

/// The crate's error: a status and a message naming the offending argument; for
/// `SIKV_ERR_CUDA`, the driver's `CUresult` too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: SikvStatus,
    pub message: String,
    /// The `CUresult` of the failed driver call (0 when the error did not come from CUDA).
    pub cuda_code: i32,
    /// The failure left the CUDA context unusable (an illegal address, a failed launch, ...):
    /// every later call on the same handle would fail too, so the handle is poisoned.
    pub sticky: bool,
}

impl Error {
    pub fn new(status: SikvStatus, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
            cuda_code: 0,
            sticky: false,
        }
    }
    /// A failed CUDA driver call: keeps the driver's code and whether it broke the context.
    pub fn cuda(code: i32, sticky: bool, message: impl Into<String>) -> Self {
        Error {
            status: SikvStatus::SIKV_ERR_CUDA,
            message: message.into(),
            cuda_code: code,
            sticky,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(SikvStatus::SIKV_ERR_INVALID_ARGUMENT, message)
    }
    pub fn bounds(message: impl Into<String>) -> Self {
        Self::new(SikvStatus::SIKV_ERR_OUT_OF_BOUNDS, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(SikvStatus::SIKV_ERR_UNSUPPORTED, message)
    }
    pub fn null(name: &str) -> Self {
        Self::new(SikvStatus::SIKV_ERR_NULL_POINTER, format!("`{name}` is NULL"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status, self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Returns `Err(invalid(..))` unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $status:ident, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::status::Error::new(
                $crate::status::SikvStatus::$status,
                format!($($fmt)+),
            ));
        }
    };
}
