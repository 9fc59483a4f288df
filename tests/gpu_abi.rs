//! The C ABI on a CUDA device with device memory everywhere, against the same exported calls on
//! the CPU device (the oracle) fed the same inputs (issue #10, parts 1 and 7):
//!
//! - every stateless call on engine-owned device pools, page tables, slot mappings, sequence
//!   slots and workspace;
//! - the managed cache over engine-owned device pools with device activations, fork included;
//! - a whole decode step of exported calls captured in one CUDA graph and replayed;
//! - claims: the dense crossover of `sikv_kernel_decode`, ties to the smaller position, a
//!   sticky CUDA error poisoning the handle (in a child process: it breaks the process's CUDA
//!   context), the device fault word, and a stage error releasing the pages it took.
//!
//! Comparison rules: pools byte-identical (encode and calibrate are bit-exact with the CPU
//! encoder); selections identical (indices and counts); outputs within 8e-3 of each output
//! row's own max |out| (no floor; f16 outputs, recorded worst errors are ~1.5e-5). Outputs and
//! selections are poisoned before every GPU call, so an element a kernel fails to write shows.
//!
//! Without a CUDA device each test prints one line `skipped: no CUDA device (<test>)` and
//! returns; CI counts those lines. With one, each prints its seed (`SIKV_TEST_SEED` replays it)
//! and its worst error.

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use common::Rng;
use selfindexkv::cache::{Activations, Cache};
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::gpu::{DeviceBuffer, GpuContext};
use selfindexkv::layout::SIKV_NUM_PLANES;
use selfindexkv::{numeric, CacheConfig, Error, Layout, SikvStatus};

type S = SikvStatus;

const HQ: usize = 8;
const HK: usize = 2;
const D: usize = 128;
const P: usize = 16;
/// Relative tolerance of f16 outputs (see the module doc).
// About 10x the worst recorded on the H200 (7.6e-4, attend_dense, 2026-12-02).
const TOL: f32 = 8e-3;

/// The shapes of every test: 2 layers, 8 query / 2 KV heads (G = 4), head_dim 128, pages of
/// 16 tokens, f16, the 2+1 profile; a budget small enough that selection really selects.
fn config(device: u32) -> SikvConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).expect("profile 2+1");
    c.device = device;
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 2;
    c.num_q_heads = HQ as u32;
    c.num_kv_heads = HK as u32;
    c.head_dim = D as u32;
    c.page_size = P as u32;
    c.max_seq_len = 2048;
    c.max_append_tokens = 2048;
    c.max_batch = 4;
    c.max_seqs = 4;
    c.budget_min = 64;
    c.budget_max = 256;
    // The sparse path (the default crossover would run these short sequences dense); the
    // crossover has its own test.
    c.dense_crossover = 0;
    c
}

fn ok(s: SikvStatus, what: &str) {
    assert_eq!(s, S::SIKV_OK, "{what}: {}", last_error_message());
}

/// A status as the crate's error, for closures that must return a `Result` (graph capture).
fn status_result(s: SikvStatus, what: &str) -> selfindexkv::Result<()> {
    if s == S::SIKV_OK {
        Ok(())
    } else {
        Err(Error::new(s, format!("{what}: {}", last_error_message())))
    }
}

/// Uniform in [-1, 1) plus a per-channel offset in [-0.25, 0.25]: never zeros, never centred.
fn vals(rng: &mut Rng, rows: usize) -> Vec<f32> {
    (0..rows * D)
        .map(|i| rng.range(-1.0, 1.0) + 0.5 * (((i % D) * 37 % 11) as f32 / 10.0 - 0.5))
        .collect()
}

fn f16(x: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; 2 * x.len()];
    numeric::from_f32(Dtype::F16, x, &mut b);
    b
}

fn to_f32(b: &[u8]) -> Vec<f32> {
    let mut x = vec![0f32; b.len() / 2];
    numeric::to_f32(Dtype::F16, b, &mut x);
    x
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// `page * page_size + slot` of position `pos` of a sequence on `pages`.
fn slot_of(pages: &[i32], pos: usize) -> i64 {
    pages[pos / P] as i64 * P as i64 + (pos % P) as i64
}

fn dptr(b: &DeviceBuffer) -> *mut c_void {
    b.ptr() as *mut c_void
}

/// Device memory helpers of the tests (the legacy default stream; every helper that reads back
/// synchronises first).
fn upload(ctx: &GpuContext, bytes: &[u8]) -> DeviceBuffer {
    let b = ctx.alloc(bytes.len().max(16)).expect("cuMemAlloc");
    ctx.copy_htod_async(b.ptr(), bytes, null_mut())
        .expect("copy to the device");
    b
}

fn poisoned(ctx: &GpuContext, bytes: usize, byte: u8) -> DeviceBuffer {
    let b = ctx.alloc(bytes.max(16)).expect("cuMemAlloc");
    ctx.memset_async(b.ptr(), byte, bytes.max(16), null_mut())
        .expect("memset");
    b
}

fn download(ctx: &GpuContext, ptr: u64, bytes: usize) -> Vec<u8> {
    ctx.synchronize(null_mut()).expect("synchronize");
    let mut v = vec![0u8; bytes];
    ctx.copy_dtoh(&mut v, ptr).expect("copy to the host");
    v
}

/// Worst |gpu - cpu| over rows of `D` outputs, relative to the row's own max |cpu| (no floor).
/// Panics at the first GPU element that is not finite (an unwritten output is NaN) or beyond
/// `TOL`, naming it.
fn rel_err(what: &str, gpu: &[u8], cpu: &[u8]) -> f32 {
    assert_eq!(gpu.len(), cpu.len(), "{what}: output sizes differ");
    let (g, c) = (to_f32(gpu), to_f32(cpu));
    let mut worst = 0f32;
    for (r, (gr, cr)) in g.chunks(D).zip(c.chunks(D)).enumerate() {
        let scale = cr.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            scale > 0.0 && scale.is_finite(),
            "{what}: row {r} of the CPU output has max |out| = {scale} (degenerate)"
        );
        for (i, (&x, &y)) in gr.iter().zip(cr).enumerate() {
            assert!(
                x.is_finite(),
                "{what}: row {r} channel {i}: GPU output {x} is not finite (unwritten?)"
            );
            let e = (x - y).abs() / scale;
            assert!(
                e <= TOL,
                "{what}: row {r} channel {i}: gpu {x} cpu {y}: error {e:.3e} of the row's max |out| {scale} exceeds {TOL:.0e}"
            );
            worst = worst.max(e);
        }
    }
    worst
}

/// Both selections identical (counts, then every index including the -1 fill), and well formed:
/// counts in 1..=budget_max, indices ascending then -1.
fn same_selection(what: &str, gi: &[i32], gc: &[i32], ci: &[i32], cc: &[i32], kmax: usize) {
    assert_eq!(gc, cc, "{what}: selection counts differ (gpu left, cpu right)");
    for (row, &n) in cc.iter().enumerate() {
        assert!(
            n >= 1 && n as usize <= kmax,
            "{what}: row {row}: count {n} outside 1..={kmax}"
        );
        let (g, c) = (&gi[row * kmax..(row + 1) * kmax], &ci[row * kmax..(row + 1) * kmax]);
        if g != c {
            let only_g: Vec<i32> = g.iter().filter(|x| !c.contains(x)).copied().take(16).collect();
            let only_c: Vec<i32> = c.iter().filter(|x| !g.contains(x)).copied().take(16).collect();
            panic!("{what}: row {row}: selections differ: only on the GPU {only_g:?}, only on the CPU {only_c:?}");
        }
        let n = n as usize;
        assert!(
            c[..n].windows(2).all(|w| w[0] < w[1]),
            "{what}: row {row}: indices not strictly ascending"
        );
        assert!(
            c[n..].iter().all(|&x| x == -1),
            "{what}: row {row}: entries after the count are not -1"
        );
    }
}

/// Which layer and plane (or state) a byte offset of the pools falls in, for failure messages.
fn locate(info: &SikvLayoutInfo, off: usize, state: bool) -> String {
    if state {
        let l = off / info.layer_state_bytes;
        let rec = (off % info.layer_state_bytes) / info.state_record_bytes;
        return format!(
            "layer {l}, state record {rec} (slot {}, KV head {})",
            rec / HK,
            rec % HK
        );
    }
    let l = off / info.layer_plane_bytes;
    let o = off % info.layer_plane_bytes;
    let plane = (0..SIKV_NUM_PLANES)
        .filter(|&p| info.plane_bytes[p] > 0 && o >= info.plane_offset[p])
        .max_by_key(|&p| info.plane_offset[p]);
    match plane {
        Some(p) => {
            let row = (o - info.plane_offset[p]) / info.row_bytes[p];
            format!(
                "layer {l}, plane {p}, row {row} (page {}, KV head {})",
                row / (HK * P),
                row / P % HK
            )
        }
        None => format!("layer {l}, offset {o}"),
    }
}

fn same_pools(what: &str, info: &SikvLayoutInfo, gpu: &[u8], cpu: &[u8], state: bool) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: pool sizes differ");
    if let Some(i) = gpu.iter().zip(cpu).position(|(a, b)| a != b) {
        let n = gpu.iter().zip(cpu).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n} of {} bytes differ between the GPU and the CPU; the first at byte {i} ({}): gpu {:#04x} cpu {:#04x}",
            gpu.len(),
            locate(info, i, state),
            gpu[i],
            cpu[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The stateless fixture: one configuration's kernels handles on both devices and their pools.

/// Stateless handles of one configuration on the GPU and on the CPU, with pools the test owns:
/// device pools (all layers, one allocation each for planes and state) and host pools of the
/// same layout, both zeroed, so that rows no token is written to compare equal too.
struct Pair {
    c: SikvConfig,
    info: SikvLayoutInfo,
    ctx: GpuContext,
    gk: *mut SikvKernels,
    ck: *mut SikvKernels,
    dplanes: DeviceBuffer,
    dstate: DeviceBuffer,
    ws: DeviceBuffer,
    ws_bytes: usize,
    hplanes: Vec<u8>,
    hstate: Vec<u8>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.ctx.synchronize(null_mut());
        sikv_kernels_destroy(self.gk);
        sikv_kernels_destroy(self.ck);
    }
}

/// What `Pair::select` returns: both devices' selections, and the GPU's still on the device.
struct Sel {
    gi: Vec<i32>,
    gc: Vec<i32>,
    ci: Vec<i32>,
    cc: Vec<i32>,
    didx: DeviceBuffer,
    dcnt: DeviceBuffer,
}

/// A decode batch in host memory, with copies in device memory: the CSR page table, the
/// sequence slots and the queries.
struct Batch {
    indptr: Vec<i32>,
    indices: Vec<i32>,
    last: Vec<i32>,
    slots: Vec<i32>,
    q: Vec<u8>,
    dev: [DeviceBuffer; 5],
}

impl Batch {
    fn new(ctx: &GpuContext, pages: &[&[i32]], lens: &[usize], slots: &[i32], q: Vec<u8>) -> Batch {
        assert_eq!(q.len(), slots.len() * HQ * D * 2);
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut last = Vec::new();
        for (pg, &len) in pages.iter().zip(lens) {
            let np = len.div_ceil(P);
            indices.extend_from_slice(&pg[..np]);
            indptr.push(indices.len() as i32);
            last.push((len - (np - 1) * P) as i32);
        }
        let dev = [
            upload(ctx, &i32_bytes(&indptr)),
            upload(ctx, &i32_bytes(&indices)),
            upload(ctx, &i32_bytes(&last)),
            upload(ctx, &i32_bytes(slots)),
            upload(ctx, &q),
        ];
        Batch {
            indptr,
            indices,
            last,
            slots: slots.to_vec(),
            q,
            dev,
        }
    }
    fn n(&self) -> usize {
        self.slots.len()
    }
    fn htable(&self) -> SikvPageTable {
        SikvPageTable {
            indptr: self.indptr.as_ptr(),
            indices: self.indices.as_ptr(),
            last_page_len: self.last.as_ptr(),
            batch: self.n() as u32,
        }
    }
    fn dtable(&self) -> SikvPageTable {
        SikvPageTable {
            indptr: self.dev[0].ptr() as *const i32,
            indices: self.dev[1].ptr() as *const i32,
            last_page_len: self.dev[2].ptr() as *const i32,
            batch: self.n() as u32,
        }
    }
    fn dslots(&self) -> *const i32 {
        self.dev[3].ptr() as *const i32
    }
    fn dq(&self) -> *const c_void {
        self.dev[4].ptr() as *const c_void
    }
    fn out_bytes(&self) -> usize {
        self.n() * HQ * D * 2
    }
}

/// A managed cache's free pages and checksum: what a failed call must leave as it was.
fn pool_state(cache: *mut SikvCache) -> (u32, u64) {
    let mut i = SikvCacheInfo::default();
    ok(sikv_cache_info(cache, &mut i), "sikv_cache_info");
    let mut h = 0u64;
    ok(sikv_cache_checksum(cache, &mut h), "sikv_cache_checksum");
    (i.free_pages, h)
}

fn layer_pools(info: &SikvLayoutInfo, planes: u64, state: u64, layer: usize) -> SikvLayerPools {
    let base = planes + (layer * info.layer_plane_bytes) as u64;
    SikvLayerPools {
        plane: std::array::from_fn(|p| {
            if info.plane_bytes[p] == 0 {
                null_mut()
            } else {
                (base + info.plane_offset[p] as u64) as *mut c_void
            }
        }),
        state: (state + (layer * info.layer_state_bytes) as u64) as *mut c_void,
    }
}

impl Pair {
    /// `None` (after the counted skip line) without a CUDA device.
    fn new(c: SikvConfig, test: &str) -> Option<Pair> {
        assert_eq!(c.device, SIKV_DEVICE_CUDA);
        let mut gk: *mut SikvKernels = null_mut();
        match sikv_kernels_create(&c, &mut gk) {
            S::SIKV_OK => {}
            S::SIKV_ERR_NO_DEVICE => {
                common::skip_no_cuda_device(test);
                return None;
            }
            s => panic!("sikv_kernels_create on the GPU: {s:?}: {}", last_error_message()),
        }
        let mut cc = c;
        cc.device = SIKV_DEVICE_CPU;
        let mut ck: *mut SikvKernels = null_mut();
        ok(sikv_kernels_create(&cc, &mut ck), "sikv_kernels_create on the CPU");
        let cfg = CacheConfig::from_c(&c).expect("config");
        let ctx = GpuContext::new(&cfg, &Layout::new(&cfg)).expect("GPU context for the test's allocations");
        let mut info = SikvLayoutInfo::default();
        ok(sikv_query_layout(&c, &mut info), "sikv_query_layout (GPU config)");
        let mut cinfo = SikvLayoutInfo::default();
        ok(sikv_query_layout(&cc, &mut cinfo), "sikv_query_layout (CPU config)");
        assert_eq!(
            (
                info.layer_plane_bytes,
                info.layer_state_bytes,
                info.plane_offset,
                info.plane_bytes
            ),
            (
                cinfo.layer_plane_bytes,
                cinfo.layer_state_bytes,
                cinfo.plane_offset,
                cinfo.plane_bytes
            ),
            "the pool layout depends on the device"
        );
        assert_eq!(info.total_plane_bytes, c.num_layers as usize * info.layer_plane_bytes);
        assert_eq!(info.total_state_bytes, c.num_layers as usize * info.layer_state_bytes);
        let mut ws_bytes = 0usize;
        ok(
            sikv_workspace_size(gk, c.max_batch, &mut ws_bytes),
            "sikv_workspace_size(max_batch)",
        );
        let mut ws1 = 0usize;
        ok(sikv_workspace_size(gk, 1, &mut ws1), "sikv_workspace_size(1)");
        assert!(
            ws1 > 0 && ws_bytes >= ws1,
            "workspace: batch 1 needs {ws1}, max_batch {ws_bytes}"
        );
        assert_eq!(
            ws_bytes, info.workspace_bytes,
            "sikv_workspace_size(max_batch) and SikvLayoutInfo.workspace_bytes disagree"
        );
        let mut cws = 1usize;
        ok(
            sikv_workspace_size(ck, c.max_batch, &mut cws),
            "sikv_workspace_size on the CPU",
        );
        assert_eq!(cws, 0, "the CPU needs no workspace");
        let dplanes = poisoned(&ctx, info.total_plane_bytes, 0);
        let dstate = poisoned(&ctx, info.total_state_bytes, 0);
        // Garbage in the workspace: no call may depend on what it holds.
        let ws = poisoned(&ctx, ws_bytes, 0xA5);
        let mut p = Pair {
            c,
            hplanes: vec![0u8; info.total_plane_bytes],
            hstate: vec![0u8; info.total_state_bytes],
            info,
            ctx,
            gk,
            ck,
            dplanes,
            dstate,
            ws,
            ws_bytes,
        };
        for layer in 0..c.num_layers as usize {
            for slot in 0..c.max_seqs {
                p.reset_slot(layer, slot);
            }
        }
        Some(p)
    }

    fn dpools(&self, layer: usize) -> SikvLayerPools {
        layer_pools(&self.info, self.dplanes.ptr(), self.dstate.ptr(), layer)
    }

    fn hpools(&mut self, layer: usize) -> SikvLayerPools {
        layer_pools(
            &self.info,
            self.hplanes.as_mut_ptr() as u64,
            self.hstate.as_mut_ptr() as u64,
            layer,
        )
    }

    fn wsp(&self) -> *mut c_void {
        dptr(&self.ws)
    }

    fn sync(&self) {
        self.ctx.synchronize(null_mut()).expect("synchronize");
    }

    fn reset_slot(&mut self, layer: usize, slot: u32) {
        let (dp, hp) = (self.dpools(layer), self.hpools(layer));
        ok(sikv_kernel_reset_slot(self.gk, &dp, slot, null_mut()), "GPU reset_slot");
        ok(sikv_kernel_reset_slot(self.ck, &hp, slot, null_mut()), "CPU reset_slot");
        self.sync();
    }

    #[allow(clippy::too_many_arguments)] // the stage's own arguments
    fn calibrate(&mut self, layer: usize, slot: u32, k: &[u8], v: &[u8], nq: u32, q: &[u8], sm: &[i64]) {
        let n = sm.len() as u32;
        let (dk, dv, dq, dsm) = (
            upload(&self.ctx, k),
            upload(&self.ctx, v),
            upload(&self.ctx, q),
            upload(&self.ctx, &i64_bytes(sm)),
        );
        let (dp, hp) = (self.dpools(layer), self.hpools(layer));
        let s = sikv_kernel_calibrate(
            self.gk,
            &dp,
            slot,
            n,
            dptr(&dk),
            dptr(&dv),
            nq,
            dptr(&dq),
            dsm.ptr() as *const i64,
            self.wsp(),
            self.ws_bytes,
            null_mut(),
        );
        ok(s, &format!("GPU calibrate layer {layer} slot {slot}"));
        let s = sikv_kernel_calibrate(
            self.ck,
            &hp,
            slot,
            n,
            k.as_ptr() as *const c_void,
            v.as_ptr() as *const c_void,
            nq,
            q.as_ptr() as *const c_void,
            sm.as_ptr(),
            null_mut(),
            0,
            null_mut(),
        );
        ok(s, &format!("CPU calibrate layer {layer} slot {slot}"));
        self.sync();
    }

    #[allow(clippy::too_many_arguments)] // the stage's own arguments
    fn append(&mut self, layer: usize, k: &[u8], v: &[u8], sm: &[i64], slots: &[i32], pos: &[i32]) {
        let n = sm.len() as u32;
        let (dk, dv) = (upload(&self.ctx, k), upload(&self.ctx, v));
        let (dsm, dss, dpos) = (
            upload(&self.ctx, &i64_bytes(sm)),
            upload(&self.ctx, &i32_bytes(slots)),
            upload(&self.ctx, &i32_bytes(pos)),
        );
        let (dp, hp) = (self.dpools(layer), self.hpools(layer));
        let s = sikv_kernel_append(
            self.gk,
            &dp,
            n,
            dptr(&dk),
            dptr(&dv),
            dsm.ptr() as *const i64,
            dss.ptr() as *const i32,
            dpos.ptr() as *const i32,
            null_mut(),
        );
        ok(s, &format!("GPU append layer {layer}"));
        let s = sikv_kernel_append(
            self.ck,
            &hp,
            n,
            k.as_ptr() as *const c_void,
            v.as_ptr() as *const c_void,
            sm.as_ptr(),
            slots.as_ptr(),
            pos.as_ptr(),
            null_mut(),
        );
        ok(s, &format!("CPU append layer {layer}"));
        self.sync();
    }

    fn kmax(&self) -> usize {
        self.c.budget_max as usize
    }

    fn select(&mut self, layer: usize, b: &Batch) -> Sel {
        let rows = b.n() * HK;
        let kmax = self.kmax();
        // 0x7F: a large positive index, unlike the legitimate -1 fill.
        let didx = poisoned(&self.ctx, 4 * rows * kmax, 0x7F);
        let dcnt = poisoned(&self.ctx, 4 * rows, 0x7F);
        let (dp, hp) = (self.dpools(layer), self.hpools(layer));
        let s = sikv_kernel_select(
            self.gk,
            &dp,
            &b.dtable(),
            b.dslots(),
            b.dq(),
            didx.ptr() as *mut i32,
            dcnt.ptr() as *mut i32,
            self.wsp(),
            self.ws_bytes,
            null_mut(),
        );
        ok(s, &format!("GPU select layer {layer}"));
        let (mut ci, mut cc) = (vec![i32::MAX; rows * kmax], vec![i32::MAX; rows]);
        let s = sikv_kernel_select(
            self.ck,
            &hp,
            &b.htable(),
            b.slots.as_ptr(),
            b.q.as_ptr() as *const c_void,
            ci.as_mut_ptr(),
            cc.as_mut_ptr(),
            null_mut(),
            0,
            null_mut(),
        );
        ok(s, &format!("CPU select layer {layer}"));
        let gi = i32s(&download(&self.ctx, didx.ptr(), 4 * rows * kmax));
        let gc = i32s(&download(&self.ctx, dcnt.ptr(), 4 * rows));
        Sel {
            gi,
            gc,
            ci,
            cc,
            didx,
            dcnt,
        }
    }

    /// attend over each device's own selection (GPU: the device arrays select wrote).
    fn attend(&mut self, layer: usize, b: &Batch, sel: &Sel) -> (Vec<u8>, Vec<u8>) {
        let dout = poisoned(&self.ctx, b.out_bytes(), 0xFF);
        let mut hout = vec![0xFFu8; b.out_bytes()];
        let (dp, hp) = (self.dpools(layer), self.hpools(layer));
        let s = sikv_kernel_attend(
            self.gk,
            &dp,
            &b.dtable(),
            b.dslots(),
            b.dq(),
            sel.didx.ptr() as *const i32,
            sel.dcnt.ptr() as *const i32,
            dptr(&dout),
            self.wsp(),
            self.ws_bytes,
            null_mut(),
        );
        ok(s, &format!("GPU attend layer {layer}"));
        let s = sikv_kernel_attend(
            self.ck,
            &hp,
            &b.htable(),
            b.slots.as_ptr(),
            b.q.as_ptr() as *const c_void,
            sel.ci.as_ptr(),
            sel.cc.as_ptr(),
            hout.as_mut_ptr() as *mut c_void,
            null_mut(),
            0,
            null_mut(),
        );
        ok(s, &format!("CPU attend layer {layer}"));
        (download(&self.ctx, dout.ptr(), b.out_bytes()), hout)
    }

    /// attend_dense (`dense`) or decode on both devices.
    fn dense_or_decode(&mut self, layer: usize, b: &Batch, dense: bool) -> (Vec<u8>, Vec<u8>) {
        let call = if dense {
            sikv_kernel_attend_dense
        } else {
            sikv_kernel_decode
        };
        let what = if dense { "attend_dense" } else { "decode" };
        let dout = poisoned(&self.ctx, b.out_bytes(), 0xFF);
        let mut hout = vec![0xFFu8; b.out_bytes()];
        let (dp, hp) = (self.dpools(layer), self.hpools(layer));
        let s = call(
            self.gk,
            &dp,
            &b.dtable(),
            b.dslots(),
            b.dq(),
            dptr(&dout),
            self.wsp(),
            self.ws_bytes,
            null_mut(),
        );
        ok(s, &format!("GPU {what} layer {layer}"));
        let s = call(
            self.ck,
            &hp,
            &b.htable(),
            b.slots.as_ptr(),
            b.q.as_ptr() as *const c_void,
            hout.as_mut_ptr() as *mut c_void,
            null_mut(),
            0,
            null_mut(),
        );
        ok(s, &format!("CPU {what} layer {layer}"));
        (download(&self.ctx, dout.ptr(), b.out_bytes()), hout)
    }

    /// `sikv_kernel_decode` of another GPU kernels handle (another configuration) over this
    /// pair's device pools and workspace at `layer`: the output bytes.
    fn gpu_decode_with(&self, kernels: *const SikvKernels, layer: usize, b: &Batch) -> Vec<u8> {
        let dout = poisoned(&self.ctx, b.out_bytes(), 0xFF);
        let s = sikv_kernel_decode(
            kernels,
            &self.dpools(layer),
            &b.dtable(),
            b.dslots(),
            b.dq(),
            dptr(&dout),
            self.wsp(),
            self.ws_bytes,
            null_mut(),
        );
        ok(s, &format!("GPU decode with another handle, layer {layer}"));
        download(&self.ctx, dout.ptr(), b.out_bytes())
    }

    fn check_pools(&self, what: &str) {
        let gp = download(&self.ctx, self.dplanes.ptr(), self.info.total_plane_bytes);
        let gs = download(&self.ctx, self.dstate.ptr(), self.info.total_state_bytes);
        same_pools(&format!("{what}: plane pools"), &self.info, &gp, &self.hplanes, false);
        same_pools(&format!("{what}: state pools"), &self.info, &gs, &self.hstate, true);
    }
}

/// Calibrates sequence slot `slot` (on `pages`) at every layer of `p` with a fresh random
/// prompt of `n` tokens and `nq` queries, on both devices.
fn calibrate_random(p: &mut Pair, rng: &mut Rng, slot: u32, pages: &[i32], n: usize, nq: u32) {
    for layer in 0..p.c.num_layers as usize {
        let k = f16(&vals(rng, n * HK));
        let v = f16(&vals(rng, n * HK));
        let q = f16(&vals(rng, nq as usize * HQ));
        let sm: Vec<i64> = (0..n).map(|t| slot_of(pages, t)).collect();
        p.calibrate(layer, slot, &k, &v, nq, &q, &sm);
    }
}

/// Appends `counts[s]` random tokens to each sequence at every layer in one ragged call per
/// layer, on both devices; `lens` grows.
fn append_random(p: &mut Pair, rng: &mut Rng, pages: &[&[i32]], slots: &[i32], lens: &mut [usize], counts: &[usize]) {
    let total: usize = counts.iter().sum();
    let mut sm = Vec::new();
    let mut ss = Vec::new();
    let mut pos = Vec::new();
    for s in 0..counts.len() {
        for t in 0..counts[s] {
            let at = lens[s] + t;
            sm.push(slot_of(pages[s], at));
            ss.push(slots[s]);
            pos.push(at as i32);
        }
    }
    for layer in 0..p.c.num_layers as usize {
        let k = f16(&vals(rng, total * HK));
        let v = f16(&vals(rng, total * HK));
        p.append(layer, &k, &v, &sm, &ss, &pos);
    }
    for (l, c) in lens.iter_mut().zip(counts) {
        *l += c;
    }
}

/// Two sequences on interleaved, non-contiguous pages: odd pages ascending, even descending.
/// Slots 0 and 1 on two_page_lists' pages, calibrated on 700 and 453 tokens and one decode
/// token appended to each: (pages, slots, lengths).
fn two_decoding_sequences(p: &mut Pair, rng: &mut Rng) -> ([Vec<i32>; 2], [i32; 2], [usize; 2]) {
    let pages = two_page_lists();
    let slots = [0i32, 1];
    let mut lens = [700usize, 453];
    calibrate_random(p, rng, 0, &pages[0], lens[0], 2);
    calibrate_random(p, rng, 1, &pages[1], lens[1], 2);
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    append_random(p, rng, &pg, &slots, &mut lens, &[1, 1]);
    (pages, slots, lens)
}

/// A kernels handle of configuration `c` without the dense crossover (the sparse decode);
/// the caller destroys it.
fn kernels_without_crossover(c: &SikvConfig) -> *mut SikvKernels {
    let mut sparse_cfg = *c;
    sparse_cfg.dense_crossover = 0;
    let mut sparse: *mut SikvKernels = null_mut();
    ok(
        sikv_kernels_create(&sparse_cfg, &mut sparse),
        "kernels without the crossover",
    );
    sparse
}

fn two_page_lists() -> [Vec<i32>; 2] {
    [
        (0..64).map(|i| 2 * i + 1).collect(),
        (0..64).rev().map(|i| 2 * i).collect(),
    ]
}

// ---------------------------------------------------------------------------------------------
// 1. Every stateless call with device memory.

/// Every stateless export on device memory (pools, page table, slot mapping, sequence slots,
/// workspace, activations) against the same calls on the CPU: calibrate two sequences of
/// ragged lengths, append a ragged chunk then decode tokens, then select, attend (on select's
/// output), attend_dense, decode, reset_slot and a new calibrate of the reset slot.
#[test]
fn stateless_calls_on_device_memory_match_cpu() {
    let test = "stateless_calls_on_device_memory_match_cpu";
    let Some(mut p) = Pair::new(config(SIKV_DEVICE_CUDA), test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let pages = two_page_lists();
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    // Slots 2 and 0: sequence slot and batch row differ.
    let slots = [2i32, 0];
    let mut lens = [700usize, 453];
    calibrate_random(&mut p, &mut rng, 2, &pages[0], lens[0], 3);
    calibrate_random(&mut p, &mut rng, 0, &pages[1], lens[1], 1);
    p.check_pools("after calibrate");
    // A ragged chunk (5 + 2 tokens in one call), then three decode steps.
    for counts in [[5usize, 2], [1, 1], [1, 1], [1, 1]] {
        append_random(&mut p, &mut rng, &pg, &slots, &mut lens, &counts);
    }
    p.check_pools("after append");
    let kmax = p.kmax();
    let (mut w_att, mut w_dense, mut w_dec) = (0f32, 0f32, 0f32);
    for layer in 0..2 {
        let q = f16(&vals(&mut rng, 2 * HQ));
        let b = Batch::new(&p.ctx, &pg, &lens, &slots, q);
        let sel = p.select(layer, &b);
        same_selection(
            &format!("layer {layer} select"),
            &sel.gi,
            &sel.gc,
            &sel.ci,
            &sel.cc,
            kmax,
        );
        let (ga, ca) = p.attend(layer, &b, &sel);
        w_att = w_att.max(rel_err(&format!("layer {layer} attend"), &ga, &ca));
        let (gd, cd) = p.dense_or_decode(layer, &b, true);
        w_dense = w_dense.max(rel_err(&format!("layer {layer} attend_dense"), &gd, &cd));
        let (gx, cx) = p.dense_or_decode(layer, &b, false);
        w_dec = w_dec.max(rel_err(&format!("layer {layer} decode"), &gx, &cx));
        // decode is select + attend in one call, on each device.
        assert!(gx == ga, "layer {layer}: GPU decode differs from GPU select + attend");
        assert!(cx == ca, "layer {layer}: CPU decode differs from CPU select + attend");
        assert!(
            ga != gd,
            "layer {layer}: the sparse output equals the dense one bit for bit: nothing was selected away"
        );
    }
    // Decode and reset leave the pools alone and in step; then slot 2 is reset at layer 0 on
    // both, and calibrated again for a new sequence.
    p.check_pools("after select / attend / attend_dense / decode");
    p.reset_slot(0, 2);
    p.check_pools("after reset_slot");
    let n = 333;
    let k = f16(&vals(&mut rng, n * HK));
    let v = f16(&vals(&mut rng, n * HK));
    let q = f16(&vals(&mut rng, 2 * HQ));
    let sm: Vec<i64> = (0..n).map(|t| slot_of(&pages[0], t)).collect();
    p.calibrate(0, 2, &k, &v, 2, &q, &sm);
    p.check_pools("after calibrating the reset slot again");
    let b = Batch::new(&p.ctx, &[&pages[0]], &[n], &[2], f16(&vals(&mut rng, HQ)));
    let (gx, cx) = p.dense_or_decode(0, &b, false);
    w_dec = w_dec.max(rel_err("decode of the recalibrated slot", &gx, &cx));
    println!(
        "{test}: pools identical, selections identical; worst error relative to each row's max |out|: attend {w_att:.2e}, attend_dense {w_dense:.2e}, decode {w_dec:.2e}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The managed cache on engine-owned device pools.

/// A managed cache on the GPU over engine-owned device pools, and one on the CPU over
/// engine-owned host pools (both from `sikv_cache_create_with_pools`), fed the same calls.
struct Managed {
    info: SikvLayoutInfo,
    ctx: GpuContext,
    gc: *mut SikvCache,
    hc: *mut SikvCache,
    dplanes: DeviceBuffer,
    dstate: DeviceBuffer,
    _dws: DeviceBuffer,
    hplanes: Vec<u8>,
    hstate: Vec<u8>,
    kmax: usize,
}

impl Drop for Managed {
    fn drop(&mut self) {
        let _ = self.ctx.synchronize(null_mut());
        sikv_cache_destroy(self.gc);
        sikv_cache_destroy(self.hc);
    }
}

impl Managed {
    fn new(test: &str) -> Option<Managed> {
        let c = config(SIKV_DEVICE_CUDA);
        let cfg = CacheConfig::from_c(&c).expect("config");
        let ctx = match GpuContext::new(&cfg, &Layout::new(&cfg)) {
            Ok(x) => x,
            Err(e) if e.status == S::SIKV_ERR_NO_DEVICE => {
                common::skip_no_cuda_device(test);
                return None;
            }
            Err(e) => panic!("GPU context: {e}"),
        };
        let mut info = SikvLayoutInfo::default();
        ok(sikv_query_layout(&c, &mut info), "sikv_query_layout");
        let dplanes = poisoned(&ctx, info.total_plane_bytes, 0);
        // The cache must clear the state pool it is given (it holds garbage here).
        let dstate = poisoned(&ctx, info.total_state_bytes, 0x5A);
        let dws = poisoned(&ctx, info.workspace_bytes, 0xA5);
        ctx.synchronize(null_mut()).expect("synchronize");
        let mut hplanes = vec![0u8; info.total_plane_bytes];
        let mut hstate = vec![0x5Au8; info.total_state_bytes];
        let gdesc = SikvPoolsDesc {
            planes: dptr(&dplanes),
            planes_bytes: info.total_plane_bytes,
            state: dptr(&dstate),
            state_bytes: info.total_state_bytes,
            workspace: dptr(&dws),
            workspace_bytes: info.workspace_bytes,
        };
        let hdesc = SikvPoolsDesc {
            planes: hplanes.as_mut_ptr() as *mut c_void,
            planes_bytes: hplanes.len(),
            state: hstate.as_mut_ptr() as *mut c_void,
            state_bytes: hstate.len(),
            workspace: null_mut(),
            workspace_bytes: 0,
        };
        let mut gc: *mut SikvCache = null_mut();
        ok(
            sikv_cache_create_with_pools(&c, &gdesc, &mut gc),
            "sikv_cache_create_with_pools (GPU, device pools)",
        );
        let mut cc = c;
        cc.device = SIKV_DEVICE_CPU;
        let mut hc: *mut SikvCache = null_mut();
        ok(
            sikv_cache_create_with_pools(&cc, &hdesc, &mut hc),
            "sikv_cache_create_with_pools (CPU, host pools)",
        );
        let m = Managed {
            info,
            ctx,
            gc,
            hc,
            dplanes,
            dstate,
            _dws: dws,
            hplanes,
            hstate,
            kmax: c.budget_max as usize,
        };
        let (gi, ci) = (m.cache_info(true), m.cache_info(false));
        assert_eq!(
            gi.device, SIKV_DEVICE_CUDA,
            "the cache on device pools does not run on the GPU"
        );
        assert_eq!(ci.device, SIKV_DEVICE_CPU);
        assert_eq!((gi.num_pages, gi.free_pages), (ci.num_pages, ci.free_pages));
        assert_eq!(gi.num_pages, info.num_pages);
        Some(m)
    }

    fn cache_info(&self, gpu: bool) -> SikvCacheInfo {
        let mut i = SikvCacheInfo::default();
        ok(
            sikv_cache_info(if gpu { self.gc } else { self.hc }, &mut i),
            "sikv_cache_info",
        );
        i
    }

    fn sync(&self) {
        self.ctx.synchronize(null_mut()).expect("synchronize");
    }

    /// A call on both caches: `f(cache, activations...)` with device copies on the GPU.
    fn both(&self, what: &str, acts: &[&[u8]], f: impl Fn(*mut SikvCache, &[*const c_void]) -> SikvStatus) {
        let bufs: Vec<DeviceBuffer> = acts.iter().map(|a| upload(&self.ctx, a)).collect();
        let dev: Vec<*const c_void> = bufs.iter().map(|b| b.ptr() as *const c_void).collect();
        let host: Vec<*const c_void> = acts.iter().map(|a| a.as_ptr() as *const c_void).collect();
        ok(f(self.gc, &dev), &format!("GPU {what}"));
        ok(f(self.hc, &host), &format!("CPU {what}"));
        self.sync();
    }

    /// attend (`dense` false) or attend_dense into a device output on the GPU, a host one on the
    /// CPU.
    fn attend(&self, layer: u32, ids: &[i64], q: &[u8], dense: bool) -> (Vec<u8>, Vec<u8>) {
        let call = if dense { sikv_attend_dense } else { sikv_attend };
        let bytes = ids.len() * HQ * D * 2;
        let (dq, dout) = (upload(&self.ctx, q), poisoned(&self.ctx, bytes, 0xFF));
        let mut hout = vec![0xFFu8; bytes];
        let n = ids.len() as u32;
        let s = call(self.gc, layer, n, ids.as_ptr(), dptr(&dq), dptr(&dout), null_mut());
        ok(s, &format!("GPU attend (dense {dense}) layer {layer}"));
        let s = call(
            self.hc,
            layer,
            n,
            ids.as_ptr(),
            q.as_ptr() as *const c_void,
            hout.as_mut_ptr() as *mut c_void,
            null_mut(),
        );
        ok(s, &format!("CPU attend (dense {dense}) layer {layer}"));
        (download(&self.ctx, dout.ptr(), bytes), hout)
    }

    fn select(&self, layer: u32, ids: &[i64], q: &[u8]) {
        let rows = ids.len() * HK;
        let dq = upload(&self.ctx, q);
        let (mut gi, mut gc) = (vec![i32::MAX; rows * self.kmax], vec![i32::MAX; rows]);
        let (mut ci, mut cc) = (gi.clone(), gc.clone());
        let n = ids.len() as u32;
        let s = sikv_select(
            self.gc,
            layer,
            n,
            ids.as_ptr(),
            dptr(&dq),
            gi.as_mut_ptr(),
            gc.as_mut_ptr(),
            null_mut(),
        );
        ok(s, &format!("GPU sikv_select layer {layer}"));
        let s = sikv_select(
            self.hc,
            layer,
            n,
            ids.as_ptr(),
            q.as_ptr() as *const c_void,
            ci.as_mut_ptr(),
            cc.as_mut_ptr(),
            null_mut(),
        );
        ok(s, &format!("CPU sikv_select layer {layer}"));
        same_selection(
            &format!("managed select layer {layer} ids {ids:?}"),
            &gi,
            &gc,
            &ci,
            &cc,
            self.kmax,
        );
    }

    /// Pools byte-identical, and so the whole-cache checksums (pools + bookkeeping).
    fn check(&self, what: &str) {
        let gp = download(&self.ctx, self.dplanes.ptr(), self.info.total_plane_bytes);
        let gs = download(&self.ctx, self.dstate.ptr(), self.info.total_state_bytes);
        same_pools(&format!("{what}: plane pools"), &self.info, &gp, &self.hplanes, false);
        same_pools(&format!("{what}: state pools"), &self.info, &gs, &self.hstate, true);
        let (mut a, mut b) = (0u64, 1u64);
        ok(sikv_cache_checksum(self.gc, &mut a), "GPU checksum");
        ok(sikv_cache_checksum(self.hc, &mut b), "CPU checksum");
        assert_eq!(
            a, b,
            "{what}: checksums differ although the pools are identical (bookkeeping differs)"
        );
        let (gi, ci) = (self.cache_info(true), self.cache_info(false));
        assert_eq!(
            (gi.num_seqs, gi.free_pages),
            (ci.num_seqs, ci.free_pages),
            "{what}: sequences / free pages differ"
        );
    }
}

/// The managed layer with device activations and engine-owned device pools
/// (`sikv_cache_create_with_pools`) against a CPU cache on engine-owned host pools: calibrate,
/// a ragged append then decode appends, attend, attend_dense, select; then fork, append to the
/// fork and attend on it.
#[test]
fn managed_cache_on_engine_device_pools_matches_cpu() {
    let test = "managed_cache_on_engine_device_pools_matches_cpu";
    let Some(m) = Managed::new(test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let ids = [10i64, 11];
    let prompt = [700usize, 453];
    for (&id, &n) in ids.iter().zip(&prompt) {
        ok(sikv_seq_add(m.gc, id), "GPU seq_add");
        ok(sikv_seq_add(m.hc, id), "CPU seq_add");
        for layer in 0..2u32 {
            let k = f16(&vals(&mut rng, n * HK));
            let v = f16(&vals(&mut rng, n * HK));
            let q = f16(&vals(&mut rng, 2 * HQ));
            m.both(&format!("calibrate seq {id} layer {layer}"), &[&k, &v, &q], |c, a| {
                sikv_calibrate(c, layer, id, n as u32, a[0], a[1], 2, a[2], null_mut())
            });
        }
    }
    m.check("after calibrate");
    // A ragged chunk (5 + 2 tokens), then three decode steps (NULL n_tokens: one each).
    let chunk = [5u32, 2];
    for step in 0..4 {
        for layer in 0..2u32 {
            let total = if step == 0 { 7 } else { 2 };
            let k = f16(&vals(&mut rng, total * HK));
            let v = f16(&vals(&mut rng, total * HK));
            let counts = if step == 0 { chunk.as_ptr() } else { std::ptr::null() };
            m.both(&format!("append step {step} layer {layer}"), &[&k, &v], |c, a| {
                sikv_append(c, layer, 2, ids.as_ptr(), counts, a[0], a[1], null_mut())
            });
        }
    }
    for (&id, &n) in ids.iter().zip(&prompt) {
        let (mut a, mut b) = (0u32, 0u32);
        ok(sikv_seq_len(m.gc, id, 1, &mut a), "GPU seq_len");
        ok(sikv_seq_len(m.hc, id, 1, &mut b), "CPU seq_len");
        let want = n as u32 + if id == 10 { 5 + 3 } else { 2 + 3 };
        assert_eq!((a, b), (want, want), "seq {id}: lengths after append");
    }
    m.check("after append");
    let (mut w_att, mut w_dense) = (0f32, 0f32);
    for layer in 0..2u32 {
        let q = f16(&vals(&mut rng, 2 * HQ));
        let (g, c) = m.attend(layer, &ids, &q, false);
        w_att = w_att.max(rel_err(&format!("managed attend layer {layer}"), &g, &c));
        let (gd, cd) = m.attend(layer, &ids, &q, true);
        w_dense = w_dense.max(rel_err(&format!("managed attend_dense layer {layer}"), &gd, &cd));
        m.select(layer, &ids, &q);
    }
    // Fork 10 into 20: before anything diverges, the fork attends exactly as its source.
    ok(sikv_seq_fork(m.gc, 10, 20), "GPU fork");
    ok(sikv_seq_fork(m.hc, 10, 20), "CPU fork");
    m.check("after fork");
    let q = f16(&vals(&mut rng, HQ));
    let (src, _) = m.attend(0, &[10], &q, false);
    let (fork, c) = m.attend(0, &[20], &q, false);
    assert!(src == fork, "the fork attends differently from its source on the GPU");
    let mut w_fork = rel_err("managed attend on the fork", &fork, &c);
    // One token more on the fork only (its partly filled last page was copied, not shared).
    for layer in 0..2u32 {
        let k = f16(&vals(&mut rng, HK));
        let v = f16(&vals(&mut rng, HK));
        m.both(&format!("append to the fork, layer {layer}"), &[&k, &v], |c, a| {
            sikv_append(c, layer, 1, &20, std::ptr::null(), a[0], a[1], null_mut())
        });
    }
    m.check("after appending to the fork");
    for layer in 0..2u32 {
        let q = f16(&vals(&mut rng, 3 * HQ));
        let (g, c) = m.attend(layer, &[20, 10, 11], &q, false);
        w_fork = w_fork.max(rel_err(
            &format!("managed attend on [fork, source, other] layer {layer}"),
            &g,
            &c,
        ));
        m.select(layer, &[20, 10, 11], &q);
    }
    println!(
        "{test}: pools and checksums identical, selections identical; worst error relative to each row's max |out|: attend {w_att:.2e}, attend_dense {w_dense:.2e}, fork {w_fork:.2e}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A decode step of exported calls in one CUDA graph.

/// For 2 layers, `sikv_kernel_append` then `sikv_kernel_decode` on a non-default stream,
/// captured once into a CUDA graph and replayed 20 times. The append writes the same token to
/// the same slot every time (slot mapping, positions and page table fixed in device memory),
/// so replays are idempotent: each replay's output equals the eager run's bit for bit, and the
/// eager run equals the CPU within tolerance; the pools after the replays equal the CPU's.
#[test]
fn decode_step_of_exported_calls_replays_in_a_cuda_graph() {
    let test = "decode_step_of_exported_calls_replays_in_a_cuda_graph";
    let Some(mut p) = Pair::new(config(SIKV_DEVICE_CUDA), test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let pages = two_page_lists();
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    let slots = [1i32, 3];
    let prompt = [300usize, 157];
    calibrate_random(&mut p, &mut rng, 1, &pages[0], prompt[0], 2);
    calibrate_random(&mut p, &mut rng, 3, &pages[1], prompt[1], 2);
    let layers = 2usize;
    // Fixed device inputs of the step: one new token per sequence at position prompt[s].
    let sm: Vec<i64> = (0..2).map(|s| slot_of(pg[s], prompt[s])).collect();
    let pos: Vec<i32> = prompt.iter().map(|&n| n as i32).collect();
    let lens = [prompt[0] + 1, prompt[1] + 1];
    let (dsm, dss, dpos) = (
        upload(&p.ctx, &i64_bytes(&sm)),
        upload(&p.ctx, &i32_bytes(&slots)),
        upload(&p.ctx, &i32_bytes(&pos)),
    );
    let mut host_k = Vec::new();
    let mut host_v = Vec::new();
    let mut batches = Vec::new();
    let mut dk = Vec::new();
    let mut dv = Vec::new();
    for _ in 0..layers {
        host_k.push(f16(&vals(&mut rng, 2 * HK)));
        host_v.push(f16(&vals(&mut rng, 2 * HK)));
        dk.push(upload(&p.ctx, host_k.last().unwrap()));
        dv.push(upload(&p.ctx, host_v.last().unwrap()));
        batches.push(Batch::new(&p.ctx, &pg, &lens, &slots, f16(&vals(&mut rng, 2 * HQ))));
    }
    let out_bytes = batches[0].out_bytes();
    let eager: Vec<DeviceBuffer> = (0..layers).map(|_| poisoned(&p.ctx, out_bytes, 0xFF)).collect();
    let replayed: Vec<DeviceBuffer> = (0..layers).map(|_| poisoned(&p.ctx, out_bytes, 0xFF)).collect();
    p.sync();
    let stream = p.ctx.create_stream().expect("stream");
    let st = stream.raw;
    let dpools: Vec<SikvLayerPools> = (0..layers).map(|l| p.dpools(l)).collect();
    let hpools: Vec<SikvLayerPools> = (0..layers).map(|l| p.hpools(l)).collect();
    let (gk, ws, ws_bytes) = (p.gk, p.wsp(), p.ws_bytes);
    let tables: Vec<SikvPageTable> = batches.iter().map(|b| b.dtable()).collect();
    let step = |outs: &[DeviceBuffer]| -> selfindexkv::Result<()> {
        for l in 0..layers {
            let s = sikv_kernel_append(
                gk,
                &dpools[l],
                2,
                dptr(&dk[l]),
                dptr(&dv[l]),
                dsm.ptr() as *const i64,
                dss.ptr() as *const i32,
                dpos.ptr() as *const i32,
                st,
            );
            status_result(s, &format!("append layer {l}"))?;
            let s = sikv_kernel_decode(
                gk,
                &dpools[l],
                &tables[l],
                batches[l].dslots(),
                batches[l].dq(),
                dptr(&outs[l]),
                ws,
                ws_bytes,
                st,
            );
            status_result(s, &format!("decode layer {l}"))?;
        }
        Ok(())
    };
    step(&eager).unwrap_or_else(|e| panic!("eager step: {e}"));
    p.ctx.synchronize(st).expect("synchronize the stream");
    let want: Vec<Vec<u8>> = eager.iter().map(|b| download(&p.ctx, b.ptr(), out_bytes)).collect();
    // The same step on the CPU.
    let mut worst = 0f32;
    for l in 0..layers {
        let hp = hpools[l];
        let s = sikv_kernel_append(
            p.ck,
            &hp,
            2,
            host_k[l].as_ptr() as *const c_void,
            host_v[l].as_ptr() as *const c_void,
            sm.as_ptr(),
            slots.as_ptr(),
            pos.as_ptr(),
            null_mut(),
        );
        ok(s, "CPU append");
        let mut out = vec![0xFFu8; out_bytes];
        let b = &batches[l];
        let s = sikv_kernel_decode(
            p.ck,
            &hp,
            &b.htable(),
            b.slots.as_ptr(),
            b.q.as_ptr() as *const c_void,
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
            0,
            null_mut(),
        );
        ok(s, "CPU decode");
        worst = worst.max(rel_err(&format!("eager decode layer {l} vs CPU"), &want[l], &out));
    }
    let graph = p
        .ctx
        .capture(st, || step(&replayed))
        .unwrap_or_else(|e| panic!("capturing the step of exported calls: {e}"));
    let replays = 20;
    for r in 0..replays {
        for b in &replayed {
            p.ctx.memset_async(b.ptr(), 0xFF, out_bytes, st).expect("poison");
        }
        graph.launch(st).unwrap_or_else(|e| panic!("replay {r}: {e}"));
        p.ctx.synchronize(st).unwrap_or_else(|e| panic!("replay {r}: {e}"));
        for l in 0..layers {
            let got = download(&p.ctx, replayed[l].ptr(), out_bytes);
            if got != want[l] {
                let n = got.chunks(2).zip(want[l].chunks(2)).filter(|(a, b)| a != b).count();
                panic!(
                    "replay {r} layer {l}: {n} of {} outputs differ from the eager run",
                    out_bytes / 2
                );
            }
        }
    }
    drop(graph);
    p.check_pools(&format!("after the eager step and {replays} replays"));
    println!(
        "{test}: {replays} replays bit-identical to the eager step; eager vs CPU worst error {worst:.2e} (relative to each row's max |out|)"
    );
}

/// Determinism over a long run: one decode step of exported calls captured once, then 10,000
/// steps, each with a fresh query written into the graph's input buffer, each run eagerly and
/// from the graph: outputs bit-identical at every step (SIKV_GPU_TEST_QUICK=1: 200 steps).
#[test]
fn ten_thousand_graph_steps_with_fresh_queries_match_eager() {
    let test = "ten_thousand_graph_steps_with_fresh_queries_match_eager";
    let Some(mut p) = Pair::new(config(SIKV_DEVICE_CUDA), test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let pages = two_page_lists();
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    let slots = [0i32, 2];
    let lens = [700usize, 431];
    calibrate_random(&mut p, &mut rng, 0, &pages[0], lens[0], 2);
    calibrate_random(&mut p, &mut rng, 2, &pages[1], lens[1], 2);
    let batch = Batch::new(&p.ctx, &pg, &lens, &slots, f16(&vals(&mut rng, 2 * HQ)));
    let out_bytes = batch.out_bytes();
    let (eager, replayed) = (poisoned(&p.ctx, out_bytes, 0xFF), poisoned(&p.ctx, out_bytes, 0xFF));
    p.sync();
    let stream = p.ctx.create_stream().expect("stream");
    let st = stream.raw;
    let dpools = p.dpools(0);
    let table = batch.dtable();
    let (gk, ws, ws_bytes) = (p.gk, p.wsp(), p.ws_bytes);
    let decode = |out: &DeviceBuffer| {
        let s = sikv_kernel_decode(
            gk,
            &dpools,
            &table,
            batch.dslots(),
            batch.dq(),
            dptr(out),
            ws,
            ws_bytes,
            st,
        );
        status_result(s, "decode")
    };
    let graph = p
        .ctx
        .capture(st, || decode(&replayed))
        .unwrap_or_else(|e| panic!("capturing the decode step: {e}"));
    let steps = if std::env::var("SIKV_GPU_TEST_QUICK").map(|v| v == "1").unwrap_or(false) {
        200
    } else {
        10_000
    };
    let mut distinct = std::collections::HashSet::new();
    for step in 0..steps {
        let q = f16(&vals(&mut rng, 2 * HQ));
        p.ctx.copy_htod_async(batch.dev[4].ptr(), &q, st).expect("new query");
        decode(&eager).unwrap_or_else(|e| panic!("eager step {step}: {e}"));
        graph.launch(st).unwrap_or_else(|e| panic!("replay {step}: {e}"));
        p.ctx.synchronize(st).unwrap_or_else(|e| panic!("step {step}: {e}"));
        let (want, got) = (
            download(&p.ctx, eager.ptr(), out_bytes),
            download(&p.ctx, replayed.ptr(), out_bytes),
        );
        if got != want {
            let n = got.chunks(2).zip(want.chunks(2)).filter(|(a, b)| a != b).count();
            panic!(
                "step {step}: {n} of {} outputs differ between the graph and the eager run",
                out_bytes / 2
            );
        }
        distinct.insert(want);
    }
    drop(graph);
    // Fresh queries must give fresh outputs, or the comparison above proves little.
    assert_eq!(
        distinct.len(),
        steps,
        "some steps gave the same output for different queries"
    );
    p.check_pools(&format!("after {steps} eager and {steps} graph steps"));
    println!("{test}: {steps} steps, graph replay bit-identical to eager at every step, {steps} distinct outputs");
}

// ---------------------------------------------------------------------------------------------
// 4. Claims.

/// (a) With `dense_crossover >= batch * max_seq_len`, `sikv_kernel_decode` runs the dense decode: on
/// the GPU its output equals `sikv_kernel_attend_dense` bit for bit (and the CPU decode within
/// tolerance), while a handle without the crossover gives a different (sparse) output for the
/// same input, so the equality is not vacuous.
#[test]
fn decode_takes_the_dense_crossover_on_gpu() {
    let test = "decode_takes_the_dense_crossover_on_gpu";
    let mut c = config(SIKV_DEVICE_CUDA);
    c.dense_crossover = c.max_batch * c.max_seq_len;
    let Some(mut p) = Pair::new(c, test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let (pages, slots, lens) = two_decoding_sequences(&mut p, &mut rng);
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    let sparse = kernels_without_crossover(&c);
    let mut worst = 0f32;
    for layer in 0..2 {
        let b = Batch::new(&p.ctx, &pg, &lens, &slots, f16(&vals(&mut rng, 2 * HQ)));
        let (gx, cx) = p.dense_or_decode(layer, &b, false);
        let (gd, cd) = p.dense_or_decode(layer, &b, true);
        assert!(
            gx == gd,
            "layer {layer}: GPU decode with the crossover differs from attend_dense"
        );
        assert!(
            cx == cd,
            "layer {layer}: CPU decode with the crossover differs from attend_dense"
        );
        worst = worst.max(rel_err(&format!("layer {layer} decode (crossover)"), &gx, &cx));
        let gs = p.gpu_decode_with(sparse, layer, &b);
        assert!(
            gs != gd,
            "layer {layer}: the sparse decode equals the dense one bit for bit; the crossover check proves nothing"
        );
    }
    sikv_kernels_destroy(sparse);
    println!("{test}: decode == attend_dense bit for bit on the GPU; vs CPU worst error {worst:.2e}");
}

/// (a') The crossover follows the live lengths where `batch * max_seq_len` does not settle it:
/// with `dense_crossover` between the batch's tokens now and after some appends, decode is the
/// dense decode now (bit for bit, GPU; the CPU decode likewise) and the sparse decode (a
/// handle without the crossover) after the appends. One captured graph of the decode gives
/// both: replayed over the first page table, then over the grown one written into the same
/// buffers.
#[test]
fn decode_crossover_follows_live_lengths_on_gpu() {
    let test = "decode_crossover_follows_live_lengths_on_gpu";
    let mut c = config(SIKV_DEVICE_CUDA);
    // 701 + 454 tokens now, 1001 + 754 after the appends; 2 x 2048 declared.
    c.dense_crossover = 1400;
    let Some(mut p) = Pair::new(c, test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let (pages, slots, mut lens) = two_decoding_sequences(&mut p, &mut rng);
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    let grown = [lens[0] + 300, lens[1] + 300];
    let sparse = kernels_without_crossover(&c);
    let q = f16(&vals(&mut rng, 2 * HQ));
    let now = Batch::new(&p.ctx, &pg, &lens, &slots, q.clone());
    // The graph's table buffers are sized for the grown table and hold the current one first.
    let table = Batch::new(&p.ctx, &pg, &grown, &slots, q.clone());
    let write_table = |p: &Pair, b: &Batch| {
        p.ctx
            .copy_htod_async(table.dev[0].ptr(), &i32_bytes(&b.indptr), null_mut())
            .expect("indptr");
        p.ctx
            .copy_htod_async(table.dev[1].ptr(), &i32_bytes(&b.indices), null_mut())
            .expect("indices");
        p.ctx
            .copy_htod_async(table.dev[2].ptr(), &i32_bytes(&b.last), null_mut())
            .expect("last_page_len");
        p.ctx.synchronize(null_mut()).expect("synchronize");
    };
    write_table(&p, &now);
    let replayed = poisoned(&p.ctx, now.out_bytes(), 0xFF);
    let stream = p.ctx.create_stream().expect("stream");
    let st = stream.raw;
    let (dpools, dtable) = (p.dpools(0), table.dtable());
    let (gk, ws, ws_bytes) = (p.gk, p.wsp(), p.ws_bytes);
    let graph = p
        .ctx
        .capture(st, || {
            let s = sikv_kernel_decode(
                gk,
                &dpools,
                &dtable,
                table.dslots(),
                table.dq(),
                dptr(&replayed),
                ws,
                ws_bytes,
                st,
            );
            status_result(s, "decode")
        })
        .unwrap_or_else(|e| panic!("capturing the decode step: {e}"));
    let replay = |p: &Pair, what: &str| {
        graph.launch(st).unwrap_or_else(|e| panic!("replay {what}: {e}"));
        p.ctx.synchronize(st).unwrap_or_else(|e| panic!("replay {what}: {e}"));
        download(&p.ctx, replayed.ptr(), now.out_bytes())
    };

    // Now: 1155 tokens <= 1400, the dense decode.
    let (gx, cx) = p.dense_or_decode(0, &now, false);
    let (gd, cd) = p.dense_or_decode(0, &now, true);
    assert!(
        gx == gd,
        "{} tokens: GPU decode differs from attend_dense",
        lens[0] + lens[1]
    );
    assert!(
        cx == cd,
        "{} tokens: CPU decode differs from attend_dense",
        lens[0] + lens[1]
    );
    assert!(replay(&p, "now") == gd, "the graph's decode differs from attend_dense");
    let gs = p.gpu_decode_with(sparse, 0, &now);
    assert!(
        gs != gd,
        "the sparse decode equals the dense one bit for bit: the check proves nothing"
    );
    let worst_now = rel_err("decode (dense route)", &gx, &cx);

    // After the appends: 1755 tokens > 1400, the sparse decode.
    append_random(&mut p, &mut rng, &pg, &slots, &mut lens, &[300, 300]);
    assert_eq!(lens, grown);
    let after = Batch::new(&p.ctx, &pg, &lens, &slots, q);
    write_table(&p, &after);
    let (gx, cx) = p.dense_or_decode(0, &after, false);
    let (gd, _) = p.dense_or_decode(0, &after, true);
    let gs = p.gpu_decode_with(sparse, 0, &after);
    assert!(
        gx == gs,
        "{} tokens: GPU decode differs from the sparse decode",
        lens[0] + lens[1]
    );
    assert!(
        gx != gd,
        "{} tokens: GPU decode still equals attend_dense",
        lens[0] + lens[1]
    );
    assert!(
        replay(&p, "after the appends") == gs,
        "the graph's decode differs from the sparse decode"
    );
    let worst_after = rel_err("decode (sparse route)", &gx, &cx);
    drop(graph);
    sikv_kernels_destroy(sparse);
    println!(
        "{test}: 1155 tokens dense, 1755 sparse, eager and from one graph; vs CPU worst {worst_now:.2e} / {worst_after:.2e}"
    );
}

/// (b) Ties go to the smaller position on the GPU as on the CPU. Every token after the prompt
/// has the same key (per KV head; distinct values), so every candidate scores the same in both
/// selection stages. The prompt is all sinks (n_sink = prompt length: a healthy calibration
/// on random keys, and no prompt token among the candidates), heavy is empty (its range is
/// empty), budget_ratio 0 fixes k = budget_min = budget_max = 64, and more than
/// rerank_factor * k candidates make both the 1-bit scan and the re-rank break ties. The
/// selection must be the first 64 candidates, positions n_sink..n_sink + 64, on both devices.
#[test]
fn selection_ties_go_to_the_smaller_position_on_gpu() {
    let test = "selection_ties_go_to_the_smaller_position_on_gpu";
    let mut c = config(SIKV_DEVICE_CUDA);
    let sink = 128usize;
    c.n_sink = sink as u32;
    c.budget_ratio = 0.0;
    c.budget_min = 64;
    c.budget_max = 64;
    let Some(mut p) = Pair::new(c, test) else {
        return;
    };
    assert!(c.rerank_factor >= 2, "the profile's re-rank stage is expected here");
    let mut rng = Rng::new(test);
    let pages = two_page_lists();
    let pg: [&[i32]; 2] = [&pages[0], &pages[1]];
    let slots = [3i32, 1];
    calibrate_random(&mut p, &mut rng, 3, &pages[0], sink, 1);
    calibrate_random(&mut p, &mut rng, 1, &pages[1], sink, 1);
    // 500 and 377 tokens after the prompt: candidates [128, len - 64) = 436 and 313 > 4 * 64.
    let counts = [500usize, 377];
    let mut lens = [sink, sink];
    let total: usize = counts.iter().sum();
    let mut sm = Vec::new();
    let mut ss = Vec::new();
    let mut pos = Vec::new();
    for s in 0..2 {
        for t in 0..counts[s] {
            sm.push(slot_of(pg[s], sink + t));
            ss.push(slots[s]);
            pos.push((sink + t) as i32);
        }
    }
    for layer in 0..2 {
        let key: Vec<f32> = vals(&mut rng, HK);
        let k: Vec<f32> = (0..total).flat_map(|_| key.iter().copied()).collect();
        let v = f16(&vals(&mut rng, total * HK));
        p.append(layer, &f16(&k), &v, &sm, &ss, &pos);
    }
    lens[0] += counts[0];
    lens[1] += counts[1];
    p.check_pools("after appending the tied tokens");
    let want: Vec<i32> = (sink as i32..sink as i32 + 64).collect();
    for layer in 0..2 {
        let b = Batch::new(&p.ctx, &pg, &lens, &slots, f16(&vals(&mut rng, 2 * HQ)));
        let sel = p.select(layer, &b);
        same_selection(
            &format!("layer {layer} tied select"),
            &sel.gi,
            &sel.gc,
            &sel.ci,
            &sel.cc,
            64,
        );
        for row in 0..2 * HK {
            assert_eq!(sel.gc[row], 64, "layer {layer} row {row}: count");
            assert_eq!(
                &sel.gi[row * 64..(row + 1) * 64],
                &want[..],
                "layer {layer} row {row}: tied candidates must be taken from the smallest position up"
            );
        }
    }
    println!(
        "{test}: GPU == CPU selection, positions {sink}..{} in every row",
        sink + 64
    );
}

/// The parent's half of (c): a sticky CUDA error through a real exported call poisons the
/// handle. It breaks the CUDA context of the whole process, so `poison_child` runs it in a
/// child process (this test binary, re-executed); the parent checks the lines it prints.
#[test]
fn sticky_cuda_error_poisons_the_handle() {
    let test = "sticky_cuda_error_poisons_the_handle";
    // Only the device check: nothing else touches the GPU in this process for this test.
    let c = config(SIKV_DEVICE_CUDA);
    let mut k: *mut SikvKernels = null_mut();
    match sikv_kernels_create(&c, &mut k) {
        S::SIKV_OK => sikv_kernels_destroy(k),
        S::SIKV_ERR_NO_DEVICE => return common::skip_no_cuda_device(test),
        s => panic!("sikv_kernels_create: {s:?}: {}", last_error_message()),
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "poison_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SIKV_POISON_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the child");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let read_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let read_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    // A hung child (a driver that never reports the fault) is a failure, not a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the child") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stdout = read_out.join().unwrap();
    let stderr = read_err.join().unwrap();
    // Prefixed, so that log scanners counting libtest's own lines do not count the child's.
    for line in stdout.lines() {
        println!("child stdout| {line}");
    }
    for line in stderr.lines() {
        println!("child stderr| {line}");
    }
    let status = status.expect("the child ran for more than 180 s and was killed");
    // Lines "POISON_CHILD <key> status=<n> cuda=<n> msg=<text>".
    // (Searched inside lines: libtest may print `test poison_child ... ` before the first.)
    let field = |key: &str, name: &str| -> Option<String> {
        let tag = format!("POISON_CHILD {key} ");
        let line = stdout.lines().find_map(|l| l.find(&tag).map(|at| &l[at..]))?;
        let rest = line.split(&format!(" {name}=")).nth(1)?;
        Some(if name == "msg" {
            rest.to_string()
        } else {
            rest.split(' ').next().unwrap_or("").to_string()
        })
    };
    let num = |key: &str, name: &str| -> i32 {
        field(key, name)
            .unwrap_or_else(|| panic!("child printed no `{key}` line with {name}="))
            .parse()
            .unwrap_or_else(|_| panic!("child's `{key}` {name} is not a number"))
    };
    assert_eq!(
        num("setup", "status"),
        0,
        "child setup failed: {:?}",
        field("setup", "msg")
    );
    assert!(
        !stdout.contains("POISON_CHILD nofault"),
        "no unallocated q address made the kernel fault (see the child's `try` lines)"
    );
    let (ok_, cuda, poisoned_) = (S::SIKV_OK as i32, S::SIKV_ERR_CUDA as i32, S::SIKV_ERR_POISONED as i32);
    assert_eq!(
        num("sync", "cuda"),
        700,
        "synchronising after the call on an unmapped q did not report CUDA_ERROR_ILLEGAL_ADDRESS (700): the kernel did not fault as planned"
    );
    let s1 = num("call1", "status");
    assert!(
        s1 == ok_ || s1 == cuda,
        "the faulting call returned {s1}, not OK (queued) or SIKV_ERR_CUDA"
    );
    // The first call that reports the fault: the faulting one, or the next.
    let first = if s1 == cuda { "call1" } else { "call2" };
    assert_eq!(num(first, "status"), cuda, "{first} did not return SIKV_ERR_CUDA");
    assert_eq!(
        num(first, "cuda"),
        700,
        "{first}: sikv_last_error_cuda_code() is not 700"
    );
    let msg = field(first, "msg").unwrap_or_default();
    assert!(
        msg.contains("ILLEGAL_ADDRESS"),
        "{first}: the message does not name CUDA_ERROR_ILLEGAL_ADDRESS: {msg}"
    );
    let later: &[&str] = if s1 == cuda {
        &["call2", "call3", "call4"]
    } else {
        &["call3", "call4"]
    };
    for key in later {
        assert_eq!(
            num(key, "status"),
            poisoned_,
            "{key} after the sticky error did not return SIKV_ERR_POISONED"
        );
    }
    assert!(
        stdout.contains("POISON_CHILD destroyed"),
        "the child did not get past destroying the poisoned handle"
    );
    assert!(status.success(), "the child exited with {status}");
    println!("{test}: sticky error reported by {first} as SIKV_ERR_CUDA / 700, later calls SIKV_ERR_POISONED");
}

/// The child's half of (c); returns at once unless `SIKV_POISON_CHILD=1` (set by
/// `sticky_cuda_error_poisons_the_handle`, which asserts on the lines printed here). Calls
/// `sikv_kernel_attend_dense` on a calibrated sequence with a `q` that is 16-byte aligned but
/// not allocated, so the kernel faults with an illegal address; then a valid call, another, and
/// `sikv_workspace_size`, printing each status.
#[test]
#[ignore = "the child half of sticky_cuda_error_poisons_the_handle, which runs it in its own process"]
fn poison_child() {
    if std::env::var("SIKV_POISON_CHILD").as_deref() != Ok("1") {
        return;
    }
    let report = |key: &str, s: SikvStatus| {
        let (code, msg) = if s == S::SIKV_OK {
            (0, String::new())
        } else {
            (sikv_last_error_cuda_code(), last_error_message().replace('\n', " "))
        };
        println!("POISON_CHILD {key} status={} cuda={code} msg={msg}", s as i32);
    };
    let Some(mut p) = Pair::new(config(SIKV_DEVICE_CUDA), "poison_child") else {
        report("setup", S::SIKV_ERR_NO_DEVICE);
        return;
    };
    let mut rng = Rng::new("poison_child");
    let pages = two_page_lists();
    calibrate_random(&mut p, &mut rng, 0, &pages[0], 300, 1);
    let b = Batch::new(&p.ctx, &[&pages[0]], &[300], &[0], f16(&vals(&mut rng, HQ)));
    let out = poisoned(&p.ctx, b.out_bytes(), 0xFF);
    p.sync();
    report("setup", S::SIKV_OK);
    let dp = p.dpools(0);
    let call = |q: *const c_void| {
        sikv_kernel_attend_dense(
            p.gk,
            &dp,
            &b.dtable(),
            b.dslots(),
            q,
            dptr(&out),
            p.wsp(),
            p.ws_bytes,
            null_mut(),
        )
    };
    // 16-byte aligned addresses that nothing should map: one in the gap between the heap and
    // the mmap area of a 47-bit address space, one at 64 GiB. Where the driver reserves its
    // ranges is its own business, so the second is tried only if the first did not fault.
    let mut faulted = false;
    for addr in [0x6000_0000_0000u64, 0x10_0000_0000] {
        let s = call(addr as *const c_void);
        let (code, msg) = (sikv_last_error_cuda_code(), last_error_message().replace('\n', " "));
        let sync = p.ctx.synchronize(null_mut());
        println!(
            "POISON_CHILD try addr={addr:#x} status={} sync={}",
            s as i32,
            sync.as_ref().map(|_| 0).unwrap_or_else(|e| e.cuda_code)
        );
        if s == S::SIKV_OK && sync.is_ok() {
            continue;
        }
        if s == S::SIKV_OK {
            report("call1", s);
        } else {
            println!("POISON_CHILD call1 status={} cuda={code} msg={msg}", s as i32);
        }
        println!(
            "POISON_CHILD sync status={} cuda={} msg={}",
            sync.as_ref().map(|_| 0).unwrap_or_else(|e| e.status as i32),
            sync.as_ref().map(|_| 0).unwrap_or_else(|e| e.cuda_code),
            sync.as_ref()
                .map(|_| String::new())
                .unwrap_or_else(|e| e.message.clone())
        );
        faulted = true;
        break;
    }
    if !faulted {
        println!("POISON_CHILD nofault");
        return;
    }
    report("call2", call(b.dq()));
    report("call3", call(b.dq()));
    let mut ws = 0usize;
    report("call4", sikv_workspace_size(p.gk, 1, &mut ws));
    // The contract for a poisoned handle: destroy it.
    sikv_kernels_destroy(p.gk);
    p.gk = null_mut();
    println!("POISON_CHILD destroyed");
    // The context is broken: the buffers' frees fail (ignored) as the process ends.
}

/// (d) The fault word: an engine's sequence slot outside 0..max_seqs in device memory cannot
/// be seen by the host, so the GPU select returns OK, skips the row and raises a fault that the
/// NEXT call on the handle reports as SIKV_ERR_OUT_OF_BOUNDS naming the sequence slot; the call
/// after that is clean again. The CPU device refuses the same input at once.
#[test]
fn device_fault_word_reports_a_bad_sequence_slot_on_the_next_call() {
    let test = "device_fault_word_reports_a_bad_sequence_slot_on_the_next_call";
    let Some(mut p) = Pair::new(config(SIKV_DEVICE_CUDA), test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let pages = two_page_lists();
    calibrate_random(&mut p, &mut rng, 0, &pages[0], 300, 1);
    let q = f16(&vals(&mut rng, HQ));
    let max_seqs = p.c.max_seqs as i32;
    let bad = Batch::new(&p.ctx, &[&pages[0]], &[300], &[max_seqs], q.clone());
    let good = Batch::new(&p.ctx, &[&pages[0]], &[300], &[0], q);
    let kmax = p.kmax();
    let didx = poisoned(&p.ctx, 4 * HK * kmax, 0x7F);
    let dcnt = poisoned(&p.ctx, 4 * HK, 0x7F);
    let dp = p.dpools(0);
    let gpu_select = |b: &Batch| {
        sikv_kernel_select(
            p.gk,
            &dp,
            &b.dtable(),
            b.dslots(),
            b.dq(),
            didx.ptr() as *mut i32,
            dcnt.ptr() as *mut i32,
            p.wsp(),
            p.ws_bytes,
            null_mut(),
        )
    };
    let s = gpu_select(&bad);
    assert_eq!(
        s,
        S::SIKV_OK,
        "GPU select with the bad slot in device memory: the host cannot see it, yet: {}",
        last_error_message()
    );
    // The fault is reported by a call made after the faulting kernel completed.
    p.sync();
    let s = gpu_select(&good);
    let msg = last_error_message();
    assert_eq!(
        s,
        S::SIKV_ERR_OUT_OF_BOUNDS,
        "the call after the bad slot did not report the device fault: {msg}"
    );
    assert!(
        msg.contains("sequence slot outside 0..max_seqs"),
        "the fault message does not name the sequence slot: {msg}"
    );
    p.sync();
    ok(gpu_select(&good), "GPU select after the fault was reported");
    let gi = i32s(&download(&p.ctx, didx.ptr(), 4 * HK * kmax));
    let gc = i32s(&download(&p.ctx, dcnt.ptr(), 4 * HK));
    // The CPU: refused at once, with the slot named; then the good call.
    let hp = p.hpools(0);
    let (mut ci, mut cc) = (vec![i32::MAX; HK * kmax], vec![i32::MAX; HK]);
    let cpu_select = |b: &Batch, ci: &mut [i32], cc: &mut [i32]| {
        sikv_kernel_select(
            p.ck,
            &hp,
            &b.htable(),
            b.slots.as_ptr(),
            b.q.as_ptr() as *const c_void,
            ci.as_mut_ptr(),
            cc.as_mut_ptr(),
            null_mut(),
            0,
            null_mut(),
        )
    };
    let s = cpu_select(&bad, &mut ci, &mut cc);
    let msg = last_error_message();
    assert_eq!(s, S::SIKV_ERR_OUT_OF_BOUNDS, "CPU select with the bad slot: {msg}");
    assert!(
        msg.contains(&format!("seq_slot[0] = {max_seqs}")) && msg.contains("max_seqs"),
        "the CPU message does not name the slot: {msg}"
    );
    ok(cpu_select(&good, &mut ci, &mut cc), "CPU select with the good slot");
    same_selection("select after the fault", &gi, &gc, &ci, &cc, kmax);
    // A slot the host can see is refused at once on both devices.
    for (k, pools, dev) in [(p.gk, p.dpools(0), "GPU"), (p.ck, hp, "CPU")] {
        let s = sikv_kernel_reset_slot(k, &pools, max_seqs as u32, null_mut());
        assert_eq!(s, S::SIKV_ERR_OUT_OF_BOUNDS, "{dev} reset_slot of slot {max_seqs}");
    }
    println!("{test}: GPU reported the bad slot on the next call, the CPU at once");
}

/// (e) A stage error after the pages were taken releases them: free pages and the whole-cache
/// checksum are unchanged, and a correct retry then takes the pages. On the GPU (C ABI, cache
/// pools from the library) the stage fails on a device `k` that is not 16-byte aligned, which
/// only the launcher checks; on the CPU (no exported call fails inside the stage there: the
/// host slices are sized by the call) through the crate API with a host `k` that is too short.
#[test]
fn stage_error_releases_the_pages() {
    let test = "stage_error_releases_the_pages";
    let c = config(SIKV_DEVICE_CUDA);
    let cfg = CacheConfig::from_c(&c).expect("config");
    let ctx = match GpuContext::new(&cfg, &Layout::new(&cfg)) {
        Ok(x) => x,
        Err(e) if e.status == S::SIKV_ERR_NO_DEVICE => return common::skip_no_cuda_device(test),
        Err(e) => panic!("GPU context: {e}"),
    };
    let mut rng = Rng::new(test);
    let (n, add) = (300usize, 40usize);
    let pages_after_append = (n + add).div_ceil(P) - n.div_ceil(P);
    assert!(pages_after_append >= 2, "the append must need fresh pages");

    // GPU, through the C ABI.
    let mut gc: *mut SikvCache = null_mut();
    ok(sikv_cache_create(&c, &mut gc), "sikv_cache_create (GPU)");
    ok(sikv_seq_add(gc, 7), "seq_add");
    let up = |x: &[f32]| upload(&ctx, &f16(x));
    let (k, v, q) = (
        up(&vals(&mut rng, n * HK)),
        up(&vals(&mut rng, n * HK)),
        up(&vals(&mut rng, HQ)),
    );
    // The first calibrate of a sequence takes its pages (the later layers reuse them).
    let fresh = pool_state(gc);
    let skewed = (k.ptr() + 2) as *const c_void;
    let s = sikv_calibrate(gc, 0, 7, n as u32, skewed, dptr(&v), 1, dptr(&q), null_mut());
    assert_eq!(
        s,
        S::SIKV_ERR_MISALIGNED,
        "GPU calibrate with a skewed k: {}",
        last_error_message()
    );
    assert_eq!(
        pool_state(gc),
        fresh,
        "GPU: the failed calibrate changed free pages or the cache"
    );
    let mut len = 9u32;
    ok(sikv_seq_len(gc, 7, 0, &mut len), "seq_len");
    assert_eq!(len, 0, "GPU: the failed calibrate left tokens");
    for layer in 0..2 {
        ok(
            sikv_calibrate(gc, layer, 7, n as u32, dptr(&k), dptr(&v), 1, dptr(&q), null_mut()),
            "GPU calibrate retried",
        );
    }
    assert_eq!(
        pool_state(gc).0 as usize,
        fresh.0 as usize - n.div_ceil(P),
        "GPU: the retried calibrate took an unexpected number of pages"
    );
    let before = pool_state(gc);
    let (k2, v2) = (up(&vals(&mut rng, add * HK)), up(&vals(&mut rng, add * HK)));
    let s = sikv_append(
        gc,
        0,
        1,
        &7,
        &(add as u32),
        (k2.ptr() + 2) as *const c_void,
        dptr(&v2),
        null_mut(),
    );
    assert_eq!(
        s,
        S::SIKV_ERR_MISALIGNED,
        "GPU append with a skewed k: {}",
        last_error_message()
    );
    assert_eq!(
        pool_state(gc),
        before,
        "GPU: the failed append changed free pages or the cache"
    );
    ok(
        sikv_append(gc, 0, 1, &7, &(add as u32), dptr(&k2), dptr(&v2), null_mut()),
        "GPU append retried",
    );
    assert_eq!(
        pool_state(gc).0 as usize,
        before.0 as usize - pages_after_append,
        "GPU: the retried append took an unexpected number of pages"
    );
    ctx.synchronize(null_mut()).expect("synchronize");
    sikv_cache_destroy(gc);

    // CPU, through the crate API.
    let mut cc = c;
    cc.device = SIKV_DEVICE_CPU;
    let mut cache = Cache::new(CacheConfig::from_c(&cc).unwrap()).expect("CPU cache");
    let snap = |c: &Cache| (c.stats().free_pages, c.checksum().expect("checksum"));
    let null = null_mut();
    cache.add_seq(7).unwrap();
    let (k, v, q) = (
        f16(&vals(&mut rng, n * HK)),
        f16(&vals(&mut rng, n * HK)),
        f16(&vals(&mut rng, HQ)),
    );
    let h = Activations::Host;
    let fresh = snap(&cache);
    let e = cache
        .calibrate(0, 7, n as u32, h(&k[..k.len() - 2]), h(&v), 1, h(&q), null)
        .expect_err("CPU calibrate with a short k");
    assert_eq!(e.status, S::SIKV_ERR_BUFFER_TOO_SMALL, "{e}");
    assert_eq!(
        snap(&cache),
        fresh,
        "CPU: the failed calibrate changed free pages or the cache"
    );
    assert_eq!(cache.seq_len(7, 0).unwrap(), 0, "CPU: the failed calibrate left tokens");
    for layer in 0..2 {
        cache
            .calibrate(layer, 7, n as u32, h(&k), h(&v), 1, h(&q), null)
            .expect("CPU calibrate retried");
    }
    assert_eq!(
        cache.stats().free_pages as usize,
        fresh.0 as usize - n.div_ceil(P),
        "CPU: the retried calibrate took an unexpected number of pages"
    );
    let before = snap(&cache);
    let (k2, v2) = (f16(&vals(&mut rng, add * HK)), f16(&vals(&mut rng, add * HK)));
    let e = cache
        .append(0, &[7], &[add as u32], h(&k2[..k2.len() - 2]), h(&v2), null)
        .expect_err("CPU append with a short k");
    assert_eq!(e.status, S::SIKV_ERR_BUFFER_TOO_SMALL, "{e}");
    assert_eq!(
        snap(&cache),
        before,
        "CPU: the failed append changed free pages or the cache"
    );
    cache
        .append(0, &[7], &[add as u32], h(&k2), h(&v2), null)
        .expect("CPU append retried");
    assert_eq!(
        cache.stats().free_pages as usize,
        before.0 as usize - pages_after_append,
        "CPU: the retried append took an unexpected number of pages"
    );
    println!("{test}: failed stage calls left free pages and checksums unchanged on the GPU and the CPU");
}

/// Engine-owned device tables that are wrong in ways only the device can see: page ids outside
/// the pool (past the end and negative), a negative sequence slot, a sequence longer than
/// max_seq_len, and appends whose slot mapping lies past the pool or whose position is past
/// max_seq_len. Every call is accepted (the host cannot read device memory), the kernels stay
/// inside the pools (the GPU check runs this test under compute-sanitizer memcheck), and the
/// next call reports SIKV_ERR_OUT_OF_BOUNDS; the pools are unchanged by the refused appends.
#[test]
fn adversarial_device_tables_stay_inside_the_pools() {
    let test = "adversarial_device_tables_stay_inside_the_pools";
    let Some(mut p) = Pair::new(config(SIKV_DEVICE_CUDA), test) else {
        return;
    };
    let mut rng = Rng::new(test);
    let pages = two_page_lists();
    calibrate_random(&mut p, &mut rng, 0, &pages[0], 300, 1);
    let num_pages = p.info.num_pages as i32;
    let q = f16(&vals(&mut rng, HQ));
    let good = Batch::new(&p.ctx, &[&pages[0]], &[300], &[0], q.clone());
    let mut past_end = pages[0].clone();
    past_end[3] = num_pages + 5;
    let mut negative = pages[0].clone();
    negative[0] = -7;
    let too_long_len = p.c.max_seq_len as usize + 3 * P;
    let too_long_pages: Vec<i32> = (0..too_long_len.div_ceil(P)).map(|i| pages[0][i % 10]).collect();
    let cases: Vec<(&str, Batch, &str)> = vec![
        (
            "page id past the pool",
            Batch::new(&p.ctx, &[&past_end], &[300], &[0], q.clone()),
            "page index outside the pool",
        ),
        (
            "negative page id",
            Batch::new(&p.ctx, &[&negative], &[300], &[0], q.clone()),
            "page index outside the pool",
        ),
        (
            "negative sequence slot",
            Batch::new(&p.ctx, &[&pages[0]], &[300], &[-1], q.clone()),
            "sequence slot",
        ),
        (
            "sequence longer than max_seq_len",
            Batch::new(&p.ctx, &[&too_long_pages], &[too_long_len], &[0], q.clone()),
            "longer than max_seq_len",
        ),
    ];
    let dout = poisoned(&p.ctx, good.out_bytes(), 0xFF);
    let dp = p.dpools(0);
    let decode = |b: &Batch| {
        sikv_kernel_decode(
            p.gk,
            &dp,
            &b.dtable(),
            b.dslots(),
            b.dq(),
            dptr(&dout),
            p.wsp(),
            p.ws_bytes,
            null_mut(),
        )
    };
    // After a call the device refused work items of: the next (good) call reports the fault,
    // naming the failed check. Returns the message.
    let reported_next = |what: &str, names: &str| -> String {
        p.sync();
        let s = decode(&good);
        let msg = last_error_message();
        assert_eq!(
            s,
            S::SIKV_ERR_OUT_OF_BOUNDS,
            "{what}: the next call did not report the fault: {msg}"
        );
        assert!(
            msg.contains(names),
            "{what}: the fault message does not name the check ({names}): {msg}"
        );
        p.sync();
        msg
    };
    for (what, bad, names) in &cases {
        assert_eq!(
            decode(bad),
            S::SIKV_OK,
            "{what}: the host cannot see it yet: {}",
            last_error_message()
        );
        let msg = reported_next(what, names);
        ok(decode(&good), &format!("{what}: the call after the report"));
        p.sync();
        println!("{test}: {what}: reported on the next call ({msg})");
    }
    // Appends the device must refuse token by token, leaving the pools as they were.
    let before = download(&p.ctx, p.dplanes.ptr(), p.info.total_plane_bytes);
    let state_before = download(&p.ctx, p.dstate.ptr(), p.info.total_state_bytes);
    let k = upload(&p.ctx, &f16(&vals(&mut rng, HK)));
    let v = upload(&p.ctx, &f16(&vals(&mut rng, HK)));
    let pool_slots = num_pages as i64 * P as i64;
    let appends: [(&str, i64, i32, i32, &str); 3] = [
        ("slot mapping past the pool", pool_slots + 3, 0, 300, "slot_mapping"),
        (
            "position past max_seq_len",
            slot_of(&pages[0], 300),
            0,
            p.c.max_seq_len as i32 + 1,
            "append position",
        ),
        (
            "negative sequence slot",
            slot_of(&pages[0], 300),
            -2,
            300,
            "sequence slot",
        ),
    ];
    for (what, sm, slot, pos, names) in appends {
        let (dsm, dss, dpos) = (
            upload(&p.ctx, &i64_bytes(&[sm])),
            upload(&p.ctx, &i32_bytes(&[slot])),
            upload(&p.ctx, &i32_bytes(&[pos])),
        );
        let s = sikv_kernel_append(
            p.gk,
            &dp,
            1,
            dptr(&k),
            dptr(&v),
            dsm.ptr() as *const i64,
            dss.ptr() as *const i32,
            dpos.ptr() as *const i32,
            null_mut(),
        );
        assert_eq!(
            s,
            S::SIKV_OK,
            "append, {what}: the host cannot see it yet: {}",
            last_error_message()
        );
        let msg = reported_next(&format!("append, {what}"), names);
        println!("{test}: append, {what}: reported on the next call ({msg})");
    }
    assert!(
        download(&p.ctx, p.dplanes.ptr(), p.info.total_plane_bytes) == before,
        "a refused append changed the plane pool"
    );
    assert!(
        download(&p.ctx, p.dstate.ptr(), p.info.total_state_bytes) == state_before,
        "a refused append changed the state pool"
    );
}

/// An injected CUDA error inside a call (test hook `gpu::testing::inject_launch_error`: the
/// call's first kernel launch fails as if the driver had returned the code). A non-sticky error
/// gives SIKV_ERR_CUDA with the driver's code and leaves the cache as it was (checksum, free
/// pages, length) and usable; a sticky one poisons that handle only, while a second cache on
/// the same device keeps working and gives the same outputs as before. (The hook leaves the
/// context intact; a real sticky fault breaks the shared context for every handle on it, see
/// sticky_cuda_error_poisons_the_handle.)
#[test]
fn injected_cuda_errors_give_a_status_and_poison_only_their_handle() {
    use selfindexkv::gpu::testing::{inject_launch_error, CUresult};
    let test = "injected_cuda_errors_give_a_status_and_poison_only_their_handle";
    let c = config(SIKV_DEVICE_CUDA);
    let cfg = CacheConfig::from_c(&c).expect("config");
    let ctx = match GpuContext::new(&cfg, &Layout::new(&cfg)) {
        Ok(x) => x,
        Err(e) if e.status == S::SIKV_ERR_NO_DEVICE => return common::skip_no_cuda_device(test),
        Err(e) => panic!("GPU context: {e}"),
    };
    let mut rng = Rng::new(test);
    let n = 300usize;
    let up = |x: &[f32]| upload(&ctx, &f16(x));
    let (k, v, q) = (
        up(&vals(&mut rng, n * HK)),
        up(&vals(&mut rng, n * HK)),
        up(&vals(&mut rng, HQ)),
    );
    let (k1, v1) = (up(&vals(&mut rng, HK)), up(&vals(&mut rng, HK)));
    let out_bytes = HQ * D * 2;
    let out = ctx.alloc(out_bytes).expect("cuMemAlloc");
    let state = |cache: *mut SikvCache| {
        let mut len = 0u32;
        ok(sikv_seq_len(cache, 7, 0, &mut len), "sikv_seq_len");
        (pool_state(cache), len)
    };
    let attend = |cache: *mut SikvCache| -> (SikvStatus, Vec<u8>) {
        let s = sikv_attend(cache, 0, 1, &7, dptr(&q), out.ptr() as *mut c_void, null_mut());
        (s, download(&ctx, out.ptr(), out_bytes))
    };
    let mut caches = [null_mut::<SikvCache>(); 2];
    for cache in caches.iter_mut() {
        ok(sikv_cache_create(&c, cache), "sikv_cache_create");
        ok(sikv_seq_add(*cache, 7), "seq_add");
        ok(
            sikv_calibrate(*cache, 0, 7, n as u32, dptr(&k), dptr(&v), 1, dptr(&q), null_mut()),
            "calibrate",
        );
    }
    let [a, b] = caches;
    let (s, out_a) = attend(a);
    ok(s, "attend (a)");
    let (s, out_b) = attend(b);
    ok(s, "attend (b)");
    assert_eq!(out_a, out_b, "{test}: two caches fed the same tokens differ");

    // Not sticky: a status with the driver's code, nothing changed, the handle still works.
    let oor = CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    let before = state(a);
    inject_launch_error(oor, 1);
    let s = sikv_append(a, 0, 1, &7, &1, dptr(&k1), dptr(&v1), null_mut());
    let msg = last_error_message();
    assert_eq!(s, S::SIKV_ERR_CUDA, "{test}: append with an injected error: {msg}");
    assert_eq!(sikv_last_error_cuda_code(), oor as i32, "{test}: append: {msg}");
    assert!(
        msg.contains("cuLaunchKernelEx"),
        "{test}: the message names the call: {msg}"
    );
    assert_eq!(state(a), before, "{test}: the failed append changed the cache");
    inject_launch_error(oor, 1);
    let (s, _) = attend(a);
    assert_eq!(
        s,
        S::SIKV_ERR_CUDA,
        "{test}: attend with an injected error: {}",
        last_error_message()
    );
    let (s, again) = attend(a);
    ok(s, "attend after a non-sticky error");
    assert_eq!(again, out_a, "{test}: attend after a non-sticky error differs");
    assert_eq!(state(a), before, "{test}: the failed attend changed the cache");

    // Sticky: that handle is poisoned, the other one keeps working.
    let ill = CUresult::CUDA_ERROR_ILLEGAL_ADDRESS;
    inject_launch_error(ill, 1);
    let (s, _) = attend(a);
    let msg = last_error_message();
    assert_eq!(
        s,
        S::SIKV_ERR_CUDA,
        "{test}: attend with an injected sticky error: {msg}"
    );
    assert_eq!(sikv_last_error_cuda_code(), ill as i32, "{test}: {msg}");
    let (s, _) = attend(a);
    assert_eq!(
        s,
        S::SIKV_ERR_POISONED,
        "{test}: the handle after a sticky error: {}",
        last_error_message()
    );
    let s = sikv_append(a, 0, 1, &7, &1, dptr(&k1), dptr(&v1), null_mut());
    assert_eq!(s, S::SIKV_ERR_POISONED, "{test}: append on the poisoned handle");
    let (s, again) = attend(b);
    ok(s, "attend (b) after (a) was poisoned");
    assert_eq!(again, out_b, "{test}: the second cache's output changed");
    ok(
        sikv_append(b, 0, 1, &7, &1, dptr(&k1), dptr(&v1), null_mut()),
        "append (b) after (a) was poisoned",
    );
    let (s, _) = attend(b);
    ok(s, "attend (b) after its append");
    ctx.synchronize(null_mut()).expect("synchronize");
    sikv_cache_destroy(a);
    sikv_cache_destroy(b);
    println!(
        "{test}: non-sticky: SIKV_ERR_CUDA ({}), cache unchanged and usable; sticky: handle poisoned, \
         the second cache unchanged and working",
        oor as i32
    );
}
