//! The bottom layer: raw CUDA driver calls through cudarc's `sys` bindings (libcuda is opened at
//! run time), each checked and mapped to `SIKV_ERR_CUDA` with the call's name. Nothing above
//! this file touches `sys` directly.

use std::ffi::{c_void, CStr, CString};

use cudarc::driver::sys;

use crate::status::{Error, Result, SikvStatus};

pub use sys::{CUcontext, CUdevice, CUfunction, CUmodule, CUresult};

thread_local! {
    /// inject_launch_error's pending result and how many launches it still applies to.
    static INJECTED: std::cell::Cell<Option<(sys::CUresult, u32)>> = const { std::cell::Cell::new(None) };
}

/// Test hook: the next `count` kernel launches on this thread fail with driver result `code`
/// before anything reaches the driver, as if `cuLaunchKernelEx` had returned it. Lets the
/// reliability tests put a CUDA error (sticky or not) inside any call without breaking the
/// shared context. Costs one thread-local read per launch.
#[doc(hidden)]
pub fn inject_launch_error(code: sys::CUresult, count: u32) {
    INJECTED.with(|c| c.set(if count == 0 { None } else { Some((code, count)) }));
}

fn take_injected() -> Option<sys::CUresult> {
    INJECTED.with(|c| {
        let (code, n) = c.get()?;
        c.set(if n > 1 { Some((code, n - 1)) } else { None });
        Some(code)
    })
}

/// Maps a driver result to our error type, naming the call and keeping the driver's code.
pub fn ck(r: sys::CUresult, call: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::cuda(
        r as i32,
        is_sticky(r),
        format!(
            "{call} failed: {} (CUresult {}): {}",
            error_name(r),
            r as i32,
            error_string(r)
        ),
    ))
}

/// Errors after which the context is unusable until the process ends: the driver reports
/// them again on every later call, so the handle that saw one is poisoned.
fn is_sticky(r: sys::CUresult) -> bool {
    use sys::CUresult::*;
    matches!(
        r,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

fn error_string(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a static string pointer.
    unsafe {
        if sys::cuGetErrorString(r, &mut p) == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
            return CStr::from_ptr(p).to_string_lossy().into_owned();
        }
    }
    "no description".into()
}

pub fn error_name(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a static string pointer.
    unsafe {
        if sys::cuGetErrorName(r, &mut p) == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
            return CStr::from_ptr(p).to_string_lossy().into_owned();
        }
    }
    format!("{r:?}")
}

fn no_device(msg: impl Into<String>) -> Error {
    Error::new(SikvStatus::SIKV_ERR_NO_DEVICE, msg)
}

/// Loads libcuda and initialises the driver; NO_DEVICE when the library is missing, a symbol
/// is missing (cudarc panics then: caught here), or the driver reports no device.
pub fn init() -> Result<()> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(no_device("the CUDA driver library (libcuda.so) was not found"));
    }
    let r = std::panic::catch_unwind(|| unsafe { sys::cuInit(0) });
    match r {
        Err(_) => Err(no_device(
            "the CUDA driver library could not be loaded (missing symbols)",
        )),
        Ok(sys::CUresult::CUDA_SUCCESS) => Ok(()),
        Ok(e) => Err(no_device(format!("cuInit failed: {}", error_name(e)))),
    }
}

pub struct Device {
    pub dev: CUdevice,
    pub ctx: CUcontext,
    pub major: i32,
    pub minor: i32,
    pub name: String,
    /// Streaming multiprocessors.
    pub sms: i32,
}

/// Retains the primary context of device `ordinal` (the one the CUDA runtime uses).
pub fn retain_primary(ordinal: i32) -> Result<Device> {
    let mut count = 0i32;
    // SAFETY: out-parameter calls on an initialised driver.
    unsafe {
        ck(sys::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
        if count <= 0 {
            return Err(no_device("the CUDA driver reports no device"));
        }
        if ordinal < 0 || ordinal >= count {
            return Err(no_device(format!(
                "device_ordinal = {ordinal} but only {count} CUDA device(s) exist"
            )));
        }
        let mut dev: CUdevice = 0;
        ck(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
        let mut major = 0;
        let mut minor = 0;
        ck(
            sys::cuDeviceGetAttribute(
                &mut major,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                dev,
            ),
            "cuDeviceGetAttribute",
        )?;
        ck(
            sys::cuDeviceGetAttribute(
                &mut minor,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                dev,
            ),
            "cuDeviceGetAttribute",
        )?;
        let mut sms = 0;
        ck(
            sys::cuDeviceGetAttribute(
                &mut sms,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                dev,
            ),
            "cuDeviceGetAttribute",
        )?;
        let mut name = [0 as std::ffi::c_char; 256];
        let _ = sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev);
        let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let mut ctx: CUcontext = std::ptr::null_mut();
        ck(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
        Ok(Device {
            dev,
            ctx,
            major,
            minor,
            name,
            sms,
        })
    }
}

pub fn release_primary(dev: CUdevice) {
    // SAFETY: balanced with the retain in retain_primary.
    unsafe {
        let _ = sys::cuDevicePrimaryCtxRelease_v2(dev);
    }
}

pub fn set_current(ctx: CUcontext) -> Result<()> {
    // SAFETY: ctx is a retained primary context.
    unsafe { ck(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent") }
}

/// Loads a module image (fatbin, cubin or NUL-terminated PTX). The image is copied into an
/// 8-byte aligned buffer first (include_bytes! gives no alignment guarantee).
pub fn load_module(image: &[u8]) -> Result<CUmodule> {
    let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
    // SAFETY: the destination has at least image.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr() as *mut u8, image.len()) };
    let mut m: CUmodule = std::ptr::null_mut();
    // SAFETY: image is a valid module image kept alive for the call.
    unsafe {
        ck(
            sys::cuModuleLoadData(&mut m, aligned.as_ptr() as *const c_void),
            "cuModuleLoadData",
        )?
    };
    Ok(m)
}

pub fn unload_module(m: CUmodule) {
    // SAFETY: m came from load_module and no function of it is used afterwards.
    unsafe {
        let _ = sys::cuModuleUnload(m);
    }
}

/// Looks a kernel up by name and forces it to be loaded now (with lazy loading a first launch
/// would load it, which must not happen on the hot path or inside a graph capture).
pub fn get_function(m: CUmodule, name: &str) -> Result<CUfunction> {
    let cname = CString::new(name).unwrap();
    let mut f: CUfunction = std::ptr::null_mut();
    // SAFETY: valid module and C string.
    unsafe {
        ck(
            sys::cuModuleGetFunction(&mut f, m, cname.as_ptr()),
            &format!("cuModuleGetFunction({name})"),
        )?;
        let mut regs = 0i32;
        ck(
            sys::cuFuncGetAttribute(&mut regs, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS, f),
            &format!("cuFuncGetAttribute({name})"),
        )?;
    }
    Ok(f)
}

/// Launches `f` with one by-value argument (the parameter block).
pub fn launch<P>(
    f: CUfunction,
    name: &str,
    grid: (u32, u32, u32),
    block: u32,
    stream: sys::CUstream,
    params: &P,
    pdl: bool,
) -> Result<()> {
    launch_cluster(f, name, grid, block, 1, stream, params, pdl)
}

/// The launch attributes of a launch: programmatic dependent launch (the kernel may be launched
/// before the kernel ahead of it in the stream has finished; it waits for it on the device,
/// griddepcontrol.wait in every kernel entry, kernels/common.cuh) and, for `cluster` > 1, thread
/// block clusters of `cluster` CTAs along x. Returns the attributes and how many are used.
fn launch_attrs(pdl: bool, cluster: u32) -> ([sys::CUlaunchAttribute; 2], u32) {
    let blank = || sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { pad: [0; 64] },
    };
    let mut attrs = [blank(), blank()];
    let mut n = 0;
    if pdl {
        attrs[n].value.programmaticStreamSerializationAllowed = 1;
        n += 1;
    }
    if cluster > 1 {
        attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attrs[n].value.clusterDim.x = cluster;
        attrs[n].value.clusterDim.y = 1;
        attrs[n].value.clusterDim.z = 1;
        n += 1;
    }
    (attrs, n as u32)
}

/// [`launch`] in clusters of `cluster` CTAs along x (grid.0 a multiple of it; 1: no clusters).
#[allow(clippy::too_many_arguments)] // launch's arguments plus the cluster size
pub fn launch_cluster<P>(
    f: CUfunction,
    name: &str,
    grid: (u32, u32, u32),
    block: u32,
    cluster: u32,
    stream: sys::CUstream,
    params: &P,
    pdl: bool,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let mut args: [*mut c_void; 1] = [params as *const P as *mut c_void];
    let (mut attrs, n_attrs) = launch_attrs(pdl, cluster);
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: n_attrs,
    };
    if let Some(r) = take_injected() {
        return ck(r, &format!("cuLaunchKernelEx({name})"));
    }
    // SAFETY: f is a loaded kernel whose only parameter has type P (SikvParams or a pointer);
    // the driver copies the argument and reads the configuration before returning.
    unsafe {
        ck(
            sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()),
            &format!("cuLaunchKernelEx({name})"),
        )
    }
}

/// How many clusters of `cluster` CTAs of `block` threads of `f` the device can hold at once
/// (0 when it cannot run such a cluster). Sizes above the portable 8 are allowed first (a
/// kernel attribute). Create time only: a driver query, not for the hot path.
pub fn max_active_clusters(f: CUfunction, block: u32, cluster: u32) -> u32 {
    // SAFETY: attribute and occupancy queries on a loaded function; the configuration and its
    // attributes outlive the calls.
    unsafe {
        if cluster > 8 {
            let a = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED;
            if sys::cuFuncSetAttribute(f, a, 1) != sys::CUresult::CUDA_SUCCESS {
                return 0;
            }
        }
        // The cluster attribute even for clusters of one CTA (the query needs it).
        let (mut attrs, n_attrs) = launch_attrs(false, cluster.max(2));
        attrs[0].value.clusterDim.x = cluster;
        let config = sys::CUlaunchConfig {
            gridDimX: cluster,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: std::ptr::null_mut(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n_attrs,
        };
        let mut n = 0i32;
        if sys::cuOccupancyMaxActiveClusters(&mut n, f, &config) != sys::CUresult::CUDA_SUCCESS {
            return 0;
        }
        n.max(0) as u32
    }
}

pub fn mem_alloc(bytes: usize) -> Result<u64> {
    let mut p: sys::CUdeviceptr = 0;
    // SAFETY: out-parameter call in the current context.
    let r = unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(1)) };
    if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_OUT_OF_MEMORY,
            format!("cuMemAlloc of {bytes} bytes: out of device memory"),
        ));
    }
    ck(r, "cuMemAlloc")?;
    Ok(p)
}

pub fn mem_free(p: u64) {
    // SAFETY: p came from mem_alloc.
    unsafe {
        let _ = sys::cuMemFree_v2(p);
    }
}

pub fn memset_async(dst: u64, value: u8, bytes: usize, stream: sys::CUstream) -> Result<()> {
    // SAFETY: dst is a device allocation of at least `bytes` (the caller's contract).
    unsafe { ck(sys::cuMemsetD8Async(dst, value, bytes, stream), "cuMemsetD8Async") }
}

pub fn memset32_async(dst: u64, value: u32, words: usize, stream: sys::CUstream) -> Result<()> {
    // SAFETY: dst is a 4-byte aligned device allocation of at least 4 * words bytes.
    unsafe { ck(sys::cuMemsetD32Async(dst, value, words, stream), "cuMemsetD32Async") }
}

pub fn copy_dtod_async(dst: u64, src: u64, bytes: usize, stream: sys::CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: both are device allocations of at least `bytes` (the caller's contract).
    unsafe { ck(sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream), "cuMemcpyDtoDAsync") }
}

pub fn copy_htod_async(dst: u64, src: &[u8], stream: sys::CUstream) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: the caller keeps `src` alive until the stream reaches the copy (pageable memory
    // is staged by the driver before the call returns).
    unsafe {
        ck(
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), stream),
            "cuMemcpyHtoDAsync",
        )
    }
}

pub fn copy_dtoh(dst: &mut [u8], src: u64) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: synchronous copy into a live host slice.
    unsafe {
        ck(
            sys::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len()),
            "cuMemcpyDtoH",
        )
    }
}

pub fn stream_sync(stream: sys::CUstream) -> Result<()> {
    // SAFETY: stream is a live stream (or null = legacy default).
    unsafe { ck(sys::cuStreamSynchronize(stream), "cuStreamSynchronize") }
}

pub fn stream_create() -> Result<sys::CUstream> {
    let mut s: sys::CUstream = std::ptr::null_mut();
    // SAFETY: out-parameter call.
    unsafe {
        ck(
            sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32),
            "cuStreamCreate",
        )?
    };
    Ok(s)
}

pub fn stream_destroy(s: sys::CUstream) {
    // SAFETY: s came from stream_create.
    unsafe {
        let _ = sys::cuStreamDestroy_v2(s);
    }
}

pub fn begin_capture(s: sys::CUstream) -> Result<()> {
    // SAFETY: s is a live non-default stream.
    unsafe {
        ck(
            sys::cuStreamBeginCapture_v2(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
            "cuStreamBeginCapture",
        )
    }
}

/// Ends the capture begun on `s` and instantiates it. Also returns the captured graph's node
/// and edge counts (None where the driver would not give them): a chain of n launches has n - 1
/// edges, and each fork into parallel branches that join again adds one.
pub fn end_capture(s: sys::CUstream) -> Result<(sys::CUgraphExec, Option<(usize, usize)>)> {
    let mut g: sys::CUgraph = std::ptr::null_mut();
    // SAFETY: ends the capture begun on s; the counting calls only write the two counts (null
    // arrays); the graph is destroyed once instantiated.
    unsafe {
        ck(sys::cuStreamEndCapture(s, &mut g), "cuStreamEndCapture")?;
        let (mut nodes, mut edges) = (0usize, 0usize);
        let counted = sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut nodes) == sys::CUresult::CUDA_SUCCESS
            && sys::cuGraphGetEdges(g, std::ptr::null_mut(), std::ptr::null_mut(), &mut edges)
                == sys::CUresult::CUDA_SUCCESS;
        let mut e: sys::CUgraphExec = std::ptr::null_mut();
        let r = sys::cuGraphInstantiateWithFlags(&mut e, g, 0);
        let _ = sys::cuGraphDestroy(g);
        ck(r, "cuGraphInstantiateWithFlags")?;
        Ok((e, counted.then_some((nodes, edges))))
    }
}

/// Whether `s` is being captured into a CUDA graph.
pub fn is_capturing(s: sys::CUstream) -> Result<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: status is a live local.
    unsafe { ck(sys::cuStreamIsCapturing(s, &mut status), "cuStreamIsCapturing")? };
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// The most graph nodes a capturing stream's dependency set may hold for [`capture_deps`] to
/// copy it (a decode's launches leave one; an engine's own fork can leave a few).
pub const CAPTURE_DEPS: usize = 8;

/// A copy of the nodes that a capturing stream's next captured work will depend on.
#[derive(Clone, Copy)]
pub struct CaptureDeps {
    nodes: [sys::CUgraphNode; CAPTURE_DEPS],
    n: usize,
}

/// The dependency set of `s` while it is being captured into a CUDA graph: None when `s` is not
/// capturing, or when the set is larger than [`CAPTURE_DEPS`] (the caller then launches as
/// outside a capture). No allocation.
pub fn capture_deps(s: sys::CUstream) -> Result<Option<CaptureDeps>> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut id: sys::cuuint64_t = 0;
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut deps: *const sys::CUgraphNode = std::ptr::null();
    let mut n: usize = 0;
    // SAFETY: every out-pointer is a live local; `deps` points into the stream's own array,
    // valid until the next call on `s`, and is copied out before that.
    unsafe {
        ck(
            sys::cuStreamGetCaptureInfo_v2(s, &mut status, &mut id, &mut graph, &mut deps, &mut n),
            "cuStreamGetCaptureInfo",
        )?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE || n > CAPTURE_DEPS {
            return Ok(None);
        }
        let mut out = CaptureDeps {
            nodes: [std::ptr::null_mut(); CAPTURE_DEPS],
            n,
        };
        if n > 0 {
            out.nodes[..n].copy_from_slice(std::slice::from_raw_parts(deps, n));
        }
        Ok(Some(out))
    }
}

/// Sets (`add` false) or extends (`add` true) the dependency set of the capturing stream `s`
/// with `d`, so that the next captured work depends on those nodes: one stream's capture can
/// then hold branches that run side by side in the graph.
pub fn update_capture_deps(s: sys::CUstream, d: &CaptureDeps, add: bool) -> Result<()> {
    let flags = if add {
        sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_ADD_CAPTURE_DEPENDENCIES
    } else {
        sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES
    };
    let mut nodes = d.nodes;
    // SAFETY: `nodes` holds d.n nodes of the graph that `s` is capturing (from capture_deps on
    // the same capture); the driver copies them.
    unsafe {
        ck(
            sys::cuStreamUpdateCaptureDependencies(s, nodes.as_mut_ptr(), d.n, flags as u32),
            "cuStreamUpdateCaptureDependencies",
        )
    }
}

pub fn graph_launch(e: sys::CUgraphExec, s: sys::CUstream) -> Result<()> {
    // SAFETY: e is an instantiated graph.
    unsafe { ck(sys::cuGraphLaunch(e, s), "cuGraphLaunch") }
}

pub fn graph_destroy(e: sys::CUgraphExec) {
    // SAFETY: e came from end_capture.
    unsafe {
        let _ = sys::cuGraphExecDestroy(e);
    }
}

pub fn event_create() -> Result<sys::CUevent> {
    let mut e: sys::CUevent = std::ptr::null_mut();
    // SAFETY: out-parameter call.
    unsafe {
        ck(
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DEFAULT as u32),
            "cuEventCreate",
        )?
    };
    Ok(e)
}

pub fn event_record(e: sys::CUevent, s: sys::CUstream) -> Result<()> {
    // SAFETY: live event and stream.
    unsafe { ck(sys::cuEventRecord(e, s), "cuEventRecord") }
}

pub fn event_elapsed_ms(a: sys::CUevent, b: sys::CUevent) -> Result<f32> {
    let ms;
    // SAFETY: both events were recorded; waits for b.
    unsafe {
        ck(sys::cuEventSynchronize(b), "cuEventSynchronize")?;
        // The 12.2 bindings name the pre-13 symbol, which CUDA 13 drivers still export; a
        // missing symbol panics inside cudarc, so catch it.
        let r = std::panic::catch_unwind(|| {
            let mut t = 0f32;
            (sys::cuEventElapsedTime(&mut t, a, b), t)
        });
        match r {
            Ok((r, t)) => {
                ck(r, "cuEventElapsedTime")?;
                ms = t;
            }
            Err(_) => {
                return Err(Error::new(
                    SikvStatus::SIKV_ERR_CUDA,
                    "cuEventElapsedTime is missing in libcuda",
                ))
            }
        }
    }
    Ok(ms)
}

pub fn event_destroy(e: sys::CUevent) {
    // SAFETY: e came from event_create.
    unsafe {
        let _ = sys::cuEventDestroy_v2(e);
    }
}

/// Page-locked host memory, mapped into the device's address space (`CU_MEMHOSTALLOC_DEVICEMAP`)
/// and portable across contexts: staging for uploads that must not synchronise, and words the
/// device writes that the host reads without a copy.
pub fn host_alloc_pinned(bytes: usize) -> Result<*mut u8> {
    let mut p: *mut c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
    // SAFETY: out-parameter call in the current context.
    let r = unsafe { sys::cuMemHostAlloc(&mut p, bytes.max(1), flags) };
    if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_OUT_OF_MEMORY,
            format!("cuMemHostAlloc of {bytes} bytes: out of page-locked memory"),
        ));
    }
    ck(r, "cuMemHostAlloc")?;
    Ok(p as *mut u8)
}

/// The device address of pinned memory from [`host_alloc_pinned`].
pub fn host_device_ptr(p: *mut u8) -> Result<u64> {
    let mut d: sys::CUdeviceptr = 0;
    // SAFETY: p came from host_alloc_pinned with DEVICEMAP.
    unsafe {
        ck(
            sys::cuMemHostGetDevicePointer_v2(&mut d, p as *mut c_void, 0),
            "cuMemHostGetDevicePointer",
        )?
    };
    Ok(d)
}

pub fn host_free_pinned(p: *mut u8) {
    // SAFETY: p came from host_alloc_pinned and is not used afterwards.
    unsafe {
        let _ = sys::cuMemFreeHost(p as *mut c_void);
    }
}

/// Copies `bytes` from page-locked host memory; asynchronous with respect to the host (the
/// source must stay unchanged until the stream reaches the copy).
///
/// # Safety
/// `src` points to `bytes` bytes of page-locked memory and `dst` to a device allocation of at
/// least `bytes`, both alive until the stream reaches the copy.
pub unsafe fn copy_htod_pinned_async(dst: u64, src: *const u8, bytes: usize, stream: sys::CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    ck(
        sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, bytes, stream),
        "cuMemcpyHtoDAsync",
    )
}

/// An event without timing (cheaper to record and query): marks how far a stream got.
pub fn event_create_sync_only() -> Result<sys::CUevent> {
    let mut e: sys::CUevent = std::ptr::null_mut();
    // SAFETY: out-parameter call.
    unsafe {
        ck(
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32),
            "cuEventCreate",
        )?
    };
    Ok(e)
}

/// Whether the work before the event's last record has finished (never blocks).
pub fn event_done(e: sys::CUevent) -> Result<bool> {
    // SAFETY: live event.
    let r = unsafe { sys::cuEventQuery(e) };
    if r == sys::CUresult::CUDA_ERROR_NOT_READY {
        return Ok(false);
    }
    ck(r, "cuEventQuery").map(|_| true)
}

/// Blocks until the work before the event's last record has finished.
pub fn event_wait(e: sys::CUevent) -> Result<()> {
    // SAFETY: live event.
    unsafe { ck(sys::cuEventSynchronize(e), "cuEventSynchronize") }
}

/// Whether every operation queued on `stream` has finished (never blocks).
pub fn stream_done(stream: sys::CUstream) -> Result<bool> {
    // SAFETY: live stream (or null = legacy default).
    let r = unsafe { sys::cuStreamQuery(stream) };
    if r == sys::CUresult::CUDA_ERROR_NOT_READY {
        return Ok(false);
    }
    ck(r, "cuStreamQuery").map(|_| true)
}

/// Makes `stream` wait until the 32-bit word at device address `addr` is >= `value`.
pub fn stream_wait_geq(stream: sys::CUstream, addr: u64, value: u32) -> Result<()> {
    // A symbol missing from an old driver panics inside cudarc: report it instead.
    let r = std::panic::catch_unwind(|| {
        // SAFETY: `addr` is device-visible memory the caller keeps alive until the wait ends.
        unsafe {
            sys::cuStreamWaitValue32_v2(
                stream,
                addr,
                value,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        }
    });
    match r {
        Ok(r) => ck(r, "cuStreamWaitValue32"),
        Err(_) => Err(Error::new(
            SikvStatus::SIKV_ERR_CUDA,
            "cuStreamWaitValue32 is missing in libcuda",
        )),
    }
}
