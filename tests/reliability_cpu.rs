//! Reliability of the C ABI on the CPU device (issue #13, parts 4–6, the CPU halves):
//! a page pool that runs out in the middle of a batched append, calls from several threads,
//! and run-to-run determinism of a decode loop. Every test is seeded (`SIKV_TEST_SEED`
//! replays it) and small enough that the whole file runs in seconds on a 2-core machine.

use std::ffi::{c_void, CStr};
use std::mem::MaybeUninit;
use std::ptr::{null, null_mut};

mod common;

use common::Rng;
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::SikvStatus::{self, *};

const D: usize = 64;
const HQ: usize = 4;
const HK: usize = 2;
const PAGE: u32 = 16;

fn msg() -> String {
    unsafe { CStr::from_ptr(sikv_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn ok(st: SikvStatus, what: &str) {
    assert_eq!(st, SIKV_OK, "{what}: {}", msg());
}

/// A small f32 CPU configuration: 4 query / 2 KV heads, d = 64, page 16. `num_pages = 0`
/// lets the library size the pool for every slot.
fn config(layers: u32, max_seqs: u32, num_pages: u32) -> SikvConfig {
    let mut c = MaybeUninit::<SikvConfig>::uninit();
    ok(sikv_config_init(c.as_mut_ptr(), SIKV_PROFILE_2_1), "config_init");
    let mut c = unsafe { c.assume_init() };
    c.device = SIKV_DEVICE_CPU;
    c.dtype = SIKV_DTYPE_F32;
    c.num_layers = layers;
    c.num_q_heads = HQ as u32;
    c.num_kv_heads = HK as u32;
    c.head_dim = D as u32;
    c.page_size = PAGE;
    c.num_pages = num_pages;
    c.max_seqs = max_seqs;
    c.max_batch = max_seqs;
    c.max_seq_len = 256;
    c.max_append_tokens = 256;
    c.n_sink = 2;
    c.n_heavy = 4;
    c.n_window = 8;
    c.budget_min = 8;
    c.budget_max = 16;
    c
}

/// Owns a managed cache handle; destroyed on drop (also when an assertion fails).
struct Managed(*mut SikvCache);

impl Managed {
    fn new(cfg: &SikvConfig) -> Managed {
        let mut h = null_mut();
        ok(sikv_cache_create(cfg, &mut h), "cache_create");
        Managed(h)
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        sikv_cache_destroy(self.0);
    }
}

/// The C contract (sikv_cache_create's threading rule) lets any calls run concurrently on one
/// handle: the handle serialises them with its own lock. Tests destroy a shared handle only
/// after every thread using it has been joined.
#[derive(Clone, Copy)]
struct SharedHandle(*const SikvCache);
unsafe impl Send for SharedHandle {}
unsafe impl Sync for SharedHandle {}

fn checksum(c: *const SikvCache) -> u64 {
    let mut h = 0u64;
    ok(sikv_cache_checksum(c, &mut h), "cache_checksum");
    h
}

fn info(c: *const SikvCache) -> SikvCacheInfo {
    let mut i = MaybeUninit::<SikvCacheInfo>::uninit();
    ok(sikv_cache_info(c, i.as_mut_ptr()), "cache_info");
    unsafe { i.assume_init() }
}

fn seq_len(c: *const SikvCache, id: i64, layer: u32) -> u32 {
    let mut n = 0u32;
    ok(sikv_seq_len(c, id, layer, &mut n), "seq_len");
    n
}

/// `n` activations in [-1, 1), never exactly zero, as f32.
fn acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.range(-1.0, 1.0) + 1e-3).collect()
}

fn vp(x: &[f32]) -> *const c_void {
    x.as_ptr() as *const c_void
}

fn calibrate(c: *mut SikvCache, rng: &mut Rng, layer: u32, id: i64, n: usize) {
    let (k, v, q) = (acts(rng, n * HK * D), acts(rng, n * HK * D), acts(rng, HQ * D));
    ok(
        sikv_calibrate(c, layer, id, n as u32, vp(&k), vp(&v), 1, vp(&q), null_mut()),
        "calibrate",
    );
}

/// Attend at `layer` for `ids`; returns the output bytes.
fn attend(c: *mut SikvCache, layer: u32, ids: &[i64], q: &[f32]) -> Vec<u8> {
    let mut out = vec![0xA5u8; ids.len() * HQ * D * 4];
    ok(
        sikv_attend(
            c,
            layer,
            ids.len() as u32,
            ids.as_ptr(),
            vp(q),
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
        ),
        "attend",
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Part 4 (CPU): the page pool runs out in the middle of a batched append.

#[test]
fn out_of_pages_mid_batch_leaves_the_cache_unchanged() {
    let seed = common::seed("out_of_pages_mid_batch_leaves_the_cache_unchanged");
    let mut rng = Rng(seed);
    // 3 sequences of 17..=31 prompt tokens take 2 pages each: 6 of 8, 2 free.
    let cfg = config(1, 3, 8);
    let ids = [10i64, 11, 12];
    let prompts: Vec<usize> = (0..3).map(|_| 17 + rng.below(15)).collect();
    // One data stream feeds both caches, so they see the same calibrations and appends.
    let (failing, reference) = (Managed::new(&cfg), Managed::new(&cfg));
    for h in [&failing, &reference] {
        let mut data = Rng(seed ^ 0xC0FFEE);
        for (&id, &n) in ids.iter().zip(&prompts) {
            ok(sikv_seq_add(h.0, id), "seq_add");
            calibrate(h.0, &mut data, 0, id, n);
        }
    }
    let h = failing.0;
    assert_eq!(info(h).free_pages, 2, "seed {seed:#x}");

    // The first two sequences each need exactly one new page (they fit in the 2 free pages);
    // the third needs one more, so the batch as a whole needs 3.
    let one_page = |rng: &mut Rng, len: usize| (32 - len) + 1 + rng.below(15);
    let n_tokens: Vec<u32> = prompts.iter().map(|&p| one_page(&mut rng, p) as u32).collect();
    let total = n_tokens.iter().sum::<u32>() as usize;
    let (k, v) = (acts(&mut rng, total * HK * D), acts(&mut rng, total * HK * D));
    let (sum0, info0) = (checksum(h), info(h));
    let lens0: Vec<u32> = ids.iter().map(|&id| seq_len(h, id, 0)).collect();
    let st = sikv_append(h, 0, 3, ids.as_ptr(), n_tokens.as_ptr(), vp(&k), vp(&v), null_mut());
    assert_eq!(
        st,
        SIKV_ERR_OUT_OF_PAGES,
        "seed {seed:#x}: n_tokens {n_tokens:?}: {}",
        msg()
    );
    assert_eq!(checksum(h), sum0, "seed {seed:#x}: a failed append changed the cache");
    let info1 = info(h);
    assert_eq!(
        (info1.free_pages, info1.num_seqs),
        (info0.free_pages, info0.num_seqs),
        "seed {seed:#x}"
    );
    let lens1: Vec<u32> = ids.iter().map(|&id| seq_len(h, id, 0)).collect();
    assert_eq!(lens1, lens0, "seed {seed:#x}: a failed append changed a length");

    // The first two sequences' part of the batch fits: it must succeed on the cache that saw
    // the failure exactly as on the one that did not.
    let part = (n_tokens[0] + n_tokens[1]) as usize * HK * D;
    for c in [&failing, &reference] {
        ok(
            sikv_append(
                c.0,
                0,
                2,
                ids.as_ptr(),
                n_tokens.as_ptr(),
                vp(&k[..part]),
                vp(&v[..part]),
                null_mut(),
            ),
            "smaller append",
        );
    }
    assert_eq!(info(h).free_pages, 0, "seed {seed:#x}");
    let lens2: Vec<u32> = ids.iter().map(|&id| seq_len(h, id, 0)).collect();
    let want = [lens0[0] + n_tokens[0], lens0[1] + n_tokens[1], lens0[2]];
    assert_eq!(lens2, want, "seed {seed:#x}");
    assert_eq!(checksum(h), checksum(reference.0), "seed {seed:#x}");
    let q = acts(&mut rng, 3 * HQ * D);
    assert_eq!(
        attend(h, 0, &ids, &q),
        attend(reference.0, 0, &ids, &q),
        "seed {seed:#x}: attend after the failed append differs from a cache that never saw it"
    );
}

// ---------------------------------------------------------------------------------------------
// A decode loop over the managed cache: calibrate `batch` ragged sequences at every layer, then
// `steps` steps of one appended token per sequence and an attend, layer by layer.

const LAYERS: u32 = 2;

struct Trace {
    /// Attend outputs of every step and layer, in order.
    outputs: Vec<Vec<u8>>,
    /// The checksum after every step (the last one is the final state).
    checksums: Vec<u64>,
}

fn managed_decode(seed: u64, batch: usize, steps: usize) -> Trace {
    let mut rng = Rng(seed);
    let cache = Managed::new(&config(LAYERS, batch as u32, 0));
    let h = cache.0;
    let ids: Vec<i64> = (0..batch as i64).map(|i| 100 + 7 * i).collect();
    for &id in &ids {
        ok(sikv_seq_add(h, id), "seq_add");
        // Ragged prompts, most not a multiple of the page size.
        let n = 20 + rng.below(60);
        for layer in 0..LAYERS {
            calibrate(h, &mut rng, layer, id, n);
        }
    }
    let mut t = Trace {
        outputs: Vec::new(),
        checksums: Vec::new(),
    };
    for _ in 0..steps {
        for layer in 0..LAYERS {
            let (k, v) = (acts(&mut rng, batch * HK * D), acts(&mut rng, batch * HK * D));
            ok(
                sikv_append(h, layer, batch as u32, ids.as_ptr(), null(), vp(&k), vp(&v), null_mut()),
                "append",
            );
            let q = acts(&mut rng, batch * HQ * D);
            t.outputs.push(attend(h, layer, &ids, &q));
        }
        t.checksums.push(checksum(h));
    }
    t
}

// The same loop over the stateless kernels and engine-owned host pools (one set per layer):
// sequence slot s owns pages s*pps.., its token p at page s*pps + p/PAGE, slot p%PAGE.

struct LayerPools {
    planes: Vec<u64>,
    state: Vec<u64>,
    pools: SikvLayerPools,
}

fn stateless_decode(seed: u64, batch: usize, steps: usize) -> (Vec<Vec<u8>>, u64) {
    let mut rng = Rng(seed);
    let cfg = config(LAYERS, batch as u32, 0);
    let mut layout = MaybeUninit::<SikvLayoutInfo>::uninit();
    ok(sikv_query_layout(&cfg, layout.as_mut_ptr()), "query_layout");
    let layout = unsafe { layout.assume_init() };
    let mut kh = null_mut();
    ok(sikv_kernels_create(&cfg, &mut kh), "kernels_create");
    struct Kernels(*mut SikvKernels);
    impl Drop for Kernels {
        fn drop(&mut self) {
            sikv_kernels_destroy(self.0);
        }
    }
    let kernels = Kernels(kh);
    let mut layers: Vec<LayerPools> = (0..LAYERS)
        .map(|_| {
            // u64 words keep the pools 8-byte aligned; zeroed state records read as "not
            // calibrated".
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
            LayerPools { planes, state, pools }
        })
        .collect();
    let pps = cfg.max_seq_len.div_ceil(PAGE) as usize;
    let slot_of = |s: usize, p: usize| ((s * pps + p / PAGE as usize) * PAGE as usize + p % PAGE as usize) as i64;
    let mut lens = vec![0usize; batch];
    for (s, len) in lens.iter_mut().enumerate() {
        let n = 20 + rng.below(60);
        let sm: Vec<i64> = (0..n).map(|p| slot_of(s, p)).collect();
        for lp in &layers {
            let (k, v, q) = (
                acts(&mut rng, n * HK * D),
                acts(&mut rng, n * HK * D),
                acts(&mut rng, HQ * D),
            );
            ok(
                sikv_kernel_calibrate(
                    kernels.0,
                    &lp.pools,
                    s as u32,
                    n as u32,
                    vp(&k),
                    vp(&v),
                    1,
                    vp(&q),
                    sm.as_ptr(),
                    null_mut(),
                    0,
                    null_mut(),
                ),
                "kernel_calibrate",
            );
        }
        *len = n;
    }
    let slots: Vec<i32> = (0..batch as i32).collect();
    let mut outputs = Vec::new();
    for _ in 0..steps {
        let pos: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let sm: Vec<i64> = lens.iter().enumerate().map(|(s, &l)| slot_of(s, l)).collect();
        for l in &mut lens {
            *l += 1;
        }
        // The CSR page table of the lengths after this step's append.
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut last = Vec::new();
        for (s, &l) in lens.iter().enumerate() {
            let np = l.div_ceil(PAGE as usize);
            indices.extend((0..np).map(|i| (s * pps + i) as i32));
            indptr.push(indices.len() as i32);
            last.push((l - (np - 1) * PAGE as usize) as i32);
        }
        let pt = SikvPageTable {
            indptr: indptr.as_ptr(),
            indices: indices.as_ptr(),
            last_page_len: last.as_ptr(),
            batch: batch as u32,
        };
        for lp in &layers {
            let (k, v) = (acts(&mut rng, batch * HK * D), acts(&mut rng, batch * HK * D));
            ok(
                sikv_kernel_append(
                    kernels.0,
                    &lp.pools,
                    batch as u32,
                    vp(&k),
                    vp(&v),
                    sm.as_ptr(),
                    slots.as_ptr(),
                    pos.as_ptr(),
                    null_mut(),
                ),
                "kernel_append",
            );
            let q = acts(&mut rng, batch * HQ * D);
            let mut out = vec![0xA5u8; batch * HQ * D * 4];
            ok(
                sikv_kernel_decode(
                    kernels.0,
                    &lp.pools,
                    &pt,
                    slots.as_ptr(),
                    vp(&q),
                    out.as_mut_ptr() as *mut c_void,
                    null_mut(),
                    0,
                    null_mut(),
                ),
                "kernel_decode",
            );
            outputs.push(out);
        }
    }
    // The final state of the engine's pools, as one digest (FNV-1a over every byte).
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for lp in &mut layers {
        for w in lp.planes.iter().chain(&lp.state) {
            for b in w.to_le_bytes() {
                hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    (outputs, hash)
}

// ---------------------------------------------------------------------------------------------
// Part 5 (CPU): concurrency.

const THREADS: usize = 4;
const STEPS: usize = 16;

#[test]
fn threads_with_their_own_caches_match_a_serial_run() {
    let seed = common::seed("threads_with_their_own_caches_match_a_serial_run");
    let seeds: Vec<u64> = (0..THREADS as u64)
        .map(|i| seed.wrapping_add(i.wrapping_mul(0x9E37)))
        .collect();
    // Serial first: the same work on this thread alone is the expected result.
    let serial: Vec<Trace> = seeds.iter().map(|&s| managed_decode(s, 2, STEPS)).collect();
    let serial_k: Vec<_> = seeds.iter().map(|&s| stateless_decode(s, 2, STEPS)).collect();
    // Then all at once: a managed cache and a kernels handle per thread, both running.
    let (parallel, parallel_k): (Vec<Trace>, Vec<_>) = std::thread::scope(|sc| {
        let m: Vec<_> = seeds
            .iter()
            .map(|&s| sc.spawn(move || managed_decode(s, 2, STEPS)))
            .collect();
        let k: Vec<_> = seeds
            .iter()
            .map(|&s| sc.spawn(move || stateless_decode(s, 2, STEPS)))
            .collect();
        (
            m.into_iter().map(|j| j.join().unwrap()).collect(),
            k.into_iter().map(|j| j.join().unwrap()).collect(),
        )
    });
    for i in 0..THREADS {
        assert_eq!(serial[i].outputs.len(), STEPS * LAYERS as usize);
        assert!(
            serial[i].outputs == parallel[i].outputs,
            "seed {seed:#x}, thread {i}: managed attend outputs differ from the serial run"
        );
        assert_eq!(serial[i].checksums, parallel[i].checksums, "seed {seed:#x}, thread {i}");
        assert!(
            serial_k[i].0 == parallel_k[i].0,
            "seed {seed:#x}, thread {i}: stateless decode outputs differ from the serial run"
        );
        assert_eq!(
            serial_k[i].1, parallel_k[i].1,
            "seed {seed:#x}, thread {i}: pools differ"
        );
    }
    // Different seeds must give different outputs, or the comparison above proves little.
    assert_ne!(serial[0].outputs, serial[1].outputs, "seed {seed:#x}");
    assert_ne!(serial_k[0].0, serial_k[1].0, "seed {seed:#x}");
}

#[test]
fn const_calls_from_several_threads_on_one_handle() {
    let seed = common::seed("const_calls_from_several_threads_on_one_handle");
    let mut rng = Rng(seed);
    let cache = Managed::new(&config(LAYERS, 3, 0));
    let ids = [1i64, 2, 3];
    for &id in &ids {
        ok(sikv_seq_add(cache.0, id), "seq_add");
        let n = 20 + rng.below(60);
        for layer in 0..LAYERS {
            calibrate(cache.0, &mut rng, layer, id, n);
        }
    }
    // Layer 1 of sequence 3 gets a few more tokens, so lengths differ by layer.
    let (k, v) = (acts(&mut rng, 5 * HK * D), acts(&mut rng, 5 * HK * D));
    ok(
        sikv_append(cache.0, 1, 1, &ids[2], &5, vp(&k), vp(&v), null_mut()),
        "append",
    );

    let snapshot = |h: *const SikvCache| {
        let i = info(h);
        let lens: Vec<u32> = ids
            .iter()
            .flat_map(|&id| (0..LAYERS).map(move |l| seq_len(h, id, l)))
            .collect();
        (i.num_seqs, i.free_pages, i.num_pages, i.device, lens, checksum(h))
    };
    let want = snapshot(cache.0);
    let shared = SharedHandle(cache.0);
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let want = &want;
            sc.spawn(move || {
                let h = shared;
                for round in 0..40 {
                    assert_eq!(&snapshot(h.0), want, "seed {seed:#x}: thread {t}, round {round}");
                }
            });
        }
    });
    // The handle is unchanged by the reads and still usable by its owner.
    assert_eq!(snapshot(cache.0), want, "seed {seed:#x}");
}

// ---------------------------------------------------------------------------------------------
// Part 6 (CPU): determinism.

#[test]
fn two_runs_of_one_seed_are_bit_identical() {
    let seed = common::seed("two_runs_of_one_seed_are_bit_identical");
    let a = managed_decode(seed, 3, 32);
    let b = managed_decode(seed, 3, 32);
    assert_eq!(a.checksums.len(), 32);
    for (step, (x, y)) in a.checksums.iter().zip(&b.checksums).enumerate() {
        assert_eq!(x, y, "seed {seed:#x}: checksums differ after step {step}");
    }
    for (i, (x, y)) in a.outputs.iter().zip(&b.outputs).enumerate() {
        assert!(
            x == y,
            "seed {seed:#x}: outputs differ at step {}, layer {}",
            i / LAYERS as usize,
            i % LAYERS as usize
        );
    }
    // Every step changes the cache: a checksum that did not move would make the comparison moot.
    for w in a.checksums.windows(2) {
        assert_ne!(w[0], w[1], "seed {seed:#x}");
    }
}

/// Mutating calls on one shared handle from several threads at once (the header's threading
/// rule: the handle serialises them). Each thread adds its own sequence, calibrates it and runs
/// decode steps (append + attend) on it; the outputs must equal the same work run serially,
/// whatever order the handle's lock gave the threads, and every length and the free pages
/// must come out right.
#[test]
fn mutating_calls_from_several_threads_on_one_handle_are_serialised() {
    let seed = common::seed("mutating_calls_from_several_threads_on_one_handle_are_serialised");
    let work = |c: SharedHandle, t: usize| -> Vec<Vec<u8>> {
        let c = c.0 as *mut SikvCache;
        let mut rng = Rng(seed.wrapping_add(t as u64 * 0x51ED));
        let id = 100 + t as i64;
        ok(sikv_seq_add(c, id), "seq_add");
        for layer in 0..LAYERS {
            calibrate(c, &mut rng, layer, id, 40 + 7 * t);
        }
        let mut outs = Vec::new();
        for _ in 0..STEPS {
            for layer in 0..LAYERS {
                let (k, v, q) = (acts(&mut rng, HK * D), acts(&mut rng, HK * D), acts(&mut rng, HQ * D));
                ok(
                    sikv_append(c, layer, 1, &id, null(), vp(&k), vp(&v), null_mut()),
                    "append",
                );
                outs.push(attend(c, layer, &[id], &q));
            }
        }
        outs
    };
    let serial_cache = Managed::new(&config(LAYERS, THREADS as u32, 0));
    let serial: Vec<_> = (0..THREADS).map(|t| work(SharedHandle(serial_cache.0), t)).collect();
    let shared = Managed::new(&config(LAYERS, THREADS as u32, 0));
    let h = SharedHandle(shared.0);
    let parallel: Vec<_> = std::thread::scope(|sc| {
        let js: Vec<_> = (0..THREADS).map(|t| sc.spawn(move || work(h, t))).collect();
        js.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for t in 0..THREADS {
        assert!(
            serial[t] == parallel[t],
            "seed {seed:#x}, thread {t}: outputs on the shared handle differ from the serial run"
        );
        for layer in 0..LAYERS {
            assert_eq!(
                seq_len(shared.0, 100 + t as i64, layer),
                (40 + 7 * t + STEPS) as u32,
                "seed {seed:#x}, thread {t}, layer {layer}"
            );
        }
    }
    assert_eq!(
        info(shared.0).free_pages,
        info(serial_cache.0).free_pages,
        "seed {seed:#x}"
    );
    assert_ne!(
        serial[0], serial[1],
        "seed {seed:#x}: different threads gave the same outputs"
    );
}
