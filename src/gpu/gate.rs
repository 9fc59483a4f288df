//! A test aid: holds a stream at a point until the host opens it, so that a test can tell
//! whether a call waits for the stream (it would then not return while the gate is shut).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cudarc::driver::sys;

use super::{driver, CUstream, GpuContext, Inner};
use crate::status::{Error, Result};

/// A stream held by a device-side wait on a page-locked host word.
pub struct StreamGate {
    word: *mut u8,
    stream: CUstream,
    inner: Arc<Inner>,
}

// SAFETY: the word is page-locked memory owned by the gate; opening it from any thread is an
// atomic store.
unsafe impl Send for StreamGate {}
unsafe impl Sync for StreamGate {}

impl StreamGate {
    fn flag(&self) -> &AtomicU32 {
        // SAFETY: `word` is a live, 4-byte aligned page-locked allocation owned by the gate.
        unsafe { &*(self.word as *const AtomicU32) }
    }

    /// Lets the stream go on (idempotent).
    pub fn open(&self) {
        self.flag().store(1, Ordering::SeqCst);
    }
}

impl Drop for StreamGate {
    fn drop(&mut self) {
        self.open();
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            let _ = driver::stream_sync(self.stream as sys::CUstream);
            driver::host_free_pinned(self.word);
        }
    }
}

impl GpuContext {
    /// Enqueues on `stream` a wait that lasts until the returned gate is opened (or dropped).
    pub fn shut_stream(&self, stream: CUstream) -> Result<StreamGate> {
        self.current()?;
        let word = driver::host_alloc_pinned(4)?;
        let gate = StreamGate {
            word,
            stream,
            inner: self.inner.clone(),
        };
        gate.flag().store(0, Ordering::SeqCst);
        let dev = driver::host_device_ptr(word)?;
        driver::stream_wait_geq(stream as sys::CUstream, dev, 1).map_err(|e| {
            Error::new(
                e.status,
                format!("{} (the device cannot hold a stream on host memory)", e.message),
            )
        })?;
        Ok(gate)
    }

    /// Whether everything queued on `stream` has finished (never blocks).
    pub fn stream_done(&self, stream: CUstream) -> Result<bool> {
        self.current()?;
        driver::stream_done(stream as sys::CUstream)
    }
}
