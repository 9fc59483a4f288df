//! Host-to-device uploads that never wait for the stream: a ring of page-locked host memory.
//!
//! A copy from pageable memory may make the driver wait for the stream (it stages the bytes
//! first), so the managed cache writes each call's metadata into this ring and enqueues one
//! copy from it. An event recorded after each copy tells when its bytes may be reused; the
//! host waits only when it has run a whole ring ahead of the device (back-pressure, not a
//! synchronisation per call).

use std::sync::Arc;

use cudarc::driver::sys;

use super::{driver, CUstream, GpuContext, Inner};
use crate::status::{Error, Result};

/// Bytes of the ring are handed out in multiples of this (keeps every part 16-byte aligned
/// and the copies' sources aligned for the copy engines).
const GRAIN: usize = 256;
/// Copies in flight before the host waits for the oldest.
const MAX_IN_FLIGHT: usize = 256;

struct InFlight {
    start: usize,
    end: usize,
    event: sys::CUevent,
}

/// A ring of page-locked host memory for uploads; one per managed cache.
pub struct UploadRing {
    host: *mut u8,
    cap: usize,
    head: usize,
    in_flight: Vec<InFlight>,
    free_events: Vec<sys::CUevent>,
    inner: Arc<Inner>,
}

// SAFETY: the ring's memory and events are owned by it; it is used behind the cache's lock.
unsafe impl Send for UploadRing {}

impl UploadRing {
    /// Allocates `capacity` bytes of page-locked memory and the events (create time only).
    pub fn new(ctx: &GpuContext, capacity: usize) -> Result<UploadRing> {
        ctx.current()?;
        let cap = capacity.div_ceil(GRAIN) * GRAIN;
        let host = driver::host_alloc_pinned(cap)?;
        let mut ring = UploadRing {
            host,
            cap,
            head: 0,
            in_flight: Vec::with_capacity(MAX_IN_FLIGHT),
            free_events: Vec::with_capacity(MAX_IN_FLIGHT),
            inner: ctx.inner.clone(),
        };
        for _ in 0..MAX_IN_FLIGHT {
            ring.free_events.push(driver::event_create_sync_only()?);
        }
        Ok(ring)
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Writes `n` bytes with `fill` into the ring and copies them to device address `dst` on
    /// `stream`, unless `fill` returns false (nothing is sent then, and the bytes are not
    /// kept). Returns whether a copy was enqueued.
    pub fn upload(
        &mut self,
        dst: u64,
        n: usize,
        stream: CUstream,
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> Result<bool> {
        if n == 0 {
            return Ok(false);
        }
        driver::set_current(self.inner.dev.ctx)?;
        let len = n.div_ceil(GRAIN) * GRAIN;
        if len > self.cap {
            return Err(Error::invalid(format!(
                "an upload of {n} bytes exceeds the {}-byte upload ring",
                self.cap
            )));
        }
        let start = if self.head + len <= self.cap { self.head } else { 0 };
        self.wait_for(start, start + len)?;
        // SAFETY: [start, start + len) lies inside the ring, and no copy in flight reads it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.host.add(start), n) };
        if !fill(bytes) {
            return Ok(false);
        }
        let event = match self.free_events.pop() {
            Some(e) => e,
            None => {
                self.wait_any()?;
                self.free_events.pop().expect("waiting frees an event")
            }
        };
        // SAFETY: the source is page-locked ring memory that stays untouched until the event
        // recorded after the copy has completed; `dst` is the caller's device region.
        let sent = unsafe { driver::copy_htod_pinned_async(dst, self.host.add(start), n, stream as sys::CUstream) }
            .and_then(|_| driver::event_record(event, stream as sys::CUstream));
        if let Err(e) = sent {
            self.free_events.push(event);
            return Err(e);
        }
        self.in_flight.push(InFlight {
            start,
            end: start + len,
            event,
        });
        self.head = start + len;
        Ok(true)
    }

    /// Retires finished copies, then waits for those still reading `[start, end)`.
    fn wait_for(&mut self, start: usize, end: usize) -> Result<()> {
        let mut i = 0;
        while i < self.in_flight.len() {
            let f = &self.in_flight[i];
            let overlaps = f.start < end && start < f.end;
            if overlaps {
                driver::event_wait(f.event)?;
            }
            if overlaps || driver::event_done(f.event)? {
                let f = self.in_flight.swap_remove(i);
                self.free_events.push(f.event);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn wait_any(&mut self) -> Result<()> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let f = self.in_flight.swap_remove(0);
        let r = driver::event_wait(f.event);
        self.free_events.push(f.event);
        r
    }
}

impl Drop for UploadRing {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            for f in self.in_flight.drain(..) {
                let _ = driver::event_wait(f.event);
                driver::event_destroy(f.event);
            }
            for e in self.free_events.drain(..) {
                driver::event_destroy(e);
            }
            driver::host_free_pinned(self.host);
        }
    }
}
