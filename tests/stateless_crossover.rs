//! The stateless decode's dense crossover on the CPU device: up to LIVE_CROSSOVER_MAX_BATCH
//! sequences it applies to the live lengths of the call's sequences, not to
//! `batch * max_seq_len` (an engine declares a long maximum and decodes shorter sequences);
//! above that batch, to the declared bound. The GPU twin, with a captured graph, is in
//! tests/gpu_abi.rs.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr::null_mut;

mod common;

use common::Rng;
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::SikvStatus::{self, *};

const D: usize = 64;
const HQ: usize = 4;
const HK: usize = 2;
const PAGE: usize = 16;
const MAX_LEN: usize = 256;

fn ok(st: SikvStatus, what: &str) {
    assert_eq!(st, SIKV_OK, "{what}: {}", last_error_message());
}

fn acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.range(-1.0, 1.0) + 1e-3).collect()
}

fn vp(x: &[f32]) -> *const c_void {
    x.as_ptr() as *const c_void
}

fn config(crossover: u32, seqs: u32) -> SikvConfig {
    let mut c = MaybeUninit::<SikvConfig>::uninit();
    ok(sikv_config_init(c.as_mut_ptr(), SIKV_PROFILE_2_1), "config_init");
    let mut c = unsafe { c.assume_init() };
    c.device = SIKV_DEVICE_CPU;
    c.dtype = SIKV_DTYPE_F32;
    c.num_layers = 1;
    c.num_q_heads = HQ as u32;
    c.num_kv_heads = HK as u32;
    c.head_dim = D as u32;
    c.page_size = PAGE as u32;
    c.max_seqs = seqs;
    c.max_batch = seqs;
    c.max_seq_len = MAX_LEN as u32;
    c.max_append_tokens = MAX_LEN as u32;
    c.n_sink = 2;
    c.n_heavy = 4;
    c.n_window = 8;
    c.budget_min = 8;
    c.budget_max = 16;
    c.dense_crossover = crossover;
    c
}

struct Kernels(*mut SikvKernels);
impl Kernels {
    fn new(c: &SikvConfig) -> Kernels {
        let mut k = null_mut();
        ok(sikv_kernels_create(c, &mut k), "kernels_create");
        Kernels(k)
    }
}
impl Drop for Kernels {
    fn drop(&mut self) {
        sikv_kernels_destroy(self.0);
    }
}

/// Slot s owns pages s * pages_per_seq..; its position p is page s * pps + p / PAGE.
fn slot_of(s: usize, p: usize) -> i64 {
    let pps = MAX_LEN.div_ceil(PAGE);
    ((s * pps + p / PAGE) * PAGE + p % PAGE) as i64
}

fn table(lens: &[usize]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let pps = MAX_LEN.div_ceil(PAGE);
    let (mut indptr, mut indices, mut last) = (vec![0i32], Vec::new(), Vec::new());
    for (s, &l) in lens.iter().enumerate() {
        let np = l.div_ceil(PAGE);
        indices.extend((0..np).map(|i| (s * pps + i) as i32));
        indptr.push(indices.len() as i32);
        last.push((l - (np - 1) * PAGE) as i32);
    }
    (indptr, indices, last)
}

type Call = extern "C" fn(
    *const SikvKernels,
    *const SikvLayerPools,
    *const SikvPageTable,
    *const i32,
    *const c_void,
    *mut c_void,
    *mut c_void,
    usize,
    SikvStream,
) -> SikvStatus;

fn run(call: Call, k: &Kernels, pools: &SikvLayerPools, lens: &[usize], q: &[f32]) -> Vec<u8> {
    let (indptr, indices, last) = table(lens);
    let pt = SikvPageTable {
        indptr: indptr.as_ptr(),
        indices: indices.as_ptr(),
        last_page_len: last.as_ptr(),
        batch: lens.len() as u32,
    };
    let slots: Vec<i32> = (0..lens.len() as i32).collect();
    let mut out = vec![0xA5u8; q.len() * 4];
    let s = call(
        k.0,
        pools,
        &pt,
        slots.as_ptr(),
        vp(q),
        out.as_mut_ptr() as *mut c_void,
        null_mut(),
        0,
        null_mut(),
    );
    ok(s, "decode");
    out
}

/// Engine-owned host pools of one layer, `lens.len()` sequences calibrated with random tokens.
struct Pools {
    _planes: Vec<u64>,
    _state: Vec<u64>,
    pools: SikvLayerPools,
}

fn calibrated(k: &Kernels, cfg: &SikvConfig, rng: &mut Rng, lens: &[usize]) -> Pools {
    let mut layout = MaybeUninit::<SikvLayoutInfo>::uninit();
    ok(sikv_query_layout(cfg, layout.as_mut_ptr()), "query_layout");
    let layout = unsafe { layout.assume_init() };
    let mut planes = vec![0u64; layout.layer_plane_bytes.div_ceil(8)];
    let mut state = vec![0u64; layout.layer_state_bytes.div_ceil(8)];
    let base = planes.as_mut_ptr() as *mut u8;
    let mut pools = SikvLayerPools {
        plane: [null_mut(); 7],
        state: state.as_mut_ptr() as *mut c_void,
    };
    for p in 0..7 {
        if layout.plane_bytes[p] != 0 {
            pools.plane[p] = base.wrapping_add(layout.plane_offset[p]) as *mut c_void;
        }
    }
    for (s, &n) in lens.iter().enumerate() {
        let sm: Vec<i64> = (0..n).map(|p| slot_of(s, p)).collect();
        let (kk, v, q) = (acts(rng, n * HK * D), acts(rng, n * HK * D), acts(rng, HQ * D));
        let st = sikv_kernel_calibrate(
            k.0,
            &pools,
            s as u32,
            n as u32,
            vp(&kk),
            vp(&v),
            1,
            vp(&q),
            sm.as_ptr(),
            null_mut(),
            0,
            null_mut(),
        );
        ok(st, "calibrate");
    }
    Pools {
        _planes: planes,
        _state: state,
        pools,
    }
}

/// The dense decode, the decode of `routed` and the decode of `sparse` (no crossover) over the
/// same pools and queries.
fn three_ways(routed: &Kernels, sparse: &Kernels, pools: &SikvLayerPools, lens: &[usize], q: &[f32]) -> [Vec<u8>; 3] {
    [
        run(sikv_kernel_attend_dense, routed, pools, lens, q),
        run(sikv_kernel_decode, routed, pools, lens, q),
        run(sikv_kernel_decode, sparse, pools, lens, q),
    ]
}

/// 70 tokens in the batch, a crossover of 100 and 2 x 256 declared: the dense decode. After
/// 20 more tokens per sequence (110 > 100): the sparse decode.
#[test]
fn decode_crossover_follows_the_live_lengths() {
    let seed = common::seed("decode_crossover_follows_the_live_lengths");
    let mut rng = Rng(seed);
    let cfg = config(100, 2);
    let (routed, sparse) = (Kernels::new(&cfg), Kernels::new(&config(0, 2)));
    let mut lens = [40usize, 30];
    let p = calibrated(&routed, &cfg, &mut rng, &lens);
    let pools = &p.pools;
    let q = acts(&mut rng, 2 * HQ * D);
    let [dense, picked, sel] = three_ways(&routed, &sparse, pools, &lens, &q);
    assert!(
        picked == dense,
        "seed {seed:#x}: 70 tokens, crossover 100: not the dense decode"
    );
    assert!(
        sel != dense,
        "seed {seed:#x}: sparse == dense at 70 tokens; the check proves nothing"
    );

    let n = 20;
    let mut sm = Vec::new();
    let (mut ss, mut pos) = (Vec::new(), Vec::new());
    for (s, l) in lens.iter_mut().enumerate() {
        for t in 0..n {
            sm.push(slot_of(s, *l + t));
            ss.push(s as i32);
            pos.push((*l + t) as i32);
        }
        *l += n;
    }
    let (k, v) = (acts(&mut rng, 2 * n * HK * D), acts(&mut rng, 2 * n * HK * D));
    let st = sikv_kernel_append(
        routed.0,
        pools,
        (2 * n) as u32,
        vp(&k),
        vp(&v),
        sm.as_ptr(),
        ss.as_ptr(),
        pos.as_ptr(),
        null_mut(),
    );
    ok(st, "append");
    let [dense, picked, sel] = three_ways(&routed, &sparse, pools, &lens, &q);
    assert!(
        picked == sel,
        "seed {seed:#x}: 110 tokens, crossover 100: not the sparse decode"
    );
    assert!(
        picked != dense,
        "seed {seed:#x}: 110 tokens, crossover 100: still the dense decode"
    );
}

/// Above LIVE_CROSSOVER_MAX_BATCH sequences the declared bound decides: 5 x 30 tokens under a
/// crossover of 200 (live tokens below it, 5 x 256 declared above it) is the sparse decode; with
/// a crossover at the declared bound, the dense one.
#[test]
fn above_the_live_crossover_batch_the_declared_bound_decides() {
    let seed = common::seed("above_the_live_crossover_batch_the_declared_bound_decides");
    let mut rng = Rng(seed);
    let b = LIVE_CROSSOVER_MAX_BATCH as usize + 1;
    let cfg = config(200, b as u32);
    let (bounded, sparse) = (Kernels::new(&cfg), Kernels::new(&config(0, b as u32)));
    let all = Kernels::new(&config((b * MAX_LEN) as u32, b as u32));
    let lens = vec![30usize; b];
    let p = calibrated(&bounded, &cfg, &mut rng, &lens);
    let q = acts(&mut rng, b * HQ * D);
    let [dense, picked, sel] = three_ways(&bounded, &sparse, &p.pools, &lens, &q);
    assert!(
        sel != dense,
        "seed {seed:#x}: sparse == dense; the check proves nothing"
    );
    assert!(
        picked == sel,
        "seed {seed:#x}: batch {b}, 150 live tokens, crossover 200: not the sparse decode"
    );
    let at_bound = run(sikv_kernel_decode, &all, &p.pools, &lens, &q);
    assert!(
        at_bound == dense,
        "seed {seed:#x}: crossover = batch x max_seq_len: not the dense decode"
    );
}
