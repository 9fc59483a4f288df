//! The panic boundary, the thread-local last error, and raw-pointer helpers.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::status::{Error, Result, SikvStatus};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    static LAST_CUDA_CODE: Cell<i32> = const { Cell::new(0) };
}

fn set_last_error(msg: &str) {
    set_last_error_with_code(msg, 0);
}

fn set_last_error_with_code(msg: &str, cuda_code: i32) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
    LAST_CUDA_CODE.with(|e| e.set(cuda_code));
}

/// The `CUresult` of the last failed call on this thread (0 if it was not a CUDA failure).
pub(crate) fn last_cuda_code() -> i32 {
    LAST_CUDA_CODE.with(|e| e.get())
}

/// The message of the last failed call on this thread ("" if none).
pub fn last_error_message() -> String {
    LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
}

/// Pointer to the thread's last error message; valid until the next failed call on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs `f` behind the panic boundary. A handle whose `poison` flag is set refuses the call; a
/// panic sets it and returns `SIKV_ERR_INTERNAL`, and so does a CUDA error that leaves the
/// context unusable (the call still returns `SIKV_ERR_CUDA` with the driver's code).
pub fn boundary<F: FnOnce() -> Result<()>>(poison: Option<&AtomicBool>, f: F) -> SikvStatus {
    if let Some(p) = poison {
        if p.load(Ordering::Acquire) {
            set_last_error("the handle is poisoned by an earlier internal or unrecoverable CUDA error; destroy it");
            return SikvStatus::SIKV_ERR_POISONED;
        }
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SikvStatus::SIKV_OK,
        Ok(Err(e)) => {
            if e.sticky {
                if let Some(p) = poison {
                    p.store(true, Ordering::Release);
                }
            }
            set_last_error_with_code(&e.message, e.cuda_code);
            e.status
        }
        Err(payload) => {
            if let Some(p) = poison {
                p.store(true, Ordering::Release);
            }
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error: {what}"));
            SikvStatus::SIKV_ERR_INTERNAL
        }
    }
}

/// Borrows `n` elements at a caller pointer (host memory). NULL is an error unless `n == 0`.
pub fn host_slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::null(name));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_MISALIGNED,
            format!("`{name}` is not aligned to {} bytes", std::mem::align_of::<T>()),
        ));
    }
    // SAFETY: the caller promises `p` points to `n` readable elements for the call (ABI contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Mutable counterpart of [`host_slice`].
pub fn host_slice_mut<'a, T>(p: *mut T, n: usize, name: &str) -> Result<&'a mut [T]> {
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Error::null(name));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_MISALIGNED,
            format!("`{name}` is not aligned to {} bytes", std::mem::align_of::<T>()),
        ));
    }
    // SAFETY: the caller promises `p` points to `n` writable elements for the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// Reads a caller struct by reference.
pub fn host_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    Ok(&host_slice(p, 1, name)?[0])
}

/// Writes an out-parameter (called only once the call has succeeded).
pub fn write_out<T>(p: *mut T, value: T, name: &str) -> Result<()> {
    let s = host_slice_mut(p, 1, name)?;
    s[0] = value;
    Ok(())
}

/// Checks an out-parameter pointer before any work is done.
pub fn check_out<T>(p: *mut T, name: &str) -> Result<()> {
    host_slice_mut(p, 1, name).map(|_| ())
}
