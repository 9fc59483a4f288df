//! GPU benchmark: score, top-k, rerank, attend, the full select + attend step, and our own dense
//! decode (attend_dense), at N = 8K / 32K / 128K tokens, d = 128, 2+1 bits, G = 4 (32 query /
//! 8 KV heads), batch 1..8. CUDA events around each launch, 10 warm-up launches, the median of
//! at least 50 timed ones. Bandwidth is reported over the bytes each kernel must move (method §10.6
//! traffic model), so it reads as a fraction of HBM peak.
//!
//! Usage: gpu_bench [--csv PATH] [--quick] [--iters N] [--n N1,N2,..] [--batch B1,B2,..]
//! [--rows R1,R2,..] [--profile 2+1|4+1] [--kept S,H,W] [--only ROW1,ROW2,..]
//! (--n / --batch replace the default sizes; --profile picks the storage profile, 2+1 by default; SIKV_TOPK=single times the one-CTA top-k;
//! --rows adds the select + attend step with R query rows per sequence, selected per row
//! (`step_rows<R>`) and from the rows' mean query (`step_mean<R>`), to set against R one-row
//! steps; --kept sets n_sink, n_heavy and n_window, the kept dense entries, to see what their splits
//! cost; --only times just the rows named, e.g. `dense_ours,step`)
//! Prints a table and writes CSV rows:
//! kernel,N,batch,d,G,hkv,median_us,p10_us,p90_us,bytes,GBps,k,graph_us,cold_us
//!
//! Three timings per row. `median_us`: events around one eager call, so it includes the host's
//! launch submissions (what an engine without graphs sees, and how the SDPA baseline is timed).
//! `graph_us`: GRAPH_REPS back-to-back copies of the call captured into one CUDA graph,
//! replayed, divided by GRAPH_REPS (median of replays): the device time of the call under graph
//! capture, which is how decode steps run in engines that capture them.
//! `cold_us`: as `graph_us`, but each copy of the call follows a write of FLUSH_BYTES (more than
//! twice the L2 of an H100 or H200), so it finds none of its data in L2, as a layer's call does in
//! a model whose other layers run between its steps; `graph_us` replays the same call's data,
//! which at batch 1 largely fits L2. It is the graph of flushes and calls less the graph of the
//! flushes alone (the median of each). Empty for the rows that do not time it.
//! `dense_live` is the dense decode as a managed cache launches it, its grid sized from the live
//! length N instead of max_seq_len (--max-seq-len): that sizing is for eager calls only, so its
//! `graph_us` is `dense_ours`' grid and only its `median_us` differs.
//! Without a CUDA device it prints one line and exits 0.

use std::io::Write;

use selfindexkv::config::{
    CacheConfig, Route, SikvConfig, SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, SIKV_PROFILE_2_1, SIKV_PROFILE_4_1,
};
use selfindexkv::gpu::{
    DevBatch, DevLayer, DevPageTable, DevPrompt, DevRows, DevSelection, DeviceBuffer, GpuContext, Predecessor,
    TopkPath, SELECT_ALL, SELECT_RERANK, SELECT_SCORE, SELECT_TOPK, SELECT_TOPK_FINAL,
};
use selfindexkv::layout::{Layout, SIKV_NUM_PLANES};
use selfindexkv::status::SikvStatus;

type R<T = ()> = Result<T, String>;

fn e2s(e: selfindexkv::Error) -> String {
    format!("{e}")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// fp16 bits of a roughly normal value (sum of four uniforms), with a per-channel offset.
    fn half(&mut self, offset: f32) -> [u8; 2] {
        let r = self.next();
        let s: f32 = (0..4).map(|i| ((r >> (16 * i)) & 0xffff) as f32 / 65536.0).sum::<f32>() - 2.0;
        half::f16::from_f32(s * 1.7 + offset).to_le_bytes()
    }
}

fn null() -> selfindexkv::gpu::CUstream {
    std::ptr::null_mut()
}

fn median_us(mut v: Vec<f32>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 * 1000.0;
    (at(0.5), at(0.1), at(0.9))
}

struct Setup {
    cfg: CacheConfig,
    layout: Layout,
    ctx: GpuContext,
    _planes: Vec<DeviceBuffer>,
    _state: DeviceBuffer,
    layer: DevLayer,
    batch: DevBatch,
    _bufs: Vec<DeviceBuffer>,
    indices: DeviceBuffer,
    counts: DeviceBuffer,
    out: DeviceBuffer,
    ws: DeviceBuffer,
}

/// The storage profile of every configuration (`--profile`), set once in main.
static PROFILE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
/// n_sink, n_heavy, n_window (`--kept`) in place of the profile's, set once in main.
static KEPT: std::sync::OnceLock<Option<[u32; 3]>> = std::sync::OnceLock::new();
/// --only: the rows to time (None: every row).
static ONLY: std::sync::OnceLock<Option<Vec<String>>> = std::sync::OnceLock::new();
/// The rows `run` can time (`routed` only where the crossover reads live lengths), which --only
/// names.
const ROW_NAMES: [&str; 9] = [
    "score",
    "topk",
    "rerank",
    "select",
    "attend",
    "step",
    "dense_ours",
    "dense_live",
    "routed",
];

/// `msl`: the configured max_seq_len when above `n` (an engine that declares a long maximum and
/// decodes shorter sequences).
fn make_cfg(n: u32, msl: u32, batch: u32) -> CacheConfig {
    let mut c = SikvConfig::for_profile(*PROFILE.get_or_init(|| SIKV_PROFILE_2_1)).unwrap();
    c.device = SIKV_DEVICE_CUDA;
    c.dtype = SIKV_DTYPE_F16;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.page_size = 64;
    c.max_seq_len = n.max(msl);
    c.max_batch = batch;
    c.max_seqs = batch;
    c.max_append_tokens = n;
    if let Some([sink, heavy, window]) = KEPT.get().copied().flatten() {
        (c.n_sink, c.n_heavy, c.n_window) = (sink, heavy, window);
    }
    CacheConfig::from_c(&c).unwrap()
}

fn upload(ctx: &GpuContext, bytes: &[u8]) -> R<DeviceBuffer> {
    let b = ctx.alloc(bytes.len().max(16)).map_err(e2s)?;
    ctx.copy_htod_async(b.ptr(), bytes, null()).map_err(e2s)?;
    Ok(b)
}

fn i32b(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Pools, calibrated sequences of length n (GPU calibrate), page table, q, outputs, workspace.
fn setup(n: u32, msl: u32, batch: u32, kv: &(DeviceBuffer, DeviceBuffer), rng: &mut Rng) -> R<Setup> {
    let cfg = make_cfg(n, msl, batch);
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
    let mut planes = Vec::new();
    let mut lp = [0u64; SIKV_NUM_PLANES];
    for (p, base) in lp.iter_mut().enumerate() {
        if layout.plane_bytes[p] > 0 {
            let b = ctx.alloc(layout.plane_bytes[p]).map_err(e2s)?;
            *base = b.ptr();
            planes.push(b);
        }
    }
    let state = ctx.alloc(layout.layer_state_bytes).map_err(e2s)?;
    ctx.memset_async(state.ptr(), 0, layout.layer_state_bytes, null())
        .map_err(e2s)?;
    let layer = DevLayer {
        planes: lp,
        state: state.ptr(),
    };
    let ws_bytes = GpuContext::workspace_bytes(&cfg, &layout, batch);
    let ws = ctx.alloc(ws_bytes).map_err(e2s)?;
    // Pages: a shuffled permutation of the pool.
    let p = cfg.page_size as usize;
    let ppseq = (n as usize).div_ceil(p);
    let mut perm: Vec<i32> = (0..layout.num_pages as i32).collect();
    for i in (1..perm.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    let mut bufs = Vec::new();
    let hq_d = (cfg.num_q_heads * cfg.head_dim) as usize;
    let qrow: Vec<u8> = (0..hq_d).flat_map(|_| rng.half(0.0)).collect();
    let dq_tail = upload(&ctx, &qrow)?;
    for b in 0..batch as usize {
        let pages = &perm[b * ppseq..(b + 1) * ppseq];
        let sm: Vec<u8> = (0..n as usize)
            .flat_map(|t| (pages[t / p] as i64 * p as i64 + (t % p) as i64).to_le_bytes())
            .collect();
        let dsm = upload(&ctx, &sm)?;
        let prompt = DevPrompt {
            seq_slot: b as u32,
            n_tokens: n,
            k: kv.0.ptr(),
            v: kv.1.ptr(),
            n_query: 1,
            q_tail: dq_tail.ptr(),
            slot_mapping: dsm.ptr(),
        };
        ctx.calibrate(&cfg, &layout, &layer, &prompt, ws.as_workspace(), null())
            .map_err(e2s)?;
        ctx.synchronize(null()).map_err(e2s)?;
    }
    let mut indptr = vec![0i32];
    let mut idx = Vec::new();
    let mut last = Vec::new();
    for b in 0..batch as usize {
        idx.extend_from_slice(&perm[b * ppseq..(b + 1) * ppseq]);
        indptr.push(idx.len() as i32);
        last.push((n as usize - (ppseq - 1) * p) as i32);
    }
    let (a, i, l) = (
        upload(&ctx, &i32b(&indptr))?,
        upload(&ctx, &i32b(&idx))?,
        upload(&ctx, &i32b(&last))?,
    );
    let table = DevPageTable {
        indptr: a.ptr(),
        indices: i.ptr(),
        last_page_len: l.ptr(),
        batch,
    };
    let slots: Vec<i32> = (0..batch as i32).collect();
    let ds = upload(&ctx, &i32b(&slots))?;
    let qb: Vec<u8> = (0..batch as usize * hq_d).flat_map(|_| rng.half(0.0)).collect();
    let dq = upload(&ctx, &qb)?;
    let hkv = cfg.num_kv_heads as usize;
    let indices = ctx
        .alloc(4 * batch as usize * hkv * cfg.budget.max as usize)
        .map_err(e2s)?;
    let counts = ctx.alloc(4 * batch as usize * hkv).map_err(e2s)?;
    let out = ctx.alloc(2 * batch as usize * hq_d).map_err(e2s)?;
    let (ds_ptr, dq_ptr) = (ds.ptr(), dq.ptr());
    bufs.extend([a, i, l, ds, dq, dq_tail]);
    ctx.synchronize(null()).map_err(e2s)?;
    Ok(Setup {
        cfg,
        layout,
        ctx,
        _planes: planes,
        _state: state,
        layer,
        batch: DevBatch {
            table,
            seq_slot: ds_ptr,
            q: dq_ptr,
            rows: None,
        },
        _bufs: bufs,
        indices,
        counts,
        out,
        ws,
    })
}

type Call<'a> = dyn Fn(selfindexkv::gpu::CUstream) -> selfindexkv::Result<()> + 'a;

fn time(s: &Setup, warm: usize, iters: usize, f: &Call) -> R<(f64, f64, f64)> {
    for _ in 0..warm {
        f(null()).map_err(e2s)?;
    }
    s.ctx.synchronize(null()).map_err(e2s)?;
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        v.push(s.ctx.time_ms(null(), || f(null())).map_err(e2s)?);
    }
    Ok(median_us(v))
}

/// Copies of the call per captured graph (see the module comment).
const GRAPH_REPS: usize = 20;
/// Bytes written ahead of each copy of the call for `cold_us`.
const FLUSH_BYTES: usize = 128 << 20;

/// One copy of a timed graph's body: copy `i` of GRAPH_REPS, enqueued on the capture stream.
type Rep<'a> = dyn Fn(usize, selfindexkv::gpu::CUstream) -> selfindexkv::Result<()> + 'a;

/// Median device time per copy (us) of each graph of GRAPH_REPS copies of a body, the graphs
/// warmed up and then timed in turn (so drift reaches each alike).
fn time_reps(s: &Setup, iters: usize, bodies: &[&Rep]) -> R<Vec<f64>> {
    let st = s.ctx.create_stream().map_err(e2s)?;
    let graphs = bodies
        .iter()
        .map(|body| {
            s.ctx
                .capture(st.raw, || (0..GRAPH_REPS).try_for_each(|i| body(i, st.raw)))
                .map_err(e2s)
        })
        .collect::<R<Vec<_>>>()?;
    for _ in 0..3 {
        for g in &graphs {
            g.launch(st.raw).map_err(e2s)?;
        }
    }
    s.ctx.synchronize(st.raw).map_err(e2s)?;
    let mut v = vec![Vec::with_capacity(iters); graphs.len()];
    for _ in 0..iters {
        for (g, v) in graphs.iter().zip(&mut v) {
            v.push(s.ctx.time_ms(st.raw, || g.launch(st.raw)).map_err(e2s)? / GRAPH_REPS as f32);
        }
    }
    s.ctx.synchronize(st.raw).map_err(e2s)?;
    Ok(v.into_iter().map(|v| median_us(v).0).collect())
}

/// Median device time of one call when GRAPH_REPS copies run from one CUDA graph (us).
fn time_graph(s: &Setup, iters: usize, f: &Call) -> R<f64> {
    Ok(time_reps(s, iters, &[&|_, st| f(st)])?[0])
}

/// Median device time of one call (us) that finds its data out of L2: GRAPH_REPS copies of
/// (flush, call) in one graph, less GRAPH_REPS flushes alone.
fn time_cold(s: &Setup, flush: &DeviceBuffer, iters: usize, f: &Call) -> R<f64> {
    let wipe = |i: usize, st| s.ctx.memset_async(flush.ptr(), i as u8, FLUSH_BYTES, st);
    let t = time_reps(s, iters, &[&|i, st| wipe(i, st).and_then(|_| f(st)), &wipe])?;
    Ok(t[0] - t[1])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // A flag's value, or None when the flag is absent; a flag without a value is refused.
    let value = |flag: &str| -> Option<&String> {
        let i = args.iter().position(|a| a == flag)?;
        Some(args.get(i + 1).unwrap_or_else(|| {
            eprintln!("gpu bench: {flag} takes a value");
            std::process::exit(2);
        }))
    };
    let csv_path = value("--csv").cloned();
    let iters: usize = value("--iters").map_or(60, |s| {
        s.trim().parse().unwrap_or_else(|_| {
            eprintln!("gpu bench: --iters takes a count, not {s}");
            std::process::exit(2);
        })
    });
    let profile = match value("--profile") {
        None => SIKV_PROFILE_2_1,
        Some(p) if p == "2+1" => SIKV_PROFILE_2_1,
        Some(p) if p == "4+1" => SIKV_PROFILE_4_1,
        Some(p) => {
            eprintln!("gpu bench: --profile takes 2+1 or 4+1, not {p}");
            std::process::exit(2);
        }
    };
    PROFILE.set(profile).expect("profile set once");
    // A comma-separated list of counts; an entry that is not one is refused, not dropped.
    let list = |flag: &str| -> Option<Vec<u32>> {
        let v = value(flag)?;
        Some(
            v.split(',')
                .map(|x| {
                    x.trim().parse().unwrap_or_else(|_| {
                        eprintln!("gpu bench: {flag} takes counts separated by commas, not {v}");
                        std::process::exit(2);
                    })
                })
                .collect(),
        )
    };
    let kept = list("--kept").map(|k| {
        <[u32; 3]>::try_from(k).unwrap_or_else(|_| {
            eprintln!("gpu bench: --kept takes three counts S,H,W");
            std::process::exit(2);
        })
    });
    KEPT.set(kept).expect("kept set once");
    let only: Option<Vec<String>> = value("--only").map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
    if let Some(bad) = only.iter().flatten().find(|o| !ROW_NAMES.contains(&o.as_str())) {
        eprintln!("gpu bench: --only takes rows of {ROW_NAMES:?}, not {bad}");
        std::process::exit(2);
    }
    ONLY.set(only).expect("only set once");
    let probe = make_cfg(1024, 0, 1);
    match GpuContext::new(&probe, &Layout::new(&probe)) {
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => {
            println!("gpu bench skipped: no CUDA device");
            return;
        }
        Err(e) => {
            eprintln!("gpu bench: {e}");
            std::process::exit(1);
        }
        Ok(ctx) => println!(
            "gpu bench on {:?}, kernels from {}, top-k {:?}, profile {}, fused select forced {}, resident clusters by size {:?}, final select's {:?}",
            ctx.device_info(),
            ctx.build_path(),
            ctx.topk_path(),
            if profile == SIKV_PROFILE_4_1 { "4+1" } else { "2+1" },
            ctx.fused_select().0,
            &ctx.fused_select().1[1..],
            &ctx.final_select_clusters()[1..],
        ),
    }
    let msl = list("--max-seq-len").and_then(|v| v.first().copied()).unwrap_or(0);
    let rows = list("--rows").unwrap_or_default();
    if let Err(e) = run(quick, iters, csv_path, list("--n"), list("--batch"), msl, &rows) {
        eprintln!("gpu bench failed: {e}");
        std::process::exit(1);
    }
}

fn run(
    quick: bool,
    iters: usize,
    csv_path: Option<String>,
    ns: Option<Vec<u32>>,
    batches: Option<Vec<u32>>,
    msl: u32,
    query_rows: &[u32],
) -> R {
    let ns: Vec<u32> = ns.unwrap_or(if quick { vec![8192] } else { vec![8192, 32768, 131072] });
    let batches: Vec<u32> = batches.unwrap_or(if quick { vec![1, 2] } else { vec![1, 2, 4, 8] });
    let mut csv = String::from("kernel,N,batch,d,G,hkv,median_us,p10_us,p90_us,bytes,GBps,k,graph_us,cold_us\n");
    let mut rng = Rng(0x9e3779b97f4a7c15);
    println!(
        "{:<10} {:>7} {:>3} {:>10} {:>10} {:>9} {:>6} {:>9} {:>9}",
        "kernel", "N", "B", "median_us", "MB", "GB/s", "k", "graph_us", "cold_us"
    );
    for &n in &ns {
        // One prompt's k / v (n x 8 x 128 fp16), shared by every sequence of the batch.
        let probe = make_cfg(n, msl, 1);
        let ctx0 = GpuContext::new(&probe, &Layout::new(&probe)).map_err(e2s)?;
        let m = n as usize * 8 * 128;
        let offs: Vec<f32> = (0..128).map(|c| ((c * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let kb: Vec<u8> = (0..m).flat_map(|i| rng.half(offs[i % 128])).collect();
        let vb: Vec<u8> = (0..m).flat_map(|_| rng.half(0.0)).collect();
        let kv = (upload(&ctx0, &kb)?, upload(&ctx0, &vb)?);
        drop((kb, vb));
        for &b in &batches {
            let s = setup(n, msl, b, &kv, &mut rng)?;
            let flush = s.ctx.alloc(FLUSH_BYTES).map_err(e2s)?;
            let cfg = &s.cfg;
            let (hkv, d) = (cfg.num_kv_heads as u64, cfg.head_dim as u64);
            let heads = hkv * b as u64;
            let selection = DevSelection {
                indices: s.indices.ptr(),
                counts: s.counts.ptr(),
            };
            let ws = s.ws.as_workspace();
            let sel = |stages: u32, st: selfindexkv::gpu::CUstream| {
                s.ctx
                    .select_stages(stages, cfg, &s.layout, &s.layer, &s.batch, selection, ws, st)
            };
            // `step` is select then attend on one stream, as the library's decode runs it;
            // `attend` alone follows another attend.
            let att = |st: selfindexkv::gpu::CUstream, before: Predecessor| {
                let out = s.out.ptr();
                s.ctx
                    .attend_after(cfg, &s.layout, &s.layer, &s.batch, selection, out, ws, st, before)
            };
            let dense = |st: selfindexkv::gpu::CUstream| {
                s.ctx
                    .attend_dense(cfg, &s.layout, &s.layer, &s.batch, s.out.ptr(), ws, None, st)
            };
            // A managed cache's dense decode: the grid sized from the live length (eager calls
            // only; under the graph capture it is dense_ours' grid).
            let dense_live = |st: selfindexkv::gpu::CUstream| {
                let out = s.out.ptr();
                s.ctx
                    .attend_dense(cfg, &s.layout, &s.layer, &s.batch, out, ws, Some(n), st)
            };
            // The stateless decode's crossover, decided on the device from the live lengths:
            // timed only where the library's decode takes it (Crossover::route; elsewhere the
            // call runs the sparse or the dense decode directly).
            let live_route = match cfg.dense_crossover.route(b, cfg.max_seq_len) {
                Route::Live(m) => Some(m),
                Route::Sparse | Route::Dense => None,
            };
            let max_tokens = live_route.unwrap_or(0);
            let routed = |st: selfindexkv::gpu::CUstream| {
                s.ctx.decode_routed(
                    cfg,
                    &s.layout,
                    &s.layer,
                    &s.batch,
                    selection,
                    s.out.ptr(),
                    ws,
                    max_tokens,
                    st,
                )
            };
            sel(SELECT_ALL, null()).map_err(e2s)?;
            s.ctx.synchronize(null()).map_err(e2s)?;
            let mut cb = vec![0u8; s.counts.bytes()];
            s.ctx.copy_dtoh(&mut cb, s.counts.ptr()).map_err(e2s)?;
            let k = i32::from_le_bytes(cb[0..4].try_into().unwrap()) as u64;
            let nn = n as u64;
            let dense_set = cfg.dense_capacity() as u64;
            let c1 = (cfg.rerank_factor.max(1) as u64 * k).min(nn);
            let row = s.layout.bytes_per_token() as u64; // 112 at d = 128, 2+1
            let sign = d / 8;
            let kbytes = sign + d * cfg.key_bits as u64 / 8 + d / 32 * 4; // sign + kmag + kpar
            let fp16_tok = 4 * d; // K + V fp16
            let bytes_score = heads * (sign + 4) * nn;
            let bytes_topk = heads * 4 * nn;
            let bytes_rerank = heads * c1 * (kbytes + 4);
            let bytes_attend = heads * (fp16_tok * dense_set + row * k);
            let bytes_step = bytes_score + bytes_topk + bytes_rerank + bytes_attend;
            let bytes_dense = heads * (row * nn + fp16_tok * dense_set);
            let mut rows: Vec<(&str, u64, Box<Call>)> = vec![
                ("score", bytes_score, Box::new(move |st| sel(SELECT_SCORE, st))),
                ("topk", bytes_topk, Box::new(move |st| sel(SELECT_TOPK, st))),
                ("rerank", bytes_rerank, Box::new(move |st| sel(SELECT_RERANK, st))),
                (
                    "select",
                    bytes_score + bytes_topk + bytes_rerank,
                    Box::new(move |st| sel(SELECT_ALL, st)),
                ),
                ("attend", bytes_attend, Box::new(move |st| att(st, Predecessor::Other))),
                (
                    "step",
                    bytes_step,
                    Box::new(move |st| {
                        sel(SELECT_ALL, st)?;
                        att(st, Predecessor::Select)
                    }),
                ),
                ("dense_ours", bytes_dense, Box::new(dense)),
                ("dense_live", bytes_dense, Box::new(dense_live)),
            ];
            if live_route.is_some() {
                let bytes = if cfg.dense_crossover.dense(b, nn * b as u64) {
                    bytes_dense
                } else {
                    bytes_step
                };
                rows.push(("routed", bytes, Box::new(routed)));
            }
            assert!(
                rows.iter().all(|(name, _, _)| ROW_NAMES.contains(name)),
                "a row missing from ROW_NAMES"
            );
            if let Some(Some(only)) = ONLY.get() {
                rows.retain(|(name, _, _)| only.iter().any(|o| o == name));
            }
            for (name, bytes, f) in rows.iter() {
                if *name == "rerank" && s.ctx.topk_path() != TopkPath::Single {
                    // The multi-CTA top-k's last kernel alone (after one full top-k: candidates
                    // and counter in place); compact + launch gaps = topk - topk_final.
                    sel(SELECT_TOPK | SELECT_TOPK_FINAL, null()).map_err(e2s)?;
                    let (med, p10, p90) = time(&s, 10, iters.max(50), &|st| sel(SELECT_TOPK_FINAL, st))?;
                    let gus = time_graph(&s, 20, &|st| sel(SELECT_TOPK_FINAL, st))?;
                    println!(
                        "{:<10} {:>7} {:>3} {:>10.1} {:>10} {:>9} {:>6} {:>9.1}",
                        "topk_final", n, b, med, "-", "-", k, gus
                    );
                    csv.push_str(&format!(
                        "topk_final,{n},{b},{d},{},{hkv},{med:.2},{p10:.2},{p90:.2},0,0,{k},{gus:.2},\n",
                        cfg.group_size()
                    ));
                    // Counter now far above the candidate count: this final falls back, then
                    // resets it.
                    sel(SELECT_TOPK, null()).map_err(e2s)?;
                }
                let (med, p10, p90) = time(&s, 10, iters.max(50), f.as_ref())?;
                let gus = time_graph(&s, 20, f.as_ref())?;
                let cold = time_cold(&s, &flush, 20, f.as_ref())?;
                let gbps = *bytes as f64 / (med * 1e-6) / 1e9;
                println!(
                    "{:<10} {:>7} {:>3} {:>10.1} {:>10.2} {:>9.1} {:>6} {:>9.1} {:>9.1}",
                    name,
                    n,
                    b,
                    med,
                    *bytes as f64 / 1e6,
                    gbps,
                    k,
                    gus,
                    cold
                );
                csv.push_str(&format!(
                    "{name},{n},{b},{d},{},{hkv},{med:.2},{p10:.2},{p90:.2},{bytes},{gbps:.1},{k},{gus:.2},{cold:.2}\n",
                    cfg.group_size()
                ));
            }
            for &nr in query_rows {
                csv.push_str(&time_rows(&s, n, b, nr, k, iters, &mut rng)?);
            }
            let _ = std::io::stdout().flush();
        }
    }
    if let Some(p) = csv_path {
        std::fs::write(&p, csv).map_err(|e| format!("writing {p}: {e}"))?;
        println!("wrote {p}");
    }
    Ok(())
}

/// The select + attend step with `nr` query rows for each of the `b` sequences (their last `nr`
/// tokens), selected per row and from the rows' mean query; CSV rows `step_rows<nr>` and
/// `step_mean<nr>` (bytes not modelled: 0).
fn time_rows(s: &Setup, n: u32, b: u32, nr: u32, k: u64, iters: usize, rng: &mut Rng) -> R<String> {
    let cfg = &s.cfg;
    let total = b * nr;
    let hq_d = (cfg.num_q_heads * cfg.head_dim) as usize;
    let hkv = cfg.num_kv_heads as usize;
    let offsets: Vec<i32> = (0..=b).map(|i| (i * nr) as i32).collect();
    let doff = upload(&s.ctx, &i32b(&offsets))?;
    let qb: Vec<u8> = (0..total as usize * hq_d).flat_map(|_| rng.half(0.0)).collect();
    let dq = upload(&s.ctx, &qb)?;
    let indices = s
        .ctx
        .alloc(4 * total as usize * hkv * cfg.budget.max as usize)
        .map_err(e2s)?;
    let counts = s.ctx.alloc(4 * total as usize * hkv).map_err(e2s)?;
    let out = s.ctx.alloc(2 * total as usize * hq_d).map_err(e2s)?;
    let ws = s
        .ctx
        .alloc(GpuContext::workspace_bytes(cfg, &s.layout, total))
        .map_err(e2s)?;
    let sel = DevSelection {
        indices: indices.ptr(),
        counts: counts.ptr(),
    };
    s.ctx.synchronize(null()).map_err(e2s)?;
    let mut csv = String::new();
    for mean in [false, true] {
        let batch = DevBatch {
            q: dq.ptr(),
            rows: Some(DevRows {
                offsets: doff.ptr(),
                n: total,
                mean,
            }),
            ..s.batch
        };
        let step = |st: selfindexkv::gpu::CUstream| {
            let w = ws.as_workspace();
            s.ctx
                .select_stages(SELECT_ALL, cfg, &s.layout, &s.layer, &batch, sel, w, st)?;
            s.ctx.attend_after(
                cfg,
                &s.layout,
                &s.layer,
                &batch,
                sel,
                out.ptr(),
                w,
                st,
                Predecessor::Select,
            )
        };
        let (med, p10, p90) = time(s, 10, iters.max(50), &step)?;
        let gus = time_graph(s, 20, &step)?;
        s.ctx.take_fault().map_err(e2s)?;
        let name = format!("step_{}{nr}", if mean { "mean" } else { "rows" });
        println!(
            "{:<10} {:>7} {:>3} {:>10.1} {:>10} {:>9} {:>6} {:>9.1}",
            name, n, b, med, "-", "-", k, gus
        );
        csv.push_str(&format!(
            "{name},{n},{b},{},{},{hkv},{med:.2},{p10:.2},{p90:.2},0,0,{k},{gus:.2},\n",
            cfg.head_dim,
            cfg.group_size()
        ));
    }
    Ok(csv)
}
