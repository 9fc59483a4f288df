//! Device memory and the plumbing around the launchers: allocations (create time), copies and
//! memsets on a stream (the managed cache's uploads and forks, tests), synchronisation, and the
//! streams, graphs, event timers and parameter-layout probe of the tests and benchmarks. Kept
//! apart from the stage launchers because the hot-path contract binds those and not these:
//! here the caller decides when an allocation or a synchronisation is allowed.

use super::desc::DevWorkspace;
use super::{cuda_stream, driver, CUstream, GpuContext, Inner};
use crate::status::Result;
use cudarc::driver::sys;
use std::sync::Arc;

/// A device allocation made at create time (`cuMemAlloc`), freed on drop.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    inner: Arc<Inner>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The whole buffer as a launcher's workspace.
    pub fn as_workspace(&self) -> DevWorkspace {
        DevWorkspace {
            ptr: self.ptr,
            bytes: self.bytes,
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            driver::mem_free(self.ptr);
        }
    }
}

/// A stream created by the library (tests and benches only; engines pass their own).
pub struct OwnedStream {
    pub raw: CUstream,
    inner: Arc<Inner>,
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            driver::stream_destroy(self.raw as sys::CUstream);
        }
    }
}

/// An instantiated CUDA graph (tests and benches).
pub struct Graph {
    exec: sys::CUgraphExec,
    shape: Option<(usize, usize)>,
    inner: Arc<Inner>,
}

impl Graph {
    pub fn launch(&self, stream: CUstream) -> Result<()> {
        driver::set_current(self.inner.dev.ctx)?;
        driver::graph_launch(self.exec, stream as sys::CUstream)
    }

    /// The captured graph's (nodes, edges), where the driver gave them: tests read from it
    /// whether a capture holds parallel branches (more edges than a chain's nodes - 1).
    pub fn shape(&self) -> Option<(usize, usize)> {
        self.shape
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            driver::graph_destroy(self.exec);
        }
    }
}

impl GpuContext {
    /// `cuMemAlloc` (create time only); freed when the buffer drops.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.current()?;
        let ptr = driver::mem_alloc(bytes)?;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            inner: self.inner.clone(),
        })
    }

    pub fn memset_async(&self, dst: u64, value: u8, bytes: usize, stream: CUstream) -> Result<()> {
        self.current()?;
        driver::memset_async(dst, value, bytes, cuda_stream(stream))
    }

    pub fn copy_htod_async(&self, dst: u64, src: &[u8], stream: CUstream) -> Result<()> {
        self.current()?;
        driver::copy_htod_async(dst, src, cuda_stream(stream))
    }

    /// Device-to-device copy on `stream` (sequence forks: state records, pages).
    pub fn copy_dtod_async(&self, dst: u64, src: u64, bytes: usize, stream: CUstream) -> Result<()> {
        self.current()?;
        driver::copy_dtod_async(dst, src, bytes, cuda_stream(stream))
    }

    /// Synchronous device-to-host copy (tests and non-hot paths only).
    pub fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.current()?;
        driver::copy_dtoh(dst, src)
    }

    pub fn synchronize(&self, stream: CUstream) -> Result<()> {
        self.current()?;
        driver::stream_sync(cuda_stream(stream))
    }

    /// A non-blocking stream owned by the returned value (tests and benches).
    pub fn create_stream(&self) -> Result<OwnedStream> {
        self.current()?;
        Ok(OwnedStream {
            raw: driver::stream_create()? as CUstream,
            inner: self.inner.clone(),
        })
    }

    /// Records everything `body` enqueues on `stream` (a non-default stream) into a graph.
    pub fn capture<F: FnOnce() -> Result<()>>(&self, stream: CUstream, body: F) -> Result<Graph> {
        self.current()?;
        driver::begin_capture(cuda_stream(stream))?;
        let r = body();
        let g = driver::end_capture(cuda_stream(stream));
        r?;
        let (exec, shape) = g?;
        Ok(Graph {
            exec,
            shape,
            inner: self.inner.clone(),
        })
    }

    /// Milliseconds taken on `stream` by what `body` enqueues (CUDA events; synchronises).
    pub fn time_ms<F: FnOnce() -> Result<()>>(&self, stream: CUstream, body: F) -> Result<f32> {
        self.current()?;
        let a = driver::event_create()?;
        let b = driver::event_create()?;
        let r = (|| {
            driver::event_record(a, cuda_stream(stream))?;
            body()?;
            driver::event_record(b, cuda_stream(stream))?;
            driver::event_elapsed_ms(a, b)
        })();
        driver::event_destroy(a);
        driver::event_destroy(b);
        r
    }

    /// The C layout of SikvParams as the device sees it (see params::layout_probe).
    pub fn params_layout(&self) -> Result<[i32; 7]> {
        self.current()?;
        let buf = self.alloc(64)?;
        let ptr = buf.ptr();
        let f = self.inner.kernels.params_layout;
        driver::launch(f.f, f.name, (1, 1, 1), 1, std::ptr::null_mut(), &ptr, false)?;
        driver::stream_sync(std::ptr::null_mut())?;
        let mut out = [0u8; 28];
        driver::copy_dtoh(&mut out, ptr)?;
        let mut v = [0i32; 7];
        for (i, x) in v.iter_mut().enumerate() {
            *x = i32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
        }
        Ok(v)
    }
}
