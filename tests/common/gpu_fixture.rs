//! The GPU tests' fixture: configurations, host and device pools of one layer side by side,
//! sequences with random non-contiguous pages, the comparisons of GPU output against the CPU
//! stages, and the wrapper every GPU test runs in (device probe, counted skip line, seed line,
//! one GPU test at a time).

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use selfindexkv::config::{CacheConfig, Dtype, SikvConfig, SIKV_DTYPE_F16};
use selfindexkv::cpu::{self, PageTable};
use selfindexkv::gpu::{DevLayer, DevPageTable, DeviceBuffer, GpuContext};
use selfindexkv::layout::{Layout, SIKV_NUM_PLANES, SIKV_PLANE_SIGN};
use selfindexkv::numeric;
use selfindexkv::reference::rerank::RerankQuery;
use selfindexkv::reference::score::{build_lut, group_mean_query, lut_score, sign_sign_score};
use selfindexkv::status::SikvStatus;

pub use crate::common::HostPools;
use crate::common::{self, Rng};

// ---------------------------------------------------------------------------------------------
// The wrapper of every GPU test.

/// Defines one GPU test: `gpu_test!(name, case)` runs `case: FnOnce(&mut Rng) -> R` through
/// [`run_case`] under the test's own libtest name, so that the seed and skip lines name exactly
/// what a libtest filter selects.
macro_rules! gpu_test {
    ($(#[$attr:meta])* $name:ident, $case:expr) => {
        $(#[$attr])*
        #[test]
        fn $name() {
            $crate::fixture::run_case(module_path!(), stringify!($name), $case)
        }
    };
}

/// GPU tests run one at a time: they were written as one sequence (the long-sequence case
/// wants the device's memory to itself, the NVRTC case sets a process-wide variable that every
/// context creation reads), and libtest runs tests on parallel threads by default.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test is independent of it.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a CUDA device is present (probed once per process). Without one, prints the one
/// counted line `skipped: no CUDA device (<test>)`; a device that is present but unusable
/// fails the test instead of skipping it.
pub fn cuda_device(test: &str) -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        let probe = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
        match GpuContext::new(&probe, &Layout::new(&probe)) {
            Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => false,
            Err(e) => panic!("CUDA device present but unusable: {e}"),
            Ok(ctx) => {
                println!(
                    "gpu tests on {:?}, kernels from {}",
                    ctx.device_info(),
                    ctx.build_path()
                );
                true
            }
        }
    });
    if !present {
        common::skip_no_cuda_device(test);
    }
    present
}

/// The one line a test that needs libnvrtc prints when it returns early without it (counted by
/// CI like the no-device lines).
pub fn skip_no_nvrtc(test: &str) {
    println!("skipped: libnvrtc not found ({test})");
}

/// Runs one GPU case: skips (one counted line) without a device, else prints the seed line
/// (`SIKV_TEST_SEED` replays it) and fails the test with the case's message.
pub fn run_case(module: &str, name: &str, case: impl FnOnce(&mut Rng) -> R) {
    // module_path!() starts with the crate (the test binary); libtest names start below it.
    let test = match module.split_once("::") {
        Some((_, m)) => format!("{m}::{name}"),
        None => name.to_string(),
    };
    let _one_at_a_time = serial();
    if !cuda_device(&test) {
        return;
    }
    let mut rng = Rng::new(&test);
    let seed = rng.0;
    if quick() {
        println!("{test}: quick sizes (SIKV_GPU_TEST_QUICK=1)");
    }
    let t0 = Instant::now();
    let r = case(&mut rng);
    println!("{test}: {:.1} s", t0.elapsed().as_secs_f32());
    if let Err(e) = r {
        panic!("{test}: {e} (replay with SIKV_TEST_SEED={seed:#x})");
    }
}

pub type R<T = ()> = Result<T, String>;

pub fn quick() -> bool {
    std::env::var("SIKV_GPU_TEST_QUICK").map(|v| v == "1").unwrap_or(false)
}

pub fn e2s(e: selfindexkv::Error) -> String {
    format!("{e}")
}

// ---------------------------------------------------------------------------------------------
// Configurations.

#[derive(Clone, Copy)]
pub struct Shape {
    pub dtype: u32,
    pub d: u32,
    pub hkv: u32,
    pub group: u32,
    pub kbits: u32,
    pub vbits: u32,
    pub page: u32,
    pub max_seq_len: u32,
    pub max_batch: u32,
}

pub fn make_cfg(s: Shape, tweak: impl FnOnce(&mut SikvConfig)) -> CacheConfig {
    let mut c = SikvConfig::for_profile(0).unwrap();
    c.device = selfindexkv::config::SIKV_DEVICE_CUDA;
    c.dtype = s.dtype;
    c.head_dim = s.d;
    c.num_kv_heads = s.hkv;
    c.num_q_heads = s.hkv * s.group;
    c.key_bits = s.kbits;
    c.value_bits = s.vbits;
    c.page_size = s.page;
    c.max_seq_len = s.max_seq_len;
    c.max_batch = s.max_batch;
    c.max_seqs = s.max_batch + 1;
    c.max_append_tokens = 4096;
    c.n_sink = 4;
    c.n_heavy = 16;
    c.n_window = 16;
    c.budget_ratio = 0.1;
    c.budget_min = 8;
    c.budget_max = 64;
    c.rerank_factor = 0;
    tweak(&mut c);
    CacheConfig::from_c(&c).unwrap()
}

/// The reference's choices on a test shape (as the parity profile makes them): no sinks or
/// window, 64 heavy tokens, fixed k = 100, its sign predicate, generated tokens force-selected
/// (+inf ties).
pub fn reference_choices(c: &mut SikvConfig) {
    c.n_sink = 0;
    c.n_heavy = 64;
    c.n_window = 0;
    c.budget_ratio = 0.0;
    c.budget_min = 100;
    c.budget_max = 100;
    c.flags = selfindexkv::config::SIKV_FLAG_PARITY_SIGN | selfindexkv::config::SIKV_FLAG_FORCE_GENERATED;
}

pub fn base_shape(dtype: u32, d: u32, hkv: u32, group: u32) -> Shape {
    Shape {
        dtype,
        d,
        hkv,
        group,
        kbits: 2,
        vbits: 2,
        page: 64,
        max_seq_len: 4096,
        max_batch: 4,
    }
}

/// Output tolerance relative to each row's max |cpu|, for attend over several query rows (the
/// one-row attend and attend_dense are held to `out_bound::attend_bound` instead). The f16
/// paths run on tensor cores with f16 operands: the dequantised keys and the folded query are
/// rounded to f16 (2^-11), so a logit's error grows with its magnitude, and on random data the
/// largest logits of a row dominate it. Worst measured on the H200: 5.1e-3 (attend_dense,
/// 139 000 tokens, seed 0xad61c996ef6c568d, 2026-12-03), 1.03e-2 (attend, 139 000 tokens, seed
/// 0x80536fb1093610c2, 2026-12-04) and 5.6e-3 at 4096 (attend, G = 2, seed 0xd7cd15b6be465bd5,
/// 2026-12-04, with SIKV_ATTEND_SPAN=3); most configurations stay below 1.1e-3. The tolerances
/// are about twice those worst cases: a wrong token, head or channel errs by tens of percent.
/// bf16 storage: 3.7e-3 worst recorded, checked at 3e-2.
pub fn tol(cfg: &CacheConfig) -> f32 {
    if cfg.dtype == Dtype::Bf16 {
        3e-2
    } else if cfg.max_seq_len > 65_536 {
        2e-2
    } else {
        1e-2
    }
}

// ---------------------------------------------------------------------------------------------
// Host and device pools of one layer, kept side by side.

pub struct DevPools {
    pub planes: Vec<Option<DeviceBuffer>>,
    pub state: DeviceBuffer,
}

impl DevPools {
    pub fn new(ctx: &GpuContext, layout: &Layout) -> R<DevPools> {
        let mut planes = Vec::new();
        for p in 0..SIKV_NUM_PLANES {
            planes.push(if layout.plane_bytes[p] > 0 {
                Some(ctx.alloc(layout.plane_bytes[p]).map_err(e2s)?)
            } else {
                None
            });
        }
        Ok(DevPools {
            planes,
            state: ctx.alloc(layout.layer_state_bytes).map_err(e2s)?,
        })
    }
    pub fn layer(&self) -> DevLayer {
        DevLayer {
            planes: std::array::from_fn(|p| self.planes[p].as_ref().map(|b| b.ptr()).unwrap_or(0)),
            state: self.state.ptr(),
        }
    }
    pub fn upload(&self, ctx: &GpuContext, h: &HostPools) -> R {
        for p in 0..SIKV_NUM_PLANES {
            if let Some(b) = &self.planes[p] {
                ctx.copy_htod_async(b.ptr(), &h.planes[p], null()).map_err(e2s)?;
            }
        }
        ctx.copy_htod_async(self.state.ptr(), &h.state, null()).map_err(e2s)?;
        ctx.synchronize(null()).map_err(e2s)
    }
    pub fn download(&self, ctx: &GpuContext, layout: &Layout) -> R<HostPools> {
        ctx.synchronize(null()).map_err(e2s)?;
        let mut h = HostPools::new(layout);
        for p in 0..SIKV_NUM_PLANES {
            if let Some(b) = &self.planes[p] {
                ctx.copy_dtoh(&mut h.planes[p], b.ptr()).map_err(e2s)?;
            }
        }
        ctx.copy_dtoh(&mut h.state, self.state.ptr()).map_err(e2s)?;
        Ok(h)
    }
    #[allow(dead_code)] // only some test binaries that include the fixture poison pools
    pub fn poison(&self, ctx: &GpuContext) -> R {
        for b in self.planes.iter().flatten() {
            ctx.memset_async(b.ptr(), 0xFF, b.bytes(), null()).map_err(e2s)?;
        }
        Ok(())
    }
}

pub fn null() -> selfindexkv::gpu::CUstream {
    std::ptr::null_mut()
}

pub fn upload_bytes(ctx: &GpuContext, bytes: &[u8]) -> R<DeviceBuffer> {
    let b = ctx.alloc(bytes.len().max(16)).map_err(e2s)?;
    ctx.copy_htod_async(b.ptr(), bytes, null()).map_err(e2s)?;
    Ok(b)
}

pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
pub fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
pub fn bytes_i32(b: &[u8]) -> Vec<i32> {
    b.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Activations: (device-ready bytes in the model dtype, the same values as f32).
pub type Acts = (Vec<u8>, Vec<f32>);

/// Random activations in the model dtype.
pub fn activations(rng: &mut Rng, dtype: Dtype, n: usize, scale: f32, offsets: Option<&[f32]>) -> Acts {
    let mut vals: Vec<f32> = (0..n)
        .map(|i| {
            let off = offsets.map(|o| o[i % o.len()]).unwrap_or(0.0);
            let x = rng.normal() * scale + off;
            // Occasional outliers exercise the scale / range code.
            if rng.below(97) == 0 {
                x * 6.0
            } else {
                x
            }
        })
        .collect();
    let mut bytes = vec![0u8; n * dtype.size()];
    numeric::from_f32(dtype, &vals, &mut bytes);
    numeric::to_f32(dtype, &bytes, &mut vals);
    (bytes, vals)
}

// ---------------------------------------------------------------------------------------------
// A fixture: one configuration, its context, host + device pools, sequences with pages.

pub struct Seq {
    pub slot: i32,
    pub pages: Vec<i32>,
    pub len: usize,
}

/// A fixture. `C` and `P` are the device half (context, device pools); [`HostFx`] is the host
/// half alone, which draws the same data from the same generator: a seed's data can be
/// regenerated and checked against the CPU stages without a device.
pub struct Fx<C = GpuContext, P = DevPools> {
    pub cfg: CacheConfig,
    pub layout: Layout,
    pub ctx: C,
    pub host: HostPools,
    pub dev: P,
    pub free: Vec<i32>,
    pub seqs: Vec<Seq>,
    pub chan_off: Vec<f32>,
}

/// A fixture without a device.
pub type HostFx = Fx<(), ()>;

impl HostFx {
    /// Nothing device-dependent draws from `rng` here or in [`HostFx::on_device`], so a fixture
    /// made with or without a device consumes the generator alike.
    pub fn host(cfg: CacheConfig, rng: &mut Rng) -> R<HostFx> {
        let layout = Layout::new(&cfg);
        let host = HostPools::new(&layout);
        let mut free: Vec<i32> = (0..layout.num_pages as i32).collect();
        rng.shuffle(&mut free);
        let chan_off = (0..cfg.head_dim).map(|_| rng.normal() * 0.7).collect();
        let mut fx = Fx {
            cfg,
            layout,
            ctx: (),
            host,
            dev: (),
            free,
            seqs: Vec::new(),
            chan_off,
        };
        for s in 0..fx.cfg.max_seqs as usize {
            cpu::reset_sequence(&fx.layout, &mut fx.host.state, s).map_err(e2s)?;
        }
        Ok(fx)
    }

    /// The device half: a context and device pools (not uploaded).
    pub fn on_device(self) -> R<Fx> {
        let ctx = GpuContext::new(&self.cfg, &self.layout).map_err(e2s)?;
        let dev = DevPools::new(&ctx, &self.layout)?;
        Ok(Fx {
            cfg: self.cfg,
            layout: self.layout,
            ctx,
            host: self.host,
            dev,
            free: self.free,
            seqs: self.seqs,
            chan_off: self.chan_off,
        })
    }
}

impl Fx {
    pub fn new(cfg: CacheConfig, rng: &mut Rng) -> R<Fx> {
        HostFx::host(cfg, rng)?.on_device()
    }

    pub fn dev_table(&self, t: &(Vec<i32>, Vec<i32>, Vec<i32>)) -> R<(DevPageTable, Vec<DeviceBuffer>)> {
        let a = upload_bytes(&self.ctx, &i32_bytes(&t.0))?;
        let b = upload_bytes(&self.ctx, &i32_bytes(&t.1))?;
        let c = upload_bytes(&self.ctx, &i32_bytes(&t.2))?;
        let dt = DevPageTable {
            indptr: a.ptr(),
            indices: b.ptr(),
            last_page_len: c.ptr(),
            batch: t.2.len() as u32,
        };
        Ok((dt, vec![a, b, c]))
    }

    pub fn ws(&self, batch: u32) -> R<DeviceBuffer> {
        let n = GpuContext::workspace_bytes(&self.cfg, &self.layout, batch);
        let b = self.ctx.alloc(n).map_err(e2s)?;
        // Poison the workspace too: kernels must not read what they did not write.
        self.ctx.memset_async(b.ptr(), 0xFF, n, null()).map_err(e2s)?;
        Ok(b)
    }
}

impl<C, P> Fx<C, P> {
    pub fn dtype(&self) -> Dtype {
        self.cfg.dtype
    }

    /// Adds a sequence in slot `slot` with pages for `cap` tokens (random, non-contiguous).
    pub fn add_seq(&mut self, slot: i32, cap: usize) -> R<usize> {
        let np = cap.div_ceil(self.layout.page_size);
        if np > self.free.len() {
            return Err("fixture ran out of pages".into());
        }
        let pages = self.free.split_off(self.free.len() - np);
        self.seqs.push(Seq { slot, pages, len: 0 });
        Ok(self.seqs.len() - 1)
    }

    pub fn slot_of(&self, s: usize, pos: usize) -> i64 {
        let p = self.layout.page_size;
        self.seqs[s].pages[pos / p] as i64 * p as i64 + (pos % p) as i64
    }

    pub fn kv(&self, rng: &mut Rng, n: usize) -> (Acts, Acts) {
        let d = self.cfg.head_dim as usize;
        let m = n * self.cfg.num_kv_heads as usize * d;
        (
            activations(rng, self.dtype(), m, 1.0, Some(&self.chan_off)),
            activations(rng, self.dtype(), m, 1.0, None),
        )
    }

    pub fn q(&self, rng: &mut Rng, rows: usize) -> Acts {
        let m = rows * (self.cfg.num_q_heads * self.cfg.head_dim) as usize;
        activations(rng, self.dtype(), m, 1.0, None)
    }

    /// Calibrates sequence s with a prompt of n tokens on the CPU only.
    pub fn calibrate_cpu(&mut self, rng: &mut Rng, s: usize, n: usize, nq: usize) -> R {
        let ((_, k), (_, v)) = self.kv(rng, n);
        let (_, q) = self.q(rng, nq);
        let sm: Vec<i64> = (0..n).map(|t| self.slot_of(s, t)).collect();
        let slot = self.seqs[s].slot as usize;
        cpu::calibrate(
            &self.layout,
            &self.cfg,
            &mut self.host.layer_mut(),
            slot,
            &k,
            &v,
            &q,
            &sm,
        )
        .map_err(e2s)?;
        self.seqs[s].len = n;
        Ok(())
    }

    /// Appends `per` tokens to each listed sequence on the CPU (host pools).
    pub fn append_cpu(&mut self, rng: &mut Rng, which: &[usize], per: usize) -> R {
        let (sm, slots, pos) = self.append_rows(which, per);
        let ((_, k), (_, v)) = self.kv(rng, sm.len());
        cpu::append(
            &self.layout,
            &self.cfg,
            &mut self.host.layer_mut(),
            &k,
            &v,
            &sm,
            &slots,
            &pos,
        )
        .map_err(e2s)?;
        for &s in which {
            self.seqs[s].len += per;
        }
        Ok(())
    }

    pub fn append_rows(&self, which: &[usize], per: usize) -> (Vec<i64>, Vec<i32>, Vec<i32>) {
        let (mut sm, mut slots, mut pos) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..per {
            for &s in which {
                let p = self.seqs[s].len + j;
                sm.push(self.slot_of(s, p));
                slots.push(self.seqs[s].slot);
                pos.push(p as i32);
            }
        }
        (sm, slots, pos)
    }

    /// CSR page table of the listed sequences at their current lengths.
    pub fn table(&self, which: &[usize]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
        let p = self.layout.page_size;
        let (mut indptr, mut indices, mut last) = (vec![0], Vec::new(), Vec::new());
        for &s in which {
            let len = self.seqs[s].len;
            let np = len.div_ceil(p);
            indices.extend_from_slice(&self.seqs[s].pages[..np]);
            indptr.push(indices.len() as i32);
            last.push(if len == 0 { 0 } else { (len - (np - 1) * p) as i32 });
        }
        (indptr, indices, last)
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

pub fn cmp_bytes(what: &str, a: &[u8], b: &[u8]) -> R {
    if a.len() != b.len() {
        return Err(format!("{what}: lengths {} vs {}", a.len(), b.len()));
    }
    let bad: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let i = bad[0];
    Err(format!(
        "{what}: {} of {} bytes differ; first at byte {i}: gpu {:#04x} cpu {:#04x}",
        bad.len(),
        a.len(),
        a[i],
        b[i]
    ))
}

/// Planes and state bit for bit, with a decoded hint of where the first difference is.
pub fn cmp_layers(fx: &Fx, gpu: &HostPools, cpu: &HostPools) -> R {
    for p in 0..SIKV_NUM_PLANES {
        if let Err(e) = cmp_bytes(selfindexkv::layout::PLANE_NAMES[p], &gpu.planes[p], &cpu.planes[p]) {
            let row = fx.layout.format.row_bytes[p];
            let first = (0..gpu.planes[p].len())
                .find(|&i| gpu.planes[p][i] != cpu.planes[p][i])
                .unwrap_or(0);
            let r = first / row.max(1);
            let (slot, head, page) = (
                r % fx.layout.page_size,
                (r / fx.layout.page_size) % fx.layout.num_kv_heads,
                r / fx.layout.page_size / fx.layout.num_kv_heads,
            );
            return Err(format!(
                "{e} (page {page}, head {head}, slot {slot}; gpu row {:02x?} cpu row {:02x?})",
                &gpu.planes[p][r * row..(r + 1) * row],
                &cpu.planes[p][r * row..(r + 1) * row]
            ));
        }
    }
    if let Err(e) = cmp_bytes("state", &gpu.state, &cpu.state) {
        let first = (0..gpu.state.len())
            .find(|&i| gpu.state[i] != cpu.state[i])
            .unwrap_or(0);
        let rec = fx.layout.state.bytes;
        let off = first % rec;
        let st = &fx.layout.state;
        let field = [
            ("centre", st.centre),
            ("scale", st.scale),
            ("inv_scale", st.inv_scale),
            ("qmed", st.qmed),
            ("codebook", st.codebook),
            ("meta", st.meta),
            ("dense_pos", st.dense_pos),
            ("dense_k", st.dense_k),
            ("dense_v", st.dense_v),
        ]
        .iter()
        .rev()
        .find(|(_, o)| *o <= off)
        .map(|(n, o)| format!("{n}+{}", off - o))
        .unwrap_or_default();
        return Err(format!("{e} (record {}, field {field})", first / rec));
    }
    Ok(())
}

/// `x <= limit`, false for NaN: an unwritten (poisoned) element fails every comparison.
pub fn within(x: f32, limit: f32) -> bool {
    x <= limit
}

pub fn out_f32(fx: &Fx, bytes: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / fx.dtype().size()];
    numeric::to_f32(fx.dtype(), bytes, &mut v);
    v
}

pub fn cmp_out(fx: &Fx, what: &str, gpu: &[f32], cpu: &[f32]) -> R {
    let d = fx.cfg.head_dim as usize;
    let t = tol(&fx.cfg);
    let mut worst = 0f32;
    for (r, (g, c)) in gpu.chunks(d).zip(cpu.chunks(d)).enumerate() {
        // Relative to the row's own max |cpu|, no floor: small rows are held to the same
        // relative accuracy as large ones.
        let scale = c.iter().fold(0f32, |m, x| m.max(x.abs()));
        for i in 0..d {
            let e = if scale > 0.0 {
                (g[i] - c[i]).abs() / scale
            } else if g[i] == c[i] {
                0.0
            } else {
                f32::INFINITY
            };
            if !within(e, t) {
                return Err(format!(
                    "{what}: row {r} channel {i}: gpu {} cpu {} (rel err {e}, tol {t})",
                    g[i], c[i]
                ));
            }
            worst = worst.max(e);
        }
    }
    println!("  {what}: worst rel err {worst:.2e} (tol {t}, {:?})", fx.cfg.dtype);
    Ok(())
}

/// Final-stage CPU score of position `pos` of sequence `b` for query row `r` of `q` (for the
/// tie rule of select comparisons).
#[allow(clippy::too_many_arguments)] // the comparison's inputs, as the select under test takes them
pub fn cpu_score(
    fx: &Fx,
    host: &HostPools,
    table: &PageTable,
    b: usize,
    r: usize,
    h: usize,
    slot: usize,
    q: &[f32],
    pos: u32,
) -> f32 {
    let cfg = &fx.cfg;
    let (d, g, hq) = (
        cfg.head_dim as usize,
        cfg.group_size() as usize,
        cfg.num_q_heads as usize,
    );
    let rec = cpu::read_state(&fx.layout, cfg.dtype.storage(), &host.state, slot, h);
    if cfg.force_generated && pos as i32 >= rec.meta[0] {
        return f32::INFINITY;
    }
    let qbar = group_mean_query(&q[(r * hq + h * g) * d..(r * hq + (h + 1) * g) * d], d);
    let (page, s) = table.locate(b, pos as usize, fx.layout.page_size);
    let rows: [&[u8]; SIKV_NUM_PLANES] = std::array::from_fn(|p| {
        let len = fx.layout.format.row_bytes[p];
        if len == 0 {
            &host.planes[p][0..0]
        } else {
            let off = fx.layout.row_offset(p, page, h, s);
            &host.planes[p][off..off + len]
        }
    });
    if cfg.two_stage() {
        let fmt = &fx.layout.format;
        let mut key = vec![0f32; d];
        return RerankQuery::new(fmt, &qbar, &rec.scale).score(cfg.dtype.storage(), &rows, &mut key);
    }
    match cfg.selector {
        selfindexkv::config::Selector::Lut => lut_score(&build_lut(&rec.codebook, &qbar), rows[SIKV_PLANE_SIGN]),
        selfindexkv::config::Selector::SignSign => sign_sign_score(rows[SIKV_PLANE_SIGN], &qbar, &rec.qmed),
    }
}

/// `seqs[r]`: the sequence of query row r (selection rows are `r * H_kv + h`).
#[allow(clippy::too_many_arguments)] // the comparison's inputs, as the select under test takes them
pub fn cmp_select(
    fx: &Fx,
    host: &HostPools,
    table: &PageTable,
    slots: &[i32],
    seqs: &[usize],
    q: &[f32],
    gi: &[i32],
    gc: &[i32],
    ci: &[i32],
    cc: &[i32],
) -> R {
    let kmax = fx.cfg.budget.max as usize;
    let hkv = fx.cfg.num_kv_heads as usize;
    for row in 0..cc.len() {
        let (r, h) = (row / hkv, row % hkv);
        let b = seqs[r];
        if gc[row] != cc[row] {
            return Err(format!("select: counts[{row}] gpu {} cpu {}", gc[row], cc[row]));
        }
        let n = cc[row] as usize;
        let g = &gi[row * kmax..(row + 1) * kmax];
        let c = &ci[row * kmax..(row + 1) * kmax];
        if g[n..].iter().any(|&x| x != -1) {
            return Err(format!("select: row {row}: entries past count {n} are not -1"));
        }
        if g[..n].windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "select: row {row}: indices not strictly ascending: {:?}",
                &g[..n.min(32)]
            ));
        }
        if g[..n] == c[..n] {
            continue;
        }
        // Tie rule.
        let gs: std::collections::BTreeSet<i32> = g[..n].iter().copied().collect();
        let cs: std::collections::BTreeSet<i32> = c[..n].iter().copied().collect();
        let slot = slots[b] as usize;
        let score = |p: i32| cpu_score(fx, host, table, b, r, h, slot, q, p as u32);
        let thr = cs.iter().map(|&p| score(p)).fold(f32::INFINITY, f32::min);
        let tolv = 1e-4f32 * thr.abs().max(1.0);
        println!(
            "  select: row {row}: {} position(s) differ as ties of the threshold",
            gs.symmetric_difference(&cs).count()
        );
        for &p in gs.symmetric_difference(&cs) {
            let s = score(p);
            if !within((s - thr).abs(), tolv) {
                return Err(format!(
                    "select: row {row} (query row {r}, seq {b}, head {h}): position {p} (score {s}) is in only one of gpu/cpu and is not tied with the threshold {thr}"
                ));
            }
        }
    }
    Ok(())
}
