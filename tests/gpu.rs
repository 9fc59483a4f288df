//! GPU kernels against the CPU stages (the oracle), on fresh random inputs every run.
//!
//! One #[test] runs every case in order and reports each; without a CUDA device it prints
//! `gpu tests skipped: no CUDA device (N tests)` and returns. Seeds come from the clock and are
//! printed (set SIKV_GPU_TEST_SEED to replay). SIKV_GPU_TEST_QUICK=1 shrinks every size (for
//! compute-sanitizer runs). Outputs are poisoned (0xFF bytes: NaN for 16-bit floats, -1 for
//! ints) before every GPU launch, so an element a kernel fails to write shows up.
//!
//! Comparison rules:
//! - encode / calibrate: bit-exact (planes, state records, dense entries): the kernels use the
//!   CPU's operation order without FMA contraction.
//! - select: counts equal and index sets equal. A mismatch is accepted only as a tie within
//!   float rounding: every position in the symmetric difference must have a final-stage CPU
//!   score within 1e-4 (relative, floor 1e-4 absolute) of the smallest selected CPU score.
//! - attend / attend_dense: on the SAME indices, max |gpu - cpu| <= tol * max(1, max |cpu|)
//!   per (sequence, query head) row, tol = 2e-3 (f16) or 1e-2 (bf16).
//! - CUDA graph: graph replays bit-identical to eager launches of the same steps.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use selfindexkv::config::{
    CacheConfig, Dtype, SikvConfig, SIKV_CENTRE_MEAN, SIKV_DTYPE_BF16, SIKV_DTYPE_F16, SIKV_DTYPE_F32,
};
use selfindexkv::cpu::{self, LayerMut, LayerRef, PageTable};
use selfindexkv::gpu::{params, DevLayer, DevPageTable, DeviceBuffer, GpuContext};
use selfindexkv::layout::{Layout, SIKV_NUM_PLANES, SIKV_PLANE_SIGN};
use selfindexkv::numeric;
use selfindexkv::reference::encode::decode_key;
use selfindexkv::reference::rerank::rerank_score;
use selfindexkv::reference::score::{build_lut, group_mean_query, lut_score, sign_sign_score};
use selfindexkv::status::SikvStatus;

type R<T = ()> = Result<T, String>;

// ---------------------------------------------------------------------------------------------
// Randomness and sizes.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn quick() -> bool {
    std::env::var("SIKV_GPU_TEST_QUICK").map(|v| v == "1").unwrap_or(false)
}

fn e2s(e: selfindexkv::Error) -> String {
    format!("{e}")
}

// ---------------------------------------------------------------------------------------------
// Configurations.

#[derive(Clone, Copy)]
struct Shape {
    dtype: u32,
    d: u32,
    hkv: u32,
    group: u32,
    kbits: u32,
    vbits: u32,
    page: u32,
    max_seq_len: u32,
    max_batch: u32,
}

fn make_cfg(s: Shape, tweak: impl FnOnce(&mut SikvConfig)) -> CacheConfig {
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

fn tol(cfg: &CacheConfig) -> f32 {
    if cfg.dtype == Dtype::Bf16 {
        1e-2
    } else {
        2e-3
    }
}

// ---------------------------------------------------------------------------------------------
// Host and device pools of one layer, kept side by side.

struct HostLayer {
    planes: Vec<Vec<u8>>,
    state: Vec<u8>,
}

impl HostLayer {
    fn new(layout: &Layout) -> HostLayer {
        HostLayer {
            planes: (0..SIKV_NUM_PLANES).map(|p| vec![0u8; layout.plane_bytes[p]]).collect(),
            state: vec![0u8; layout.layer_state_bytes],
        }
    }
    fn as_mut(&mut self) -> LayerMut<'_> {
        let mut it = self.planes.iter_mut();
        let planes: [&mut [u8]; SIKV_NUM_PLANES] = std::array::from_fn(|_| it.next().unwrap().as_mut_slice());
        LayerMut {
            planes,
            state: &mut self.state,
        }
    }
    fn as_ref(&self) -> LayerRef<'_> {
        LayerRef {
            planes: std::array::from_fn(|p| self.planes[p].as_slice()),
            state: &self.state,
        }
    }
}

struct DevPools {
    planes: Vec<Option<DeviceBuffer>>,
    state: DeviceBuffer,
}

impl DevPools {
    fn new(ctx: &GpuContext, layout: &Layout) -> R<DevPools> {
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
    fn layer(&self) -> DevLayer {
        DevLayer {
            planes: std::array::from_fn(|p| self.planes[p].as_ref().map(|b| b.ptr()).unwrap_or(0)),
            state: self.state.ptr(),
        }
    }
    fn upload(&self, ctx: &GpuContext, h: &HostLayer) -> R {
        for p in 0..SIKV_NUM_PLANES {
            if let Some(b) = &self.planes[p] {
                ctx.copy_htod_async(b.ptr(), &h.planes[p], null()).map_err(e2s)?;
            }
        }
        ctx.copy_htod_async(self.state.ptr(), &h.state, null()).map_err(e2s)?;
        ctx.synchronize(null()).map_err(e2s)
    }
    fn download(&self, ctx: &GpuContext, layout: &Layout) -> R<HostLayer> {
        ctx.synchronize(null()).map_err(e2s)?;
        let mut h = HostLayer::new(layout);
        for p in 0..SIKV_NUM_PLANES {
            if let Some(b) = &self.planes[p] {
                ctx.copy_dtoh(&mut h.planes[p], b.ptr()).map_err(e2s)?;
            }
        }
        ctx.copy_dtoh(&mut h.state, self.state.ptr()).map_err(e2s)?;
        Ok(h)
    }
    #[allow(dead_code)]
    fn poison(&self, ctx: &GpuContext) -> R {
        for b in self.planes.iter().flatten() {
            ctx.memset_async(b.ptr(), 0xFF, b.bytes(), null()).map_err(e2s)?;
        }
        Ok(())
    }
}

fn null() -> selfindexkv::gpu::CUstream {
    std::ptr::null_mut()
}

fn upload_bytes(ctx: &GpuContext, bytes: &[u8]) -> R<DeviceBuffer> {
    let b = ctx.alloc(bytes.len().max(16)).map_err(e2s)?;
    ctx.copy_htod_async(b.ptr(), bytes, null()).map_err(e2s)?;
    Ok(b)
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bytes_i32(b: &[u8]) -> Vec<i32> {
    b.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Random activations in the model dtype: (device-ready bytes, the same values as f32).
fn activations(rng: &mut Rng, dtype: Dtype, n: usize, scale: f32, offsets: Option<&[f32]>) -> (Vec<u8>, Vec<f32>) {
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

struct Seq {
    slot: i32,
    pages: Vec<i32>,
    len: usize,
}

struct Fx {
    cfg: CacheConfig,
    layout: Layout,
    ctx: GpuContext,
    host: HostLayer,
    dev: DevPools,
    free: Vec<i32>,
    seqs: Vec<Seq>,
    chan_off: Vec<f32>,
}

impl Fx {
    fn new(cfg: CacheConfig, rng: &mut Rng) -> R<Fx> {
        let layout = Layout::new(&cfg);
        let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
        let host = HostLayer::new(&layout);
        let dev = DevPools::new(&ctx, &layout)?;
        let mut free: Vec<i32> = (0..layout.num_pages as i32).collect();
        rng.shuffle(&mut free);
        let chan_off = (0..cfg.head_dim).map(|_| rng.normal() * 0.7).collect();
        let mut fx = Fx {
            cfg,
            layout,
            ctx,
            host,
            dev,
            free,
            seqs: Vec::new(),
            chan_off,
        };
        for s in 0..fx.cfg.max_seqs as usize {
            cpu::reset_sequence(&fx.layout, &mut fx.host.state, s).map_err(e2s)?;
        }
        Ok(fx)
    }

    fn dtype(&self) -> Dtype {
        self.cfg.dtype
    }

    /// Adds a sequence in slot `slot` with pages for `cap` tokens (random, non-contiguous).
    fn add_seq(&mut self, slot: i32, cap: usize) -> R<usize> {
        let np = cap.div_ceil(self.layout.page_size);
        if np > self.free.len() {
            return Err("fixture ran out of pages".into());
        }
        let pages = self.free.split_off(self.free.len() - np);
        self.seqs.push(Seq { slot, pages, len: 0 });
        Ok(self.seqs.len() - 1)
    }

    fn slot_of(&self, s: usize, pos: usize) -> i64 {
        let p = self.layout.page_size;
        self.seqs[s].pages[pos / p] as i64 * p as i64 + (pos % p) as i64
    }

    fn kv(&self, rng: &mut Rng, n: usize) -> ((Vec<u8>, Vec<f32>), (Vec<u8>, Vec<f32>)) {
        let d = self.cfg.head_dim as usize;
        let m = n * self.cfg.num_kv_heads as usize * d;
        (
            activations(rng, self.dtype(), m, 1.0, Some(&self.chan_off)),
            activations(rng, self.dtype(), m, 1.0, None),
        )
    }

    fn q(&self, rng: &mut Rng, rows: usize) -> (Vec<u8>, Vec<f32>) {
        let m = rows * (self.cfg.num_q_heads * self.cfg.head_dim) as usize;
        activations(rng, self.dtype(), m, 1.0, None)
    }

    /// Calibrates sequence s with a prompt of n tokens on the CPU only.
    fn calibrate_cpu(&mut self, rng: &mut Rng, s: usize, n: usize, nq: usize) -> R {
        let ((_, k), (_, v)) = self.kv(rng, n);
        let (_, q) = self.q(rng, nq);
        let sm: Vec<i64> = (0..n).map(|t| self.slot_of(s, t)).collect();
        let slot = self.seqs[s].slot as usize;
        cpu::calibrate(&self.layout, &self.cfg, &mut self.host.as_mut(), slot, &k, &v, &q, &sm).map_err(e2s)?;
        self.seqs[s].len = n;
        Ok(())
    }

    /// Appends `per` tokens to each listed sequence on the CPU (host pools).
    fn append_cpu(&mut self, rng: &mut Rng, which: &[usize], per: usize) -> R {
        let (sm, slots, pos) = self.append_rows(which, per);
        let ((_, k), (_, v)) = self.kv(rng, sm.len());
        cpu::append(
            &self.layout,
            &self.cfg,
            &mut self.host.as_mut(),
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

    fn append_rows(&self, which: &[usize], per: usize) -> (Vec<i64>, Vec<i32>, Vec<i32>) {
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
    fn table(&self, which: &[usize]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
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

    fn dev_table(&self, t: &(Vec<i32>, Vec<i32>, Vec<i32>)) -> R<(DevPageTable, Vec<DeviceBuffer>)> {
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

    fn ws(&self, batch: u32) -> R<DeviceBuffer> {
        let n = GpuContext::workspace_bytes(&self.cfg, &self.layout, batch);
        let b = self.ctx.alloc(n).map_err(e2s)?;
        // Poison the workspace too: kernels must not read what they did not write.
        self.ctx.memset_async(b.ptr(), 0xFF, n, null()).map_err(e2s)?;
        Ok(b)
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

fn cmp_bytes(what: &str, a: &[u8], b: &[u8]) -> R {
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
fn cmp_layers(fx: &Fx, gpu: &HostLayer, cpu: &HostLayer) -> R {
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

fn out_f32(fx: &Fx, bytes: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / fx.dtype().size()];
    numeric::to_f32(fx.dtype(), bytes, &mut v);
    v
}

fn cmp_out(fx: &Fx, what: &str, gpu: &[f32], cpu: &[f32]) -> R {
    let d = fx.cfg.head_dim as usize;
    let t = tol(&fx.cfg);
    let mut worst = 0f32;
    for (r, (g, c)) in gpu.chunks(d).zip(cpu.chunks(d)).enumerate() {
        let scale = c.iter().fold(1f32, |m, x| m.max(x.abs()));
        for i in 0..d {
            let e = (g[i] - c[i]).abs() / scale;
            if !(e <= t) {
                return Err(format!(
                    "{what}: row {r} channel {i}: gpu {} cpu {} (rel err {e}, tol {t})",
                    g[i], c[i]
                ));
            }
            worst = worst.max(e);
        }
    }
    let _ = worst;
    Ok(())
}

/// Final-stage CPU score of position `pos` (for the tie rule of select comparisons).
fn cpu_score(
    fx: &Fx,
    host: &HostLayer,
    table: &PageTable,
    b: usize,
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
    let qbar = group_mean_query(&q[(b * hq + h * g) * d..(b * hq + (h + 1) * g) * d], d);
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
        return rerank_score(
            &qbar,
            &decode_key(&fx.layout.format, cfg.dtype.storage(), &rows, &rec.scale),
        );
    }
    match cfg.selector {
        selfindexkv::config::Selector::Lut => lut_score(&build_lut(&rec.codebook, &qbar), rows[SIKV_PLANE_SIGN]),
        selfindexkv::config::Selector::SignSign => sign_sign_score(rows[SIKV_PLANE_SIGN], &qbar, &rec.qmed),
    }
}

#[allow(clippy::too_many_arguments)]
fn cmp_select(
    fx: &Fx,
    host: &HostLayer,
    table: &PageTable,
    slots: &[i32],
    q: &[f32],
    gi: &[i32],
    gc: &[i32],
    ci: &[i32],
    cc: &[i32],
) -> R {
    let kmax = fx.cfg.budget.max as usize;
    let hkv = fx.cfg.num_kv_heads as usize;
    for row in 0..cc.len() {
        let (b, h) = (row / hkv, row % hkv);
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
        let score = |p: i32| cpu_score(fx, host, table, b, h, slot, q, p as u32);
        let thr = cs.iter().map(|&p| score(p)).fold(f32::INFINITY, f32::min);
        let tolv = 1e-4f32 * thr.abs().max(1.0);
        for &p in gs.symmetric_difference(&cs) {
            let s = score(p);
            if !((s - thr).abs() <= tolv) {
                return Err(format!(
                    "select: row {row} (seq {b}, head {h}): position {p} (score {s}) is in only one of gpu/cpu and is not tied with the threshold {thr}"
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cases.

fn case_params_layout(_rng: &mut Rng) -> R {
    let cfg = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
    let dev = ctx.params_layout().map_err(e2s)?;
    let host = params::layout_probe();
    if dev != host {
        return Err(format!("SikvParams layout differs: device {dev:?} host {host:?}"));
    }
    println!("    build path: {}, device {:?}", ctx.build_path(), ctx.device_info());
    Ok(())
}

fn base_shape(dtype: u32, d: u32, hkv: u32, group: u32) -> Shape {
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

fn case_validation(_rng: &mut Rng) -> R {
    let cfg = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
    let pools = DevPools::new(&ctx, &layout)?;
    let ws = ctx.alloc(GpuContext::workspace_bytes(&cfg, &layout, 4)).map_err(e2s)?;
    let buf = ctx.alloc(1 << 20).map_err(e2s)?;
    let table = DevPageTable {
        indptr: buf.ptr(),
        indices: buf.ptr(),
        last_page_len: buf.ptr(),
        batch: 2,
    };
    let b = buf.ptr();
    let expect = |what: &str, r: selfindexkv::Result<()>, st: SikvStatus| -> R {
        match r {
            Err(e) if e.status == st => Ok(()),
            other => Err(format!("{what}: expected {st:?}, got {other:?}")),
        }
    };
    let l = pools.layer();
    expect(
        "misaligned q",
        ctx.select(&cfg, &layout, &l, &table, b, b + 2, b, b, ws.ptr(), ws.bytes(), null()),
        SikvStatus::SIKV_ERR_MISALIGNED,
    )?;
    expect(
        "null q",
        ctx.select(&cfg, &layout, &l, &table, b, 0, b, b, ws.ptr(), ws.bytes(), null()),
        SikvStatus::SIKV_ERR_NULL_POINTER,
    )?;
    expect(
        "small ws",
        ctx.select(&cfg, &layout, &l, &table, b, b, b, b, ws.ptr(), 16, null()),
        SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
    )?;
    let big = DevPageTable {
        batch: cfg.max_batch + 1,
        ..table
    };
    expect(
        "batch",
        ctx.attend(&cfg, &layout, &l, &big, b, b, b, b, b, ws.ptr(), ws.bytes(), null()),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
    )?;
    expect(
        "append n",
        ctx.append(&cfg, &layout, &l, cfg.max_append_tokens + 1, b, b, b, b, b, null()),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
    )?;
    let mut l2 = l;
    l2.planes[SIKV_PLANE_SIGN] = 0;
    expect(
        "null plane",
        ctx.append(&cfg, &layout, &l2, 1, b, b, b, b, b, null()),
        SikvStatus::SIKV_ERR_NULL_POINTER,
    )?;
    // reset_sequence matches cpu::reset_sequence.
    let mut host = HostLayer::new(&layout);
    for (i, x) in host.state.iter_mut().enumerate() {
        *x = (i * 131 % 251) as u8;
    }
    pools.upload(&ctx, &host)?;
    cpu::reset_sequence(&layout, &mut host.state, 1).map_err(e2s)?;
    ctx.reset_sequence(&cfg, &layout, &l, 1, null()).map_err(e2s)?;
    let got = pools.download(&ctx, &layout)?;
    cmp_bytes("reset_sequence state", &got.state, &host.state)?;
    let f32cfg = make_cfg(base_shape(SIKV_DTYPE_F32, 128, 2, 4), |_| {});
    match GpuContext::new(&f32cfg, &Layout::new(&f32cfg)) {
        Err(e) if e.status == SikvStatus::SIKV_ERR_UNSUPPORTED => {}
        Err(e) => return Err(format!("f32 context: expected UNSUPPORTED, got {e}")),
        Ok(_) => return Err("f32 context: expected UNSUPPORTED, got a context".into()),
    }
    ctx.synchronize(null()).map_err(e2s)
}

/// encode (append) bit-exact: after a CPU calibration copied to the device, both sides get the
/// same appended tokens (several sequences, sinks/window/ring wrap, padding rows); planes
/// poisoned on both sides first.
fn run_encode(rng: &mut Rng, shape: Shape, tweak: impl FnOnce(&mut SikvConfig)) -> R {
    let cfg = make_cfg(shape, tweak);
    let mut fx = Fx::new(cfg, rng)?;
    let nseq = 3;
    let prompt = [1usize, 37, 150];
    let extra = if quick() { 20 } else { 70 };
    for s in 0..nseq {
        let i = fx.add_seq(s as i32, prompt[s] + extra + 1)?;
        fx.calibrate_cpu(rng, i, prompt[s], 1)?;
    }
    for p in fx.host.planes.iter_mut() {
        p.fill(0xFF);
    }
    fx.dev.upload(&fx.ctx, &fx.host)?;
    let which: Vec<usize> = (0..nseq).collect();
    // Two appends: a multi-token chunk (ring collisions inside one call) and a decode step.
    for per in [extra - 1, 1] {
        let (mut sm, slots, pos) = fx.append_rows(&which, per);
        if sm.len() > 2 {
            sm[1] = -1; // a padding row: no page write, dense update still happens
        }
        let ((kb, k), (vb, v)) = fx.kv(rng, sm.len());
        cpu::append(&fx.layout, &fx.cfg, &mut fx.host.as_mut(), &k, &v, &sm, &slots, &pos).map_err(e2s)?;
        let (dk, dv) = (upload_bytes(&fx.ctx, &kb)?, upload_bytes(&fx.ctx, &vb)?);
        let dsm = upload_bytes(&fx.ctx, &i64_bytes(&sm))?;
        let dsl = upload_bytes(&fx.ctx, &i32_bytes(&slots))?;
        let dpo = upload_bytes(&fx.ctx, &i32_bytes(&pos))?;
        fx.ctx
            .append(
                &fx.cfg,
                &fx.layout,
                &fx.dev.layer(),
                sm.len() as u32,
                dk.ptr(),
                dv.ptr(),
                dsm.ptr(),
                dsl.ptr(),
                dpo.ptr(),
                null(),
            )
            .map_err(e2s)?;
        for &s in &which {
            fx.seqs[s].len += per;
        }
        let gpu = fx.dev.download(&fx.ctx, &fx.layout)?;
        cmp_layers(&fx, &gpu, &fx.host)?;
    }
    Ok(())
}

fn case_encode(rng: &mut Rng) -> R {
    let dims: &[u32] = if quick() { &[64, 128] } else { &[64, 128, 256] };
    let bits: &[(u32, u32)] = &[(2, 2), (4, 4), (16, 16), (2, 16), (4, 2)];
    for &dtype in &[SIKV_DTYPE_F16, SIKV_DTYPE_BF16] {
        for &d in dims {
            for &(kb, vb) in bits {
                let mut s = base_shape(dtype, d, 2, 2);
                s.kbits = kb;
                s.vbits = vb;
                s.page = 16;
                run_encode(rng, s, |_| {}).map_err(|e| format!("dtype {dtype} d {d} bits {kb}/{vb}: {e}"))?;
            }
        }
    }
    // Parity sign predicate (x > 0) and a config without window.
    let s = base_shape(SIKV_DTYPE_F16, 128, 1, 4);
    run_encode(rng, s, |c| {
        c.flags = selfindexkv::config::SIKV_FLAG_PARITY_SIGN;
        c.n_window = 0;
    })
    .map_err(|e| format!("parity sign: {e}"))
}

/// calibrate: GPU vs CPU from the same (poisoned) pools and inputs, bit-exact.
fn run_calibrate(rng: &mut Rng, shape: Shape, n: usize, nq: usize, tweak: impl FnOnce(&mut SikvConfig)) -> R {
    let cfg = make_cfg(shape, tweak);
    let mut fx = Fx::new(cfg, rng)?;
    let s = fx.add_seq(1, n)?;
    for p in fx.host.planes.iter_mut() {
        p.fill(0xFF);
    }
    fx.dev.upload(&fx.ctx, &fx.host)?;
    let ((kb, k), (vb, v)) = fx.kv(rng, n);
    let (qb, q) = fx.q(rng, nq);
    let mut sm: Vec<i64> = (0..n).map(|t| fx.slot_of(s, t)).collect();
    if n > 3 {
        sm[2] = -1; // skipped page write
    }
    cpu::calibrate(&fx.layout, &fx.cfg, &mut fx.host.as_mut(), 1, &k, &v, &q, &sm).map_err(e2s)?;
    let ws = fx.ws(1)?;
    let (dk, dv, dq, dsm) = (
        upload_bytes(&fx.ctx, &kb)?,
        upload_bytes(&fx.ctx, &vb)?,
        upload_bytes(&fx.ctx, &qb)?,
        upload_bytes(&fx.ctx, &i64_bytes(&sm))?,
    );
    fx.ctx
        .calibrate(
            &fx.cfg,
            &fx.layout,
            &fx.dev.layer(),
            1,
            n as u32,
            dk.ptr(),
            dv.ptr(),
            nq as u32,
            dq.ptr(),
            dsm.ptr(),
            ws.ptr(),
            ws.bytes(),
            null(),
        )
        .map_err(e2s)?;
    let gpu = fx.dev.download(&fx.ctx, &fx.layout)?;
    cmp_layers(&fx, &gpu, &fx.host)
}

fn case_calibrate(rng: &mut Rng) -> R {
    let big = if quick() { 600 } else { 5000 };
    let runs: Vec<(u32, u32, usize, usize, bool)> = vec![
        (SIKV_DTYPE_F16, 128, 1, 1, false),
        (SIKV_DTYPE_F16, 128, 3, 2, false),
        (SIKV_DTYPE_F16, 64, 70, 5, false),
        (SIKV_DTYPE_BF16, 128, 300, 8, true),
        (SIKV_DTYPE_F16, 256, 1000, 16, false),
        (SIKV_DTYPE_BF16, 64, big, 32, false),
        (SIKV_DTYPE_F16, 128, big, 1, true),
    ];
    for (dtype, d, n, nq, mean) in runs {
        for (kb, vb) in [(2u32, 2u32), (4, 16)] {
            let mut s = base_shape(dtype, d, 2, 3);
            s.kbits = kb;
            s.vbits = vb;
            s.max_seq_len = 8192;
            s.page = 64;
            run_calibrate(rng, s, n, nq, |c| {
                if mean {
                    c.centre = SIKV_CENTRE_MEAN;
                }
            })
            .map_err(|e| format!("dtype {dtype} d {d} n {n} nq {nq} mean {mean} bits {kb}/{vb}: {e}"))?;
        }
    }
    // Parity profile: 64 heavy, no sinks / window.
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
    s.max_seq_len = 8192;
    run_calibrate(rng, s, 700, 1, |c| {
        c.n_sink = 0;
        c.n_heavy = 64;
        c.n_window = 0;
        c.flags = selfindexkv::config::SIKV_FLAG_PARITY_SIGN | selfindexkv::config::SIKV_FLAG_FORCE_GENERATED;
    })
    .map_err(|e| format!("parity: {e}"))
}

/// select + attend + attend_dense on a ragged batch: state built on the CPU (calibrate +
/// appends), copied to the device; GPU select vs CPU select; GPU attend vs CPU attend on the
/// CPU's indices; GPU attend_dense vs CPU attend_dense.
fn run_decode(rng: &mut Rng, shape: Shape, lens: &[usize], tweak: impl FnOnce(&mut SikvConfig)) -> R {
    let cfg = make_cfg(shape, tweak);
    let mut fx = Fx::new(cfg, rng)?;
    let which: Vec<usize> = (0..lens.len()).collect();
    for (i, &len) in lens.iter().enumerate() {
        let s = fx.add_seq(i as i32, len + 8)?;
        let prompt = (len * 3 / 4).max(1);
        fx.calibrate_cpu(rng, s, prompt, 4.min(prompt))?;
    }
    // Grow every sequence to its length with a few appends.
    loop {
        let grow: Vec<usize> = which.iter().copied().filter(|&s| fx.seqs[s].len < lens[s]).collect();
        if grow.is_empty() {
            break;
        }
        let per = grow.iter().map(|&s| lens[s] - fx.seqs[s].len).min().unwrap().min(97);
        fx.append_cpu(rng, &grow, per)?;
    }
    fx.dev.upload(&fx.ctx, &fx.host)?;
    let b = which.len();
    let slots: Vec<i32> = which.iter().map(|&s| fx.seqs[s].slot).collect();
    let t = fx.table(&which);
    let table = PageTable {
        indptr: &t.0,
        indices: &t.1,
        last_page_len: &t.2,
    };
    let (qb, q) = fx.q(rng, b);
    let (hkv, kmax) = (fx.cfg.num_kv_heads as usize, fx.cfg.budget.max as usize);
    let mut ci = vec![0i32; b * hkv * kmax];
    let mut cc = vec![0i32; b * hkv];
    cpu::select(
        &fx.layout,
        &fx.cfg,
        &fx.host.as_ref(),
        &table,
        &slots,
        &q,
        &mut ci,
        &mut cc,
    )
    .map_err(e2s)?;

    let (dt, _keep) = fx.dev_table(&t)?;
    let ws = fx.ws(b as u32)?;
    let dslots = upload_bytes(&fx.ctx, &i32_bytes(&slots))?;
    let dq = upload_bytes(&fx.ctx, &qb)?;
    let di = fx.ctx.alloc(4 * ci.len()).map_err(e2s)?;
    let dc = fx.ctx.alloc(4 * cc.len()).map_err(e2s)?;
    fx.ctx.memset_async(di.ptr(), 0xFF, di.bytes(), null()).map_err(e2s)?;
    fx.ctx.memset_async(dc.ptr(), 0xFF, dc.bytes(), null()).map_err(e2s)?;
    let layer = fx.dev.layer();
    fx.ctx
        .select(
            &fx.cfg,
            &fx.layout,
            &layer,
            &dt,
            dslots.ptr(),
            dq.ptr(),
            di.ptr(),
            dc.ptr(),
            ws.ptr(),
            ws.bytes(),
            null(),
        )
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    let mut gib = vec![0u8; di.bytes()];
    let mut gcb = vec![0u8; dc.bytes()];
    fx.ctx.copy_dtoh(&mut gib, di.ptr()).map_err(e2s)?;
    fx.ctx.copy_dtoh(&mut gcb, dc.ptr()).map_err(e2s)?;
    let (gi, gc) = (bytes_i32(&gib), bytes_i32(&gcb));
    cmp_select(&fx, &fx.host, &table, &slots, &q, &gi, &gc, &ci, &cc)?;

    // attend on the CPU's indices.
    let ci_dev = upload_bytes(&fx.ctx, &i32_bytes(&ci))?;
    let cc_dev = upload_bytes(&fx.ctx, &i32_bytes(&cc))?;
    let out_n = b * (fx.cfg.num_q_heads * fx.cfg.head_dim) as usize;
    let dout = fx.ctx.alloc(out_n * fx.dtype().size()).map_err(e2s)?;
    let mut cout = vec![0f32; out_n];
    cpu::attend(
        &fx.layout,
        &fx.cfg,
        &fx.host.as_ref(),
        &table,
        &slots,
        &q,
        &ci,
        &cc,
        &mut cout,
    )
    .map_err(e2s)?;
    fx.ctx
        .memset_async(dout.ptr(), 0xFF, dout.bytes(), null())
        .map_err(e2s)?;
    fx.ctx
        .attend(
            &fx.cfg,
            &fx.layout,
            &layer,
            &dt,
            dslots.ptr(),
            dq.ptr(),
            ci_dev.ptr(),
            cc_dev.ptr(),
            dout.ptr(),
            ws.ptr(),
            ws.bytes(),
            null(),
        )
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    let mut ob = vec![0u8; dout.bytes()];
    fx.ctx.copy_dtoh(&mut ob, dout.ptr()).map_err(e2s)?;
    cmp_out(&fx, "attend", &out_f32(&fx, &ob), &cout)?;

    // attend_dense.
    cpu::attend_dense(&fx.layout, &fx.cfg, &fx.host.as_ref(), &table, &slots, &q, &mut cout).map_err(e2s)?;
    fx.ctx
        .memset_async(dout.ptr(), 0xFF, dout.bytes(), null())
        .map_err(e2s)?;
    fx.ctx
        .attend_dense(
            &fx.cfg,
            &fx.layout,
            &layer,
            &dt,
            dslots.ptr(),
            dq.ptr(),
            dout.ptr(),
            ws.ptr(),
            ws.bytes(),
            null(),
        )
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    fx.ctx.copy_dtoh(&mut ob, dout.ptr()).map_err(e2s)?;
    cmp_out(&fx, "attend_dense", &out_f32(&fx, &ob), &cout)?;
    Ok(())
}

fn case_decode_matrix(rng: &mut Rng) -> R {
    let lens: Vec<usize> = if quick() {
        vec![70, 5, 301]
    } else {
        vec![70, 5, 1301, 777, 2049]
    };
    let mut runs = 0;
    for &dtype in &[SIKV_DTYPE_F16, SIKV_DTYPE_BF16] {
        for &d in &[64u32, 128, 256] {
            for &group in &[1u32, 2, 3, 4, 7, 8] {
                // Spread the other dimensions over the combinations instead of a full product.
                runs += 1;
                let page = [16u32, 64, 256][runs % 3];
                let (kb, vb) = [(2u32, 2u32), (4, 4), (16, 16), (2, 4)][runs % 4];
                if quick() && runs % 3 != 0 {
                    continue;
                }
                let mut s = base_shape(dtype, d, 2, group);
                s.kbits = kb;
                s.vbits = vb;
                s.page = page;
                s.max_seq_len = 4096;
                s.max_batch = lens.len() as u32;
                let two = runs % 2 == 0;
                let sign_sign = runs % 5 == 0;
                run_decode(rng, s, &lens, |c| {
                    c.rerank_factor = if two { 4 } else { 0 };
                    if sign_sign {
                        c.selector = selfindexkv::config::SIKV_SELECTOR_SIGN_SIGN;
                    }
                })
                .map_err(|e| format!("dtype {dtype} d {d} G {group} page {page} bits {kb}/{vb} two-stage {two} signsign {sign_sign}: {e}"))?;
            }
        }
    }
    Ok(())
}

fn case_decode_parity(rng: &mut Rng) -> R {
    // The reference profile: forced generated tokens (+inf ties), fixed k = 100, no window.
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
    s.max_batch = 2;
    run_decode(rng, s, &[900, 333], |c| {
        c.n_sink = 0;
        c.n_heavy = 64;
        c.n_window = 0;
        c.budget_ratio = 0.0;
        c.budget_min = 100;
        c.budget_max = 100;
        c.flags = selfindexkv::config::SIKV_FLAG_PARITY_SIGN | selfindexkv::config::SIKV_FLAG_FORCE_GENERATED;
    })
}

/// The NVRTC fallback end to end: a context whose kernels NVRTC compiled at create time
/// (SIKV_FORCE_NVRTC=1), checked like the fatbin ones on a small ragged batch.
fn case_nvrtc_fallback(rng: &mut Rng) -> R {
    std::env::set_var("SIKV_FORCE_NVRTC", "1");
    let mut s = base_shape(SIKV_DTYPE_BF16, 64, 2, 3);
    s.max_batch = 2;
    s.kbits = 4;
    s.page = 16;
    let cfg = make_cfg(s, |c| c.rerank_factor = 2);
    let layout = Layout::new(&cfg);
    let r = GpuContext::new(&cfg, &layout);
    let r = match r {
        Ok(ctx) if ctx.build_path() == "nvrtc" => run_decode(rng, s, &[300, 77], |c| c.rerank_factor = 2),
        Ok(ctx) => Err(format!("expected an NVRTC context, got {}", ctx.build_path())),
        Err(e) if e.message.contains("libnvrtc was not found") => {
            println!("    (skipped: libnvrtc not found on this machine)");
            Ok(())
        }
        Err(e) => Err(e2s(e)),
    };
    std::env::remove_var("SIKV_FORCE_NVRTC");
    r
}

fn case_long(rng: &mut Rng) -> R {
    let n = if quick() { 20_000 } else { 131_000 };
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 1, 4);
    s.max_seq_len = 140_000;
    s.max_batch = 1;
    s.page = 64;
    run_decode(rng, s, &[n], |c| {
        c.budget_max = 2048;
        c.budget_min = 128;
        c.budget_ratio = 0.02;
        c.rerank_factor = 4;
        c.n_heavy = 64;
        c.n_window = 64;
        c.max_append_tokens = 140_000;
    })
}

/// A whole decode step (append + select + attend for several layers) captured once into a
/// CUDA graph and replayed with new device-side inputs each step, against eager launches of
/// the same steps on a copy of the same state: outputs, indices and final pools bit-identical.
fn case_graph(rng: &mut Rng) -> R {
    let layers = 3;
    let steps = if quick() { 10 } else { 100 };
    let mut s = base_shape(SIKV_DTYPE_BF16, 128, 2, 4);
    s.max_batch = 3;
    s.page = 16;
    s.max_seq_len = 2048;
    let cfg = make_cfg(s, |c| c.rerank_factor = 2);
    let mut fx = Fx::new(cfg, rng)?;
    let lens = [200usize, 37, 513];
    for (i, &len) in lens.iter().enumerate() {
        let sidx = fx.add_seq(i as i32, len + steps + 1)?;
        fx.calibrate_cpu(rng, sidx, len, 2)?;
    }
    let b = lens.len();
    let which: Vec<usize> = (0..b).collect();
    // Per-layer pools: eager (A) and graph (B) copies of the same calibrated state.
    let mut a_pools = Vec::new();
    let mut b_pools = Vec::new();
    for _ in 0..layers {
        let a = DevPools::new(&fx.ctx, &fx.layout)?;
        let bp = DevPools::new(&fx.ctx, &fx.layout)?;
        a.upload(&fx.ctx, &fx.host)?;
        bp.upload(&fx.ctx, &fx.host)?;
        a_pools.push(a);
        b_pools.push(bp);
    }
    let cfg = fx.cfg.clone();
    let layout = fx.layout.clone();
    let ctx = &fx.ctx;
    let (hkv, hq, d, kmax) = (
        cfg.num_kv_heads as usize,
        cfg.num_q_heads as usize,
        cfg.head_dim as usize,
        cfg.budget.max as usize,
    );
    let es = cfg.dtype.size();
    // Fixed-address step inputs (capacity for the largest page table).
    let max_pages: usize = fx.seqs.iter().map(|s| s.pages.len()).sum();
    let mk = |bytes: usize| ctx.alloc(bytes.max(16)).map_err(e2s);
    let (ik, iv, iq) = (mk(b * hkv * d * es)?, mk(b * hkv * d * es)?, mk(b * hq * d * es)?);
    let (ism, islot, ipos) = (mk(8 * b)?, mk(4 * b)?, mk(4 * b)?);
    let (iptr, iidx, ilast) = (mk(4 * (b + 1))?, mk(4 * max_pages)?, mk(4 * b)?);
    let ws = mk(GpuContext::workspace_bytes(&cfg, &layout, b as u32))?;
    let out_bytes = b * hq * d * es;
    let mut outs_a = Vec::new();
    let mut outs_b = Vec::new();
    let mut idx_a = Vec::new();
    let mut idx_b = Vec::new();
    for _ in 0..layers {
        outs_a.push(mk(out_bytes)?);
        outs_b.push(mk(out_bytes)?);
        idx_a.push((mk(4 * b * hkv * kmax)?, mk(4 * b * hkv)?));
        idx_b.push((mk(4 * b * hkv * kmax)?, mk(4 * b * hkv)?));
    }
    let stream = ctx.create_stream().map_err(e2s)?;
    let st = stream.raw;
    let dt = DevPageTable {
        indptr: iptr.ptr(),
        indices: iidx.ptr(),
        last_page_len: ilast.ptr(),
        batch: b as u32,
    };
    let slot_dev = islot.ptr();
    let step =
        |pools: &[DevPools], outs: &[DeviceBuffer], idx: &[(DeviceBuffer, DeviceBuffer)]| -> selfindexkv::Result<()> {
            for l in 0..layers {
                let layer = pools[l].layer();
                ctx.append(
                    &cfg,
                    &layout,
                    &layer,
                    b as u32,
                    ik.ptr(),
                    iv.ptr(),
                    ism.ptr(),
                    slot_dev,
                    ipos.ptr(),
                    st,
                )?;
                ctx.select(
                    &cfg,
                    &layout,
                    &layer,
                    &dt,
                    slot_dev,
                    iq.ptr(),
                    idx[l].0.ptr(),
                    idx[l].1.ptr(),
                    ws.ptr(),
                    ws.bytes(),
                    st,
                )?;
                ctx.attend(
                    &cfg,
                    &layout,
                    &layer,
                    &dt,
                    slot_dev,
                    iq.ptr(),
                    idx[l].0.ptr(),
                    idx[l].1.ptr(),
                    outs[l].ptr(),
                    ws.ptr(),
                    ws.bytes(),
                    st,
                )?;
            }
            Ok(())
        };
    let graph = ctx.capture(st, || step(&b_pools, &outs_b, &idx_b)).map_err(e2s)?;
    for _ in 0..steps {
        // New token per sequence: slot mapping, positions, page table, k/v/q.
        let (sm, slots, pos) = fx.append_rows(&which, 1);
        for &sq in &which {
            fx.seqs[sq].len += 1;
        }
        let t = fx.table(&which);
        let ((kb, _), (vb, _)) = fx.kv(rng, b);
        let (qb, _) = fx.q(rng, b);
        let upload = |dst: &DeviceBuffer, bytes: &[u8]| ctx.copy_htod_async(dst.ptr(), bytes, st).map_err(e2s);
        let upload_all = || -> R {
            upload(&ik, &kb)?;
            upload(&iv, &vb)?;
            upload(&iq, &qb)?;
            upload(&ism, &i64_bytes(&sm))?;
            upload(&islot, &i32_bytes(&slots))?;
            upload(&ipos, &i32_bytes(&pos))?;
            upload(&iptr, &i32_bytes(&t.0))?;
            upload(&iidx, &i32_bytes(&t.1))?;
            upload(&ilast, &i32_bytes(&t.2))
        };
        upload_all()?;
        step(&a_pools, &outs_a, &idx_a).map_err(e2s)?;
        ctx.synchronize(st).map_err(e2s)?;
        upload_all()?;
        graph.launch(st).map_err(e2s)?;
        ctx.synchronize(st).map_err(e2s)?;
        for l in 0..layers {
            let mut oa = vec![0u8; out_bytes];
            let mut ob = vec![0u8; out_bytes];
            ctx.copy_dtoh(&mut oa, outs_a[l].ptr()).map_err(e2s)?;
            ctx.copy_dtoh(&mut ob, outs_b[l].ptr()).map_err(e2s)?;
            cmp_bytes(&format!("layer {l} output"), &ob, &oa)?;
            let mut ia = vec![0u8; 4 * b * hkv * kmax];
            let mut ib = vec![0u8; 4 * b * hkv * kmax];
            ctx.copy_dtoh(&mut ia, idx_a[l].0.ptr()).map_err(e2s)?;
            ctx.copy_dtoh(&mut ib, idx_b[l].0.ptr()).map_err(e2s)?;
            cmp_bytes(&format!("layer {l} indices"), &ib, &ia)?;
            if out_f32(&fx, &oa).iter().any(|x| !x.is_finite()) {
                return Err(format!("layer {l}: non-finite output"));
            }
        }
    }
    for l in 0..layers {
        let ga = a_pools[l].download(ctx, &layout)?;
        let gb = b_pools[l].download(ctx, &layout)?;
        cmp_layers(&fx, &gb, &ga).map_err(|e| format!("layer {l} pools after {steps} steps: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

type Case = (&'static str, fn(&mut Rng) -> R);

/// The NVRTC fallback compiles the embedded sources (no device needed; skipped without
/// libnvrtc).
#[test]
fn nvrtc_compiles_embedded_sources() {
    for (major, minor, only) in [(8, 0, Some((64u32, "bf16"))), (9, 0, Some((128, "f16")))] {
        match selfindexkv::gpu::nvrtc_check(major, minor, only) {
            Ok((bytes, desc)) => println!("nvrtc sm_{major}{minor} {only:?}: {bytes} bytes ({desc})"),
            Err(e) if e.message.contains("libnvrtc was not found") => {
                println!("nvrtc test skipped: libnvrtc not found (1 test)");
                return;
            }
            Err(e) => panic!("NVRTC compile for sm_{major}{minor} failed: {e}"),
        }
    }
}

#[test]
fn gpu() {
    let cases: Vec<Case> = vec![
        ("params_layout", case_params_layout),
        ("validation", case_validation),
        ("encode_bit_exact", case_encode),
        ("calibrate_bit_exact", case_calibrate),
        ("select_attend_matrix", case_decode_matrix),
        ("select_attend_parity", case_decode_parity),
        ("nvrtc_fallback", case_nvrtc_fallback),
        ("long_sequence", case_long),
        ("cuda_graph_replay", case_graph),
    ];
    let probe = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
    match GpuContext::new(&probe, &Layout::new(&probe)) {
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => {
            println!("gpu tests skipped: no CUDA device ({} tests)", cases.len());
            return;
        }
        Err(e) => panic!("CUDA device present but unusable: {e}"),
        Ok(ctx) => println!(
            "gpu tests on {:?}, kernels from {}",
            ctx.device_info(),
            ctx.build_path()
        ),
    }
    let seed = std::env::var("SIKV_GPU_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!(
        "seed {seed} (SIKV_GPU_TEST_SEED={seed} replays it){}",
        if quick() { ", quick sizes" } else { "" }
    );
    // SIKV_GPU_TEST_ONLY=a,b runs the cases whose names contain a or b.
    let only: Vec<String> = std::env::var("SIKV_GPU_TEST_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    let mut failed = Vec::new();
    let mut passed = 0;
    for (i, (name, f)) in cases.iter().enumerate() {
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let mut rng = Rng(seed ^ (0x1234_5678_9abc_def0u64.wrapping_mul(i as u64 + 1)));
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut rng)));
        let secs = t0.elapsed().as_secs_f32();
        match r {
            Ok(Ok(())) => {
                passed += 1;
                println!("  ok    {name} ({secs:.1} s)");
            }
            Ok(Err(e)) => {
                println!("  FAIL  {name} ({secs:.1} s): {e}");
                failed.push(name.to_string());
            }
            Err(_) => {
                println!("  PANIC {name} ({secs:.1} s)");
                failed.push(name.to_string());
            }
        }
    }
    println!("gpu tests: {passed} passed, {} failed", failed.len());
    assert!(failed.is_empty(), "failed GPU cases: {failed:?} (seed {seed})");
}
