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
///
/// # Safety
/// A non-NULL `p` points to `n` initialised elements that nothing writes while the slice
/// lives; the caller bounds the lifetime `'a` by the exported call.
pub(crate) unsafe fn host_slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    check_ptr(p, name)?;
    Ok(std::slice::from_raw_parts(p, n))
}

/// Mutable counterpart of [`host_slice`].
///
/// # Safety
/// A non-NULL `p` points to `n` elements that nothing else reads or writes while the slice
/// lives; the caller bounds the lifetime `'a` by the exported call.
pub(crate) unsafe fn host_slice_mut<'a, T>(p: *mut T, n: usize, name: &str) -> Result<&'a mut [T]> {
    if n == 0 {
        return Ok(&mut []);
    }
    check_ptr(p, name)?;
    Ok(std::slice::from_raw_parts_mut(p, n))
}

/// NULL and alignment of a caller pointer.
fn check_ptr<T>(p: *const T, name: &str) -> Result<()> {
    if p.is_null() {
        return Err(Error::null(name));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_MISALIGNED,
            format!("`{name}` is not aligned to {} bytes", std::mem::align_of::<T>()),
        ));
    }
    Ok(())
}

/// Reads a caller struct by reference.
///
/// # Safety
/// As [`host_slice`] with `n = 1`.
pub(crate) unsafe fn host_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    Ok(&host_slice(p, 1, name)?[0])
}

/// Writes an out-parameter (called only once the call has succeeded).
///
/// # Safety
/// A non-NULL `p` points to a writable `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T, name: &str) -> Result<()> {
    check_ptr(p, name)?;
    p.write(value);
    Ok(())
}

/// Checks an out-parameter pointer before any work is done.
pub(crate) fn check_out<T>(p: *mut T, name: &str) -> Result<()> {
    check_ptr(p as *const T, name)
}

/// Host memory the engine owns and lends to a handle for the handle's whole life (borrowed
/// pools of a CPU cache). Held as a raw pointer: the borrow outlives every exported call, so
/// no Rust lifetime describes it; slices are formed per call and bounded by `&self`.
pub struct ForeignBytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the engine's promise (the pools are used through this handle only, and calls on
// one handle are serialised by the handle's lock) makes the bytes behave as owned.
unsafe impl Send for ForeignBytes {}

impl ForeignBytes {
    /// # Safety
    /// `ptr` points to `len` bytes that stay valid, and that nothing but this handle touches,
    /// until the handle is destroyed.
    pub(crate) unsafe fn new(ptr: *mut u8, len: usize, name: &str) -> Result<ForeignBytes> {
        let ptr = std::ptr::NonNull::new(ptr).ok_or_else(|| Error::null(name))?;
        Ok(ForeignBytes { ptr, len })
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the constructor's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the constructor's contract; `&mut self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}
