//! Call-sequence fuzzing of the C ABI on the CPU device (issue #13, part 1): a seeded generator
//! of call sequences over tiny configurations, mixing good and malformed arguments, checked
//! call by call against a model of the managed cache.
//!
//! The generator creates caches (tiny profiles, and configurations with one field at or past a
//! limit), adds, removes and forks sequences, calibrates, appends, attends, selects, attends
//! densely or over a given selection, queries lengths and info, runs the stateless calls over
//! engine-owned host pools with random page tables and slot mappings, and destroys. Arguments
//! are good most of the time and otherwise one of: a NULL pointer, an unknown or duplicated id,
//! a layer, slot, page, position or count at or past its bound, an unknown enum value.
//!
//! The oracle of every call:
//! - no panic or abort crosses the boundary, and no call returns SIKV_ERR_INTERNAL;
//! - a failed call leaves the cache's checksum (managed) or every byte of the engine's pools
//!   (stateless) unchanged, and its out-parameters and output buffers as they were (they are
//!   pre-filled with a sentinel);
//! - the model's prediction holds exactly where it has one: the status (unknown id →
//!   SIKV_ERR_UNKNOWN_SEQUENCE, pool exhausted → SIKV_ERR_OUT_OF_PAGES, …), and after every
//!   call the number of sequences, the free pages (pages shared by forks counted once) and each
//!   live sequence's length per layer;
//! - calls that only read (attend, select, lengths, info) leave the checksum unchanged even when
//!   they succeed.
//!
//! Buffers are always as long as the arguments declare, except where the contract says the
//! library must reject the call before reading: a count past its bound (`n_tokens` over
//! `max_seq_len`, a total over `max_append_tokens`, `n_seqs` over `max_batch`).
//!
//! `SIKV_TEST_SEED` replays a run (the seed is printed); `SIKV_FUZZ_CALLS=N` sets the number of
//! generated calls (default 20 000, sized for CI). Each bug the fuzzer found has a minimal
//! replay at the end of this file.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CStr};
use std::mem::MaybeUninit;
use std::ptr::{null, null_mut};

mod common;

use common::Rng;
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::SikvStatus::{self, *};

const D: u32 = 64;
const PAGE: u32 = 16;
/// Ids the generator draws from: a few small ones (so that ids collide) and the extremes.
const IDS: [i64; 9] = [0, 1, 2, 3, 4, 5, -1, i64::MAX, i64::MIN];
const SENT8: u8 = 0xA5;
const SENT32: i32 = 0x5A5A_5A5A;

fn msg() -> String {
    unsafe { CStr::from_ptr(sikv_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// What the model says a call must return.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    Err(SikvStatus),
    /// Some error (the model does not say which, e.g. a mutated configuration).
    AnyErr,
    /// Success or any error (garbage the library may accept or reject, e.g. a random page
    /// table over the stateless pools).
    Any,
}

/// Failures are collected with the call that caused them, then reported together.
struct Run {
    seed: u64,
    calls: u64,
    /// `SIKV_FUZZ_TRACE=1`: print every managed call (for replaying a failure).
    trace: bool,
    failures: Vec<String>,
    ok: HashMap<&'static str, u64>,
    err: HashMap<&'static str, u64>,
}

impl Run {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures
                .push(format!("call #{} (seed {:#x}): {what}", self.calls, self.seed));
        }
    }

    /// Checks one status against its expectation and counts it.
    fn status(&mut self, name: &'static str, got: SikvStatus, want: Expect, ctx: &dyn Fn() -> String) -> bool {
        self.calls += 1;
        let good = match (got, want) {
            (SIKV_ERR_INTERNAL, _) | (SIKV_ERR_POISONED, _) => false,
            (s, Expect::Ok) => s == SIKV_OK,
            (s, Expect::Err(e)) => s == e,
            (s, Expect::AnyErr) => s != SIKV_OK,
            (_, Expect::Any) => true,
        };
        if !good {
            self.fail(format!(
                "{name}: got {got:?}, expected {want:?} ({}) [{}]",
                ctx(),
                msg()
            ));
        }
        *if got == SIKV_OK { &mut self.ok } else { &mut self.err }
            .entry(name)
            .or_default() += 1;
        got == SIKV_OK
    }
}

// ---------------------------------------------------------------------------------------------
// The model of the managed cache

#[derive(Clone)]
struct MSeq {
    len: Vec<u32>,
    calibrated: Vec<bool>,
    /// Model page ids; a page shared by a fork appears in both sequences.
    pages: Vec<u64>,
}

struct Model {
    layers: u32,
    max_seqs: u32,
    max_seq_len: u32,
    max_batch: u32,
    max_append: u32,
    budget_max: u32,
    num_pages: u32,
    /// Tokens per page: a mutated configuration may have another page size than PAGE.
    page: u32,
    // Ordered, so that the ids drawn from it (and so a whole run) follow from the seed alone.
    seqs: BTreeMap<i64, MSeq>,
    refs: HashMap<u64, u32>,
    next_page: u64,
}

impl Model {
    fn free_pages(&self) -> u32 {
        self.num_pages - self.refs.len() as u32
    }
    fn fresh(&mut self, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                self.next_page += 1;
                self.refs.insert(self.next_page, 1);
                self.next_page
            })
            .collect()
    }
    fn release(&mut self, pages: &[u64]) {
        for p in pages {
            let r = self.refs.get_mut(p).unwrap();
            *r -= 1;
            if *r == 0 {
                self.refs.remove(p);
            }
        }
    }
    fn pages_needed(&self, s: &MSeq, len: u32) -> usize {
        (len.div_ceil(self.page) as usize).saturating_sub(s.pages.len())
    }
    fn seq(&self, id: i64) -> Result<&MSeq, SikvStatus> {
        self.seqs.get(&id).ok_or(SIKV_ERR_UNKNOWN_SEQUENCE)
    }
    /// The page-table checks of attend, attend_dense, select and attend_selected.
    fn readable(&self, layer: u32, ids: &[i64]) -> Result<(), SikvStatus> {
        if layer >= self.layers {
            return Err(SIKV_ERR_OUT_OF_BOUNDS);
        }
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            if !self.seq(*id)?.calibrated[layer as usize] {
                return Err(SIKV_ERR_NOT_CALIBRATED);
            }
        }
        Ok(())
    }
}

fn expect_of(r: Result<(), SikvStatus>) -> Expect {
    match r {
        Ok(()) => Expect::Ok,
        Err(e) => Expect::Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Configurations

fn config_init(profile: u32) -> SikvConfig {
    let mut c = MaybeUninit::<SikvConfig>::uninit();
    assert_eq!(sikv_config_init(c.as_mut_ptr(), profile), SIKV_OK, "{}", msg());
    unsafe { c.assume_init() }
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}

/// A tiny configuration the library should accept: d = 64, 1–2 layers, page 16, up to 256
/// tokens, sometimes a pool smaller than the slots could fill (so that pages run out).
fn tiny_config(rng: &mut Rng) -> SikvConfig {
    let mut c = config_init(rng.below(4) as u32);
    c.device = SIKV_DEVICE_CPU;
    c.dtype = pick(rng, &[SIKV_DTYPE_F16, SIKV_DTYPE_BF16, SIKV_DTYPE_F32]);
    c.num_layers = 1 + rng.below(2) as u32;
    c.num_kv_heads = 1 + rng.below(2) as u32;
    c.num_q_heads = c.num_kv_heads * pick(rng, &[1, 2]);
    c.head_dim = D;
    c.page_size = PAGE;
    c.max_seqs = 1 + rng.below(4) as u32;
    c.max_seq_len = pick(rng, &[16, 17, 40, 64, 100, 256]);
    c.max_batch = 1 + rng.below(c.max_seqs as usize) as u32;
    c.max_append_tokens = pick(rng, &[1, 8, 16, 40, 64]);
    let per_seq = c.max_seq_len.div_ceil(PAGE);
    c.num_pages = if rng.below(2) == 0 {
        0
    } else {
        1 + rng.below((c.max_seqs * per_seq) as usize) as u32
    };
    c.n_sink = rng.below(5) as u32;
    c.n_heavy = rng.below(9) as u32;
    c.n_window = rng.below(9) as u32;
    c.budget_min = 1 + rng.below(8) as u32;
    c.budget_max = c.budget_min + rng.below(16) as u32;
    c.budget_ratio = rng.range(0.0, 0.5);
    c.rerank_factor = pick(rng, &[0, 1, 2, 4]);
    c.selector = rng.below(2) as u32;
    c.centre = rng.below(2) as u32;
    c.flags = rng.below(8) as u32;
    c.dense_crossover = pick(rng, &[0, 0, 0, 20, 300]);
    c
}

/// One field of a tiny configuration set at or past a limit (or to an unknown enum value).
fn mutate_config(rng: &mut Rng, c: &mut SikvConfig) -> String {
    let big = [0u32, 1, 2, 3, 15, 17, 255, 257, 65_536, u32::MAX / 2, u32::MAX];
    let f = rng.below(22);
    let v = pick(rng, &big);
    let fv = pick(rng, &[f32::NAN, f32::INFINITY, -1.0, 0.0, 1.0, 1.5, f32::MIN_POSITIVE]);
    match f {
        0 => c.device = pick(rng, &[0, 3, 7, u32::MAX]),
        1 => c.dtype = pick(rng, &[3, 9, u32::MAX]),
        2 => c.num_layers = pick(rng, &[0, 3, 1024, u32::MAX]),
        3 => c.num_q_heads = v,
        4 => c.num_kv_heads = v,
        5 => c.head_dim = pick(rng, &[0, 32, 63, 65, 96, 128, 256, 512, u32::MAX]),
        6 => c.key_bits = pick(rng, &[0, 1, 3, 8, 16, 17, 32]),
        7 => c.value_bits = pick(rng, &[0, 1, 3, 8, 16, 17, 32]),
        8 => c.page_size = pick(rng, &[0, 8, 15, 17, 32, 256, 272, u32::MAX]),
        9 => c.num_pages = v,
        10 => c.max_seqs = v,
        11 => c.max_seq_len = v,
        12 => c.max_batch = v,
        13 => c.max_append_tokens = v,
        14 => c.n_sink = v,
        15 => c.n_heavy = v,
        16 => c.n_window = v,
        17 => c.budget_ratio = fv,
        18 => c.budget_min = v,
        19 => c.budget_max = v,
        20 => c.rerank_factor = v,
        _ => match rng.below(5) {
            0 => c.selector = pick(rng, &[2, u32::MAX]),
            1 => c.centre = pick(rng, &[2, u32::MAX]),
            2 => c.flags = pick(rng, &[8, 1 << 31, u32::MAX]),
            3 => c.softmax_scale = fv,
            _ => c.dense_crossover = v,
        },
    }
    format!("field {f}")
}

/// Whether a configuration the library accepted is small enough to drive: a mutated one may be
/// valid and huge (max_seq_len = 2^31), and the driver's buffers follow the declared bounds.
fn drivable(c: &SikvConfig) -> bool {
    c.max_seq_len <= 4096
        && c.max_append_tokens <= 4096
        && c.max_batch <= 64
        && c.max_seqs <= 64
        && c.num_q_heads <= 16
        && c.budget_max <= 4096
        && c.num_layers <= 4
}

fn query_layout(c: &SikvConfig) -> Option<SikvLayoutInfo> {
    let mut l = MaybeUninit::<SikvLayoutInfo>::uninit();
    (sikv_query_layout(c, l.as_mut_ptr()) == SIKV_OK).then(|| unsafe { l.assume_init() })
}

/// Activations of `n` elements of `dtype`: small finite values, or now and then NaN and
/// infinities (an engine can produce them; the library must not panic on them).
fn activations(rng: &mut Rng, dtype: u32, n: usize, specials: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        let x = if specials && rng.below(8) == 0 {
            pick(rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 65504.0])
        } else {
            rng.range(-2.0, 2.0)
        };
        match dtype {
            SIKV_DTYPE_F32 => out.extend(x.to_le_bytes()),
            SIKV_DTYPE_BF16 => out.extend(((x.to_bits() >> 16) as u16).to_le_bytes()),
            _ => out.extend(f16_bits(x).to_le_bytes()),
        }
    }
    out
}

/// float32 → IEEE half (truncating; enough for test inputs, keeps NaN and infinities).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        sign | 0x7c00
    } else if e <= 0 {
        sign
    } else {
        sign | ((e as u16) << 10) | (man >> 13) as u16
    }
}

// ---------------------------------------------------------------------------------------------
// The managed-cache driver

struct Managed {
    cache: *mut SikvCache,
    cfg: SikvConfig,
    dtype_size: usize,
    model: Model,
    /// Kept alive while a cache created over engine-owned pools lives.
    _pools: Option<(Vec<u64>, Vec<u64>)>,
    /// Activations sized for the largest call of the configuration.
    kv: Vec<u8>,
    q: Vec<u8>,
    /// The last selection sikv_select returned, for attend_selected.
    last_sel: Option<Selection>,
}

/// A selection and what it was made for: (layer, ids, indices, counts).
type Selection = (u32, Vec<i64>, Vec<i32>, Vec<i32>);

impl Drop for Managed {
    fn drop(&mut self) {
        sikv_cache_destroy(self.cache);
    }
}

fn checksum(c: *const SikvCache) -> u64 {
    let mut h = 0u64;
    assert_eq!(sikv_cache_checksum(c, &mut h), SIKV_OK, "{}", msg());
    h
}

fn info(c: *const SikvCache) -> SikvCacheInfo {
    let mut i = MaybeUninit::<SikvCacheInfo>::uninit();
    assert_eq!(sikv_cache_info(c, i.as_mut_ptr()), SIKV_OK, "{}", msg());
    unsafe { i.assume_init() }
}

/// Creates a cache: mostly a tiny configuration, sometimes one with a field at or past a limit
/// (the status is then only required not to be INTERNAL), sometimes over engine-owned pools
/// (now and then one byte short). Returns None when the configuration was rejected.
fn create(run: &mut Run, rng: &mut Rng) -> Option<Managed> {
    let mut cfg = tiny_config(rng);
    let mutated = rng.below(4) == 0;
    let what = if mutated {
        mutate_config(rng, &mut cfg)
    } else {
        "tiny".into()
    };
    // A configuration the library accepts but whose pools would not be tiny is not created
    // here: the fuzzer is about call sequences, not about allocating gigabytes.
    let layout = query_layout(&cfg);
    let ctx = || format!("create {what}: {cfg:?}");
    if let Some(l) = &layout {
        if l.total_plane_bytes + l.total_state_bytes > (64 << 20) {
            return None;
        }
    }
    let want = if layout.is_none() {
        Expect::AnyErr
    } else if mutated {
        Expect::Any
    } else {
        Expect::Ok
    };
    let sentinel = 0x1usize as *mut SikvCache;
    let mut out = sentinel;
    let mut pools = None;
    let with_pools = layout.is_some() && rng.below(4) == 0;
    let st = if let (true, Some(l)) = (with_pools, layout) {
        let short = rng.below(4) == 0;
        let mut planes = vec![0u64; l.total_plane_bytes.div_ceil(8) + 1];
        let mut state = vec![0u64; l.total_state_bytes.div_ceil(8) + 1];
        let d = SikvPoolsDesc {
            planes: planes.as_mut_ptr() as *mut c_void,
            planes_bytes: l.total_plane_bytes - short as usize,
            state: state.as_mut_ptr() as *mut c_void,
            state_bytes: l.total_state_bytes,
            workspace: null_mut(),
            workspace_bytes: 0,
        };
        pools = Some((planes, state));
        let want = if short && l.total_plane_bytes > 0 {
            Expect::Err(SIKV_ERR_BUFFER_TOO_SMALL)
        } else {
            want
        };
        let st = sikv_cache_create_with_pools(&cfg, &d, &mut out);
        run.status("cache_create_with_pools", st, want, &ctx);
        st
    } else {
        let st = sikv_cache_create(&cfg, &mut out);
        run.status("cache_create", st, want, &ctx);
        st
    };
    if st != SIKV_OK {
        if out != sentinel {
            run.fail(format!("failed create wrote its out-parameter ({})", ctx()));
        }
        return None;
    }
    let l = layout.unwrap();
    if !drivable(&cfg) {
        sikv_cache_destroy(out);
        return None;
    }
    let i = info(out);
    let max_q = cfg.max_batch.max(cfg.max_seq_len) as usize * (cfg.num_q_heads * cfg.head_dim) as usize;
    let max_kv = cfg.max_seq_len.max(cfg.max_append_tokens) as usize * (cfg.num_kv_heads * cfg.head_dim) as usize;
    let specials = rng.below(10) == 0;
    let m = Managed {
        cache: out,
        cfg,
        dtype_size: if cfg.dtype == SIKV_DTYPE_F32 { 4 } else { 2 },
        model: Model {
            layers: cfg.num_layers,
            max_seqs: cfg.max_seqs,
            max_seq_len: cfg.max_seq_len,
            max_batch: cfg.max_batch,
            max_append: cfg.max_append_tokens,
            budget_max: cfg.budget_max,
            num_pages: l.num_pages,
            page: cfg.page_size,
            seqs: BTreeMap::new(),
            refs: HashMap::new(),
            next_page: 0,
        },
        _pools: pools,
        kv: activations(rng, cfg.dtype, 2 * max_kv, specials),
        q: activations(rng, cfg.dtype, max_q, specials),
        last_sel: None,
    };
    if i.num_pages != l.num_pages || i.free_pages != l.num_pages || i.num_seqs != 0 || i.device != SIKV_DEVICE_CPU {
        run.fail(format!(
            "fresh cache info {i:?} disagrees with layout num_pages {}",
            l.num_pages
        ));
    }
    Some(m)
}

impl Managed {
    fn id(&self, rng: &mut Rng) -> i64 {
        // Mostly ids that exist, so that calls get past the id checks.
        let live: Vec<i64> = self.model.seqs.keys().copied().collect();
        if !live.is_empty() && rng.below(3) != 0 {
            pick(rng, &live)
        } else {
            pick(rng, &IDS)
        }
    }

    fn layer(&self, rng: &mut Rng) -> u32 {
        if rng.below(16) == 0 {
            pick(rng, &[self.cfg.num_layers, self.cfg.num_layers + 1, u32::MAX])
        } else {
            rng.below(self.cfg.num_layers as usize) as u32
        }
    }

    /// A batch of ids: mostly distinct live ones, sometimes a duplicate or an unknown one.
    fn batch(&self, rng: &mut Rng, max: u32) -> Vec<i64> {
        let n = if rng.below(16) == 0 {
            pick(rng, &[0, max + 1])
        } else {
            1 + rng.below(max as usize) as u32
        };
        let mut live: Vec<i64> = self.model.seqs.keys().copied().collect();
        rng.shuffle(&mut live);
        (0..n as usize)
            .map(|i| {
                if i < live.len() && rng.below(10) != 0 {
                    live[i]
                } else {
                    self.id(rng)
                }
            })
            .collect()
    }

    fn q_elems(&self, n: usize) -> usize {
        n * (self.cfg.num_q_heads * self.cfg.head_dim) as usize
    }

    /// One random call and its checks.
    fn step(&mut self, run: &mut Run, rng: &mut Rng) {
        let c = self.cache;
        let before = checksum(c);
        let null_handle = rng.below(64) == 0;
        let h = if null_handle { null_mut() } else { c };
        let op = rng.below(100);
        // (name, status, expectation, read-only call, context)
        let (name, st, want, read_only, ctx): (&'static str, SikvStatus, Expect, bool, String) = match op {
            0..=9 => {
                let id = self.id(rng);
                let m = &self.model;
                let want = if m.seqs.contains_key(&id) {
                    Expect::Err(SIKV_ERR_SEQUENCE_EXISTS)
                } else if m.seqs.len() as u32 >= m.max_seqs {
                    Expect::Err(SIKV_ERR_OUT_OF_BOUNDS)
                } else {
                    Expect::Ok
                };
                let st = sikv_seq_add(h, id);
                if st == SIKV_OK && !null_handle {
                    let l = self.model.layers as usize;
                    self.model.seqs.insert(
                        id,
                        MSeq {
                            len: vec![0; l],
                            calibrated: vec![false; l],
                            pages: vec![],
                        },
                    );
                }
                ("seq_add", st, want, false, format!("id {id}"))
            }
            10..=15 => {
                let id = self.id(rng);
                let want = expect_of(self.model.seq(id).map(|_| ()));
                let st = sikv_seq_remove(h, id);
                if st == SIKV_OK && !null_handle {
                    let s = self.model.seqs.remove(&id).unwrap();
                    self.model.release(&s.pages);
                }
                ("seq_remove", st, want, false, format!("id {id}"))
            }
            16..=22 => {
                let (src, dst) = (self.id(rng), self.id(rng));
                let m = &self.model;
                let want = match m.seq(src) {
                    Err(e) => Expect::Err(e),
                    Ok(_) if m.seqs.contains_key(&dst) => Expect::Err(SIKV_ERR_SEQUENCE_EXISTS),
                    Ok(_) if m.seqs.len() as u32 >= m.max_seqs => Expect::Err(SIKV_ERR_OUT_OF_BOUNDS),
                    Ok(s) => {
                        let shared = ((*s.len.iter().min().unwrap() / m.page) as usize).min(s.pages.len());
                        if s.pages.len() - shared > m.free_pages() as usize {
                            Expect::Err(SIKV_ERR_OUT_OF_PAGES)
                        } else {
                            Expect::Ok
                        }
                    }
                };
                let st = sikv_seq_fork(h, src, dst);
                if st == SIKV_OK && !null_handle {
                    let s = self.model.seqs[&src].clone();
                    let shared = ((*s.len.iter().min().unwrap() / self.model.page) as usize).min(s.pages.len());
                    let mut pages = s.pages[..shared].to_vec();
                    for p in &pages {
                        *self.model.refs.get_mut(p).unwrap() += 1;
                    }
                    pages.extend(self.model.fresh(s.pages.len() - shared));
                    self.model.seqs.insert(dst, MSeq { pages, ..s });
                }
                ("seq_fork", st, want, false, format!("{src} -> {dst}"))
            }
            23..=27 => {
                let (id, layer) = (self.id(rng), self.layer(rng));
                let null_out = rng.below(16) == 0;
                let want = if null_out {
                    Expect::Err(SIKV_ERR_NULL_POINTER)
                } else if layer >= self.model.layers {
                    Expect::Err(SIKV_ERR_OUT_OF_BOUNDS)
                } else {
                    expect_of(self.model.seq(id).map(|_| ()))
                };
                let mut out = 0xDEAD_BEEFu32;
                let st = sikv_seq_len(h, id, layer, if null_out { null_mut() } else { &mut out });
                if st == SIKV_OK && out != self.model.seqs[&id].len[layer as usize] {
                    run.fail(format!(
                        "seq_len({id}, {layer}) = {out}, model {}",
                        self.model.seqs[&id].len[layer as usize]
                    ));
                }
                if st != SIKV_OK && out != 0xDEAD_BEEF {
                    run.fail(format!("failed seq_len wrote its out-parameter: {out}"));
                }
                ("seq_len", st, want, true, format!("id {id} layer {layer}"))
            }
            28..=40 => self.calibrate(rng, h),
            41..=62 => self.append(rng, h),
            63..=82 => self.attend_like(rng, h, run),
            83..=88 => self.attend_selected(rng, h),
            _ => {
                let null_out = rng.below(16) == 0;
                let want = if null_out {
                    Expect::Err(SIKV_ERR_NULL_POINTER)
                } else {
                    Expect::Ok
                };
                let mut out = MaybeUninit::<SikvCacheInfo>::uninit();
                unsafe { std::ptr::write_bytes(out.as_mut_ptr() as *mut u8, SENT8, size_of::<SikvCacheInfo>()) };
                let st = sikv_cache_info(h, if null_out { null_mut() } else { out.as_mut_ptr() });
                let bytes =
                    unsafe { std::slice::from_raw_parts(out.as_ptr() as *const u8, size_of::<SikvCacheInfo>()) };
                if st != SIKV_OK && bytes.iter().any(|&b| b != SENT8) {
                    run.fail("failed cache_info wrote its out-parameter".into());
                }
                ("cache_info", st, want, true, String::new())
            }
        };
        let want = if null_handle {
            Expect::Err(SIKV_ERR_NULL_POINTER)
        } else {
            want
        };
        let ok = run.status(name, st, want, &|| ctx.clone());
        if run.trace {
            println!("#{} {name}({ctx}) = {st:?}", run.calls);
        }
        if st == SIKV_OK && !read_only {
            // The kept selection belongs to the state it was made on (a re-calibrated sequence
            // has another heavy set, a longer one another window).
            self.last_sel = None;
        }
        let after = checksum(c);
        if (!ok || read_only) && after != before {
            run.fail(format!(
                "{name} ({ctx}) returned {st:?} and changed the checksum {before:#x} -> {after:#x}"
            ));
        }
        self.check_model(run, rng, name, &ctx);
    }

    /// The cache's counts and lengths against the model's.
    fn check_model(&self, run: &mut Run, rng: &mut Rng, name: &str, ctx: &str) {
        let i = info(self.cache);
        let m = &self.model;
        if i.num_seqs as usize != m.seqs.len() || i.free_pages != m.free_pages() || i.num_pages != m.num_pages {
            run.fail(format!(
                "after {name} ({ctx}): info {i:?}, model {} seqs, {} free of {} pages",
                m.seqs.len(),
                m.free_pages(),
                m.num_pages
            ));
        }
        // Every length, now and then (they are cheap, but the model is checked every call).
        if rng.below(8) == 0 {
            for (id, s) in &m.seqs {
                for (l, &want) in s.len.iter().enumerate() {
                    let mut got = 0u32;
                    let st = sikv_seq_len(self.cache, *id, l as u32, &mut got);
                    if st != SIKV_OK || got != want {
                        run.fail(format!(
                            "after {name} ({ctx}): seq_len({id}, {l}) = {st:?} {got}, model {want}"
                        ));
                    }
                }
            }
        }
    }

    fn calibrate(&mut self, rng: &mut Rng, h: *mut SikvCache) -> (&'static str, SikvStatus, Expect, bool, String) {
        let (layer, id) = (self.layer(rng), self.id(rng));
        let max = self.cfg.max_seq_len;
        let n = match rng.below(12) {
            0 => 0,
            1 => max,
            2 => max + 1,
            3 => u32::MAX,
            _ => 1 + rng.below(max.min(48) as usize) as u32,
        };
        let nq = match rng.below(10) {
            0 => 0,
            1 => n.saturating_add(1),
            _ => 1 + rng.below(n.clamp(1, 4) as usize) as u32,
        };
        let fault = rng.below(20);
        let (k, v) = self.kv.split_at(self.kv.len() / 2);
        let kp = if fault == 0 {
            null()
        } else {
            k.as_ptr() as *const c_void
        };
        let vp = if fault == 1 {
            null()
        } else {
            v.as_ptr() as *const c_void
        };
        let qp = if fault == 2 {
            null()
        } else {
            self.q.as_ptr() as *const c_void
        };
        let m = &self.model;
        // The checks in the order the call makes them (arguments, then the cache's state).
        let want = (|| {
            if n > max {
                return Err(SIKV_ERR_OUT_OF_BOUNDS);
            }
            if nq > n {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            if fault <= 2 {
                // A NULL array of zero elements is not read; the call fails on n or n_query.
                return Err(if (fault < 2 && n > 0) || (fault == 2 && nq > 0) {
                    SIKV_ERR_NULL_POINTER
                } else {
                    SIKV_ERR_INVALID_ARGUMENT
                });
            }
            if layer >= m.layers {
                return Err(SIKV_ERR_OUT_OF_BOUNDS);
            }
            let s = m.seq(id)?;
            if s.calibrated[layer as usize] {
                return Err(SIKV_ERR_ALREADY_CALIBRATED);
            }
            if s.len[layer as usize] != 0 || n == 0 || nq == 0 {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            if m.pages_needed(s, n) > m.free_pages() as usize {
                return Err(SIKV_ERR_OUT_OF_PAGES);
            }
            Ok(())
        })();
        // With a NULL array of zero elements the order of the remaining checks is the
        // library's to choose: only failure is required.
        let want = match want {
            Err(SIKV_ERR_INVALID_ARGUMENT) if fault <= 2 => Expect::AnyErr,
            w => expect_of(w),
        };
        let st = sikv_calibrate(h, layer, id, n, kp, vp, nq, qp, null_mut());
        if st == SIKV_OK && !h.is_null() {
            let mut s = self.model.seqs[&id].clone();
            let need = self.model.pages_needed(&s, n);
            s.pages.extend(self.model.fresh(need));
            s.len[layer as usize] = n;
            s.calibrated[layer as usize] = true;
            self.model.seqs.insert(id, s);
        }
        (
            "calibrate",
            st,
            want,
            false,
            format!("layer {layer} id {id} n {n} nq {nq} fault {fault}"),
        )
    }

    fn append(&mut self, rng: &mut Rng, h: *mut SikvCache) -> (&'static str, SikvStatus, Expect, bool, String) {
        let layer = self.layer(rng);
        let ids = self.batch(rng, self.cfg.max_seqs.max(2));
        let one_each = rng.below(3) == 0;
        let cap = self.model.max_append;
        let counts: Vec<u32> = ids
            .iter()
            .map(|_| match rng.below(16) {
                0 => 0,
                1 => cap,
                2 => cap + 1,
                3 => u32::MAX,
                _ => 1 + rng.below((cap as usize / ids.len().max(1)).max(1)) as u32,
            })
            .collect();
        let counts = if one_each { vec![1; ids.len()] } else { counts };
        let total: u64 = counts.iter().map(|&x| x as u64).sum();
        let fault = rng.below(20);
        let (k, v) = self.kv.split_at(self.kv.len() / 2);
        let m = &self.model;
        let want = (|| {
            if ids.is_empty() {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            if fault == 0 {
                return Err(SIKV_ERR_NULL_POINTER);
            }
            if total > m.max_append as u64 {
                return Err(SIKV_ERR_OUT_OF_BOUNDS);
            }
            if fault <= 2 && total > 0 {
                return Err(SIKV_ERR_NULL_POINTER);
            }
            if layer >= m.layers {
                return Err(SIKV_ERR_OUT_OF_BOUNDS);
            }
            if total == 0 {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            let mut need = 0;
            for (i, (id, &c)) in ids.iter().zip(&counts).enumerate() {
                if ids[..i].contains(id) {
                    return Err(SIKV_ERR_INVALID_ARGUMENT);
                }
                let s = m.seq(*id)?;
                if !s.calibrated[layer as usize] {
                    return Err(SIKV_ERR_NOT_CALIBRATED);
                }
                let new_len = s.len[layer as usize] as u64 + c as u64;
                if new_len > m.max_seq_len as u64 {
                    return Err(SIKV_ERR_OUT_OF_BOUNDS);
                }
                need += m.pages_needed(s, new_len as u32);
            }
            if need > m.free_pages() as usize {
                return Err(SIKV_ERR_OUT_OF_PAGES);
            }
            Ok(())
        })();
        let st = sikv_append(
            h,
            layer,
            ids.len() as u32,
            if fault == 0 { null() } else { ids.as_ptr() },
            if one_each { null() } else { counts.as_ptr() },
            if fault == 1 {
                null()
            } else {
                k.as_ptr() as *const c_void
            },
            if fault == 2 {
                null()
            } else {
                v.as_ptr() as *const c_void
            },
            null_mut(),
        );
        if st == SIKV_OK && !h.is_null() {
            for (id, &c) in ids.iter().zip(&counts) {
                let mut s = self.model.seqs[id].clone();
                let new_len = s.len[layer as usize] + c;
                let need = self.model.pages_needed(&s, new_len);
                s.pages.extend(self.model.fresh(need));
                s.len[layer as usize] = new_len;
                self.model.seqs.insert(*id, s);
            }
        }
        (
            "append",
            st,
            expect_of(want),
            false,
            format!("layer {layer} ids {ids:?} counts {counts:?} one_each {one_each} fault {fault}"),
        )
    }

    /// attend, attend_dense or select: a read-only call with sentinel-filled outputs.
    fn attend_like(
        &mut self,
        rng: &mut Rng,
        h: *mut SikvCache,
        run: &mut Run,
    ) -> (&'static str, SikvStatus, Expect, bool, String) {
        let which = rng.below(3);
        let layer = self.layer(rng);
        let ids = self.batch(rng, self.model.max_batch);
        let fault = rng.below(24);
        let m = &self.model;
        let n = ids.len();
        // Outputs sized for max_batch: a call with n_seqs past it must fail before writing.
        let cap = n.min(m.max_batch as usize);
        let hk = self.cfg.num_kv_heads as usize;
        let bmax = m.budget_max as usize;
        let mut out = vec![SENT8; self.q_elems(cap) * self.dtype_size];
        let mut idx = vec![SENT32; cap * hk * bmax];
        let mut cnt = vec![SENT32; cap * hk];
        let want = (|| {
            if n as u32 > m.max_batch {
                return Err(SIKV_ERR_OUT_OF_BOUNDS);
            }
            if n == 0 {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            if fault <= 2 {
                return Err(SIKV_ERR_NULL_POINTER);
            }
            if fault == 3 && which == 2 {
                return Err(SIKV_ERR_NULL_POINTER);
            }
            m.readable(layer, &ids)
        })();
        let idp = if fault == 0 { null() } else { ids.as_ptr() };
        let qp = if fault == 1 {
            null()
        } else {
            self.q.as_ptr() as *const c_void
        };
        let (name, st) = match which {
            0 | 1 => {
                let op = if fault == 2 {
                    null_mut()
                } else {
                    out.as_mut_ptr() as *mut c_void
                };
                if which == 0 {
                    ("attend", sikv_attend(h, layer, n as u32, idp, qp, op, null_mut()))
                } else {
                    (
                        "attend_dense",
                        sikv_attend_dense(h, layer, n as u32, idp, qp, op, null_mut()),
                    )
                }
            }
            _ => {
                let ip = if fault == 2 { null_mut() } else { idx.as_mut_ptr() };
                let cp = if fault == 3 { null_mut() } else { cnt.as_mut_ptr() };
                ("select", sikv_select(h, layer, n as u32, idp, qp, ip, cp, null_mut()))
            }
        };
        let ctx = format!("layer {layer} ids {ids:?} fault {fault}");
        if st != SIKV_OK {
            if out.iter().any(|&b| b != SENT8) || idx.iter().chain(&cnt).any(|&x| x != SENT32) {
                run.fail(format!("failed {name} ({ctx}) wrote its output"));
            }
        } else if which == 2 {
            // The selection: per row, count in 0..=budget_max, ascending positions below the
            // sequence's length, then -1.
            for (r, &c) in cnt.iter().enumerate() {
                let len = self.model.seqs[&ids[r / hk]].len[layer as usize] as i32;
                let row = &idx[r * bmax..(r + 1) * bmax];
                let good = c >= 0
                    && c as usize <= bmax
                    && row[..c as usize].windows(2).all(|w| w[0] < w[1])
                    && row[..c as usize].iter().all(|&p| p >= 0 && p < len)
                    && row[c as usize..].iter().all(|&p| p == -1);
                if !good {
                    run.fail(format!("select ({ctx}) row {r}: count {c}, {row:?}, length {len}"));
                }
            }
            self.last_sel = Some((layer, ids.clone(), idx, cnt));
        } else if out.iter().all(|&b| b == SENT8) {
            run.fail(format!("{name} ({ctx}) succeeded without writing its output"));
        }
        (name, st, expect_of(want), true, ctx)
    }

    /// attend_selected over the last selection sikv_select made (valid), an empty one, or a
    /// corrupted one (the library may accept or reject it, but not panic or change the cache).
    fn attend_selected(
        &mut self,
        rng: &mut Rng,
        h: *mut SikvCache,
    ) -> (&'static str, SikvStatus, Expect, bool, String) {
        let hk = self.cfg.num_kv_heads as usize;
        let bmax = self.model.budget_max as usize;
        let (layer, ids, mut idx, mut cnt, mut kind) = match (&self.last_sel, rng.below(3)) {
            (Some((l, i, x, c)), 0 | 1) => (*l, i.clone(), x.clone(), c.clone(), "select's"),
            _ => {
                let layer = self.layer(rng);
                let ids = self.batch(rng, self.model.max_batch);
                let n = ids.len().min(self.model.max_batch as usize);
                (layer, ids, vec![-1; n * hk * bmax], vec![0; n * hk], "empty")
            }
        };
        if rng.below(4) == 0 && !cnt.is_empty() {
            kind = "corrupted";
            let r = rng.below(cnt.len());
            match rng.below(3) {
                0 => cnt[r] = pick(rng, &[-1, bmax as i32 + 1, i32::MAX]),
                1 if bmax > 0 => idx[r * bmax] = pick(rng, &[-1, i32::MAX, self.model.max_seq_len as i32]),
                _ => idx.iter_mut().for_each(|x| *x = rng.below(300) as i32 - 10),
            }
        }
        let fault = rng.below(24);
        let n = ids.len();
        let m = &self.model;
        let mut out = vec![SENT8; self.q_elems(n.min(m.max_batch as usize)) * self.dtype_size];
        let want = (|| {
            if n as u32 > m.max_batch {
                return Err(SIKV_ERR_OUT_OF_BOUNDS);
            }
            if n == 0 {
                return Err(SIKV_ERR_INVALID_ARGUMENT);
            }
            if fault <= 3 {
                return Err(SIKV_ERR_NULL_POINTER);
            }
            m.readable(layer, &ids)
        })();
        let want = match (want, kind) {
            (Ok(()), "corrupted") => Expect::Any,
            (w, _) => expect_of(w),
        };
        let st = sikv_attend_selected(
            h,
            layer,
            n as u32,
            if fault == 0 { null() } else { ids.as_ptr() },
            if fault == 1 {
                null()
            } else {
                self.q.as_ptr() as *const c_void
            },
            if fault == 2 { null() } else { idx.as_ptr() },
            if fault == 3 { null() } else { cnt.as_ptr() },
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
        );
        let wrote = out.iter().any(|&b| b != SENT8);
        let ctx = format!("{kind} selection, layer {layer} ids {ids:?} fault {fault} wrote {wrote}");
        let want = if st != SIKV_OK && wrote {
            // Reported through the status check: a failed call must not write its output.
            Expect::Err(SIKV_OK)
        } else {
            want
        };
        ("attend_selected", st, want, true, ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// The stateless driver: one kernels handle over engine-owned host pools of one layer.

struct Stateless {
    k: *mut SikvKernels,
    cfg: SikvConfig,
    planes: Vec<u64>,
    state: Vec<u64>,
    pools: SikvLayerPools,
    dsize: usize,
    acts: Vec<u8>,
    pages_per_seq: u32,
    num_pages: u32,
}

impl Drop for Stateless {
    fn drop(&mut self) {
        sikv_kernels_destroy(self.k);
    }
}

fn stateless(run: &mut Run, rng: &mut Rng) -> Option<Stateless> {
    let mut cfg = tiny_config(rng);
    let mutated = rng.below(6) == 0;
    if mutated {
        mutate_config(rng, &mut cfg);
    }
    let layout = query_layout(&cfg);
    if let Some(l) = &layout {
        if l.layer_plane_bytes + l.layer_state_bytes > (32 << 20) {
            return None;
        }
    }
    let sentinel = 0x1usize as *mut SikvKernels;
    let mut k = sentinel;
    let st = sikv_kernels_create(&cfg, &mut k);
    let want = match (&layout, mutated) {
        (None, _) => Expect::AnyErr,
        (Some(_), true) => Expect::Any,
        _ => Expect::Ok,
    };
    run.status("kernels_create", st, want, &|| format!("{cfg:?}"));
    if st != SIKV_OK {
        if k != sentinel {
            run.fail("failed kernels_create wrote its out-parameter".into());
        }
        return None;
    }
    let l = layout.unwrap();
    if !drivable(&cfg) {
        sikv_kernels_destroy(k);
        return None;
    }
    let mut planes = vec![0u64; l.layer_plane_bytes.div_ceil(8) + 1];
    let mut state = vec![0u64; l.layer_state_bytes.div_ceil(8) + 1];
    let base = planes.as_mut_ptr() as *mut u8;
    let mut pools = SikvLayerPools {
        plane: [null_mut(); 7],
        state: state.as_mut_ptr() as *mut c_void,
    };
    for p in 0..7 {
        if l.plane_bytes[p] != 0 {
            pools.plane[p] = base.wrapping_add(l.plane_offset[p]) as *mut c_void;
        }
    }
    let n_acts = (cfg.max_seq_len.max(cfg.max_append_tokens).max(cfg.max_batch)
        * cfg.num_q_heads.max(cfg.num_kv_heads)
        * cfg.head_dim) as usize;
    Some(Stateless {
        k,
        cfg,
        planes,
        state,
        pools,
        dsize: if cfg.dtype == SIKV_DTYPE_F32 { 4 } else { 2 },
        acts: {
            let specials = rng.below(10) == 0;
            activations(rng, cfg.dtype, 2 * n_acts, specials)
        },
        pages_per_seq: cfg.max_seq_len.div_ceil(cfg.page_size),
        num_pages: l.num_pages,
    })
}

impl Stateless {
    fn pools_hash(&self) -> u64 {
        let b = |v: &Vec<u64>| unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8) };
        fnv(b(&self.planes)) ^ fnv(b(&self.state)).rotate_left(1)
    }

    /// A value at, inside or just past `[lo, hi)`.
    fn around(rng: &mut Rng, lo: i64, hi: i64) -> i64 {
        match rng.below(12) {
            0 => lo - 1,
            1 => hi,
            2 => pick(rng, &[i32::MIN as i64, i32::MAX as i64]),
            _ => lo + rng.below((hi - lo).max(1) as usize) as i64,
        }
    }

    fn step(&mut self, run: &mut Run, rng: &mut Rng) {
        let before = self.pools_hash();
        let cfg = self.cfg;
        let slots_total = self.num_pages as i64 * cfg.page_size as i64;
        let kh = if rng.below(64) == 0 {
            null()
        } else {
            self.k as *const SikvKernels
        };
        let pp: *const SikvLayerPools = if rng.below(64) == 0 { null() } else { &self.pools };
        let half = self.acts.len() / 2;
        let (ka, va) = (
            self.acts.as_ptr() as *const c_void,
            self.acts[half..].as_ptr() as *const c_void,
        );
        let (hq, hk, d) = (
            cfg.num_q_heads as usize,
            cfg.num_kv_heads as usize,
            cfg.head_dim as usize,
        );
        let bmax = cfg.budget_max as usize;
        let mut sentinel_ok = true;
        let op = rng.below(7);
        let (name, st, read_only): (&'static str, SikvStatus, bool) = match op {
            0 => {
                let slot = Self::around(rng, 0, cfg.max_seqs as i64) as u32;
                (
                    "kernel_reset_slot",
                    sikv_kernel_reset_slot(kh, pp, slot, null_mut()),
                    false,
                )
            }
            1 => {
                let slot = Self::around(rng, 0, cfg.max_seqs as i64) as u32;
                let n = (1 + rng.below(cfg.max_seq_len.min(48) as usize)) as u32;
                let n = if rng.below(10) == 0 {
                    pick(rng, &[0, cfg.max_seq_len + 1])
                } else {
                    n
                };
                let nq = 1 + rng.below(n.clamp(1, 4) as usize) as u32;
                let sm: Vec<i64> = (0..n.min(cfg.max_seq_len))
                    .map(|_| Self::around(rng, -1, slots_total))
                    .collect();
                let st = sikv_kernel_calibrate(kh, pp, slot, n, ka, va, nq, ka, sm.as_ptr(), null_mut(), 0, null_mut());
                ("kernel_calibrate", st, false)
            }
            2 => {
                let n = match rng.below(10) {
                    0 => pick(rng, &[0, cfg.max_append_tokens + 1]),
                    _ => 1 + rng.below(cfg.max_append_tokens as usize) as u32,
                };
                let m = n.min(cfg.max_append_tokens) as usize;
                let sm: Vec<i64> = (0..m).map(|_| Self::around(rng, -1, slots_total)).collect();
                let ss: Vec<i32> = (0..m)
                    .map(|_| Self::around(rng, 0, cfg.max_seqs as i64) as i32)
                    .collect();
                let pos: Vec<i32> = (0..m)
                    .map(|_| Self::around(rng, 0, cfg.max_seq_len as i64) as i32)
                    .collect();
                let st = sikv_kernel_append(kh, pp, n, ka, va, sm.as_ptr(), ss.as_ptr(), pos.as_ptr(), null_mut());
                ("kernel_append", st, false)
            }
            _ => {
                let batch = match rng.below(12) {
                    0 => pick(rng, &[0, cfg.max_batch + 1]),
                    _ => 1 + rng.below(cfg.max_batch as usize) as u32,
                };
                let b = batch.min(cfg.max_batch) as usize;
                let max_total = cfg.max_batch as usize * self.pages_per_seq as usize;
                // A well-formed CSR table most of the time, with pages and lengths that may
                // point anywhere in or just outside the pool.
                let mut indptr = vec![0i32];
                for _ in 0..b {
                    let np = rng.below(self.pages_per_seq as usize + 2) as i32;
                    indptr.push(indptr.last().unwrap() + np);
                }
                if rng.below(10) == 0 {
                    let i = rng.below(indptr.len());
                    indptr[i] = Self::around(rng, -1, max_total as i64 + 1) as i32;
                }
                let indices: Vec<i32> = (0..max_total + 2)
                    .map(|_| Self::around(rng, 0, self.num_pages as i64) as i32)
                    .collect();
                let lpl: Vec<i32> = (0..b)
                    .map(|_| Self::around(rng, 0, cfg.page_size as i64 + 1) as i32)
                    .collect();
                let mut pt = SikvPageTable {
                    indptr: indptr.as_ptr(),
                    indices: indices.as_ptr(),
                    last_page_len: lpl.as_ptr(),
                    batch,
                };
                if rng.below(32) == 0 {
                    pt.indptr = null();
                }
                let ss: Vec<i32> = (0..b)
                    .map(|_| Self::around(rng, 0, cfg.max_seqs as i64) as i32)
                    .collect();
                let mut out = vec![SENT8; b * hq * d * self.dsize];
                let mut idx = vec![SENT32; b * hk * bmax];
                let mut cnt = vec![SENT32; b * hk];
                let (name, st) = match op {
                    3 => (
                        "kernel_select",
                        sikv_kernel_select(
                            kh,
                            pp,
                            &pt,
                            ss.as_ptr(),
                            ka,
                            idx.as_mut_ptr(),
                            cnt.as_mut_ptr(),
                            null_mut(),
                            0,
                            null_mut(),
                        ),
                    ),
                    4 => {
                        let gi: Vec<i32> = (0..b * hk * bmax)
                            .map(|_| Self::around(rng, -1, cfg.max_seq_len as i64) as i32)
                            .collect();
                        let gc: Vec<i32> = (0..b * hk)
                            .map(|_| Self::around(rng, 0, bmax as i64 + 1) as i32)
                            .collect();
                        let st = sikv_kernel_attend(
                            kh,
                            pp,
                            &pt,
                            ss.as_ptr(),
                            ka,
                            gi.as_ptr(),
                            gc.as_ptr(),
                            out.as_mut_ptr() as *mut c_void,
                            null_mut(),
                            0,
                            null_mut(),
                        );
                        ("kernel_attend", st)
                    }
                    5 => (
                        "kernel_attend_dense",
                        sikv_kernel_attend_dense(
                            kh,
                            pp,
                            &pt,
                            ss.as_ptr(),
                            ka,
                            out.as_mut_ptr() as *mut c_void,
                            null_mut(),
                            0,
                            null_mut(),
                        ),
                    ),
                    _ => (
                        "kernel_decode",
                        sikv_kernel_decode(
                            kh,
                            pp,
                            &pt,
                            ss.as_ptr(),
                            ka,
                            out.as_mut_ptr() as *mut c_void,
                            null_mut(),
                            0,
                            null_mut(),
                        ),
                    ),
                };
                if st != SIKV_OK {
                    sentinel_ok = out.iter().all(|&x| x == SENT8) && idx.iter().chain(&cnt).all(|&x| x == SENT32);
                }
                (name, st, true)
            }
        };
        let want = if kh.is_null() || pp.is_null() {
            Expect::Err(SIKV_ERR_NULL_POINTER)
        } else {
            Expect::Any
        };
        let ok = run.status(name, st, want, &|| format!("stateless op {op}, {cfg:?}"));
        let after = self.pools_hash();
        if (!ok || read_only) && after != before {
            run.fail(format!("{name} returned {st:?} and changed the engine's pools"));
        }
        if !sentinel_ok {
            run.fail(format!("failed {name} ({st:?}) wrote its output"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

fn fuzz(seed: u64, calls: u64) -> Run {
    let mut rng = Rng(seed);
    let mut run = Run {
        seed,
        calls: 0,
        trace: std::env::var("SIKV_FUZZ_TRACE").is_ok_and(|v| v == "1"),
        failures: vec![],
        ok: HashMap::new(),
        err: HashMap::new(),
    };
    let mut managed: Option<Managed> = None;
    let mut kernels: Option<Stateless> = None;
    while run.calls < calls && run.failures.is_empty() {
        // A new cache now and then (the old one destroyed), so that many configurations run.
        if managed.is_none() || rng.below(400) == 0 {
            drop(managed.take());
            managed = create(&mut run, &mut rng);
            continue;
        }
        if kernels.is_none() || rng.below(300) == 0 {
            drop(kernels.take());
            kernels = stateless(&mut run, &mut rng);
            continue;
        }
        if rng.below(5) == 0 {
            kernels.as_mut().unwrap().step(&mut run, &mut rng);
        } else {
            managed.as_mut().unwrap().step(&mut run, &mut rng);
        }
    }
    run
}

fn report(run: &Run) {
    let mut names: Vec<_> = run.ok.keys().chain(run.err.keys()).copied().collect();
    names.sort();
    names.dedup();
    for n in &names {
        println!(
            "  {n:>24}: {:>8} ok {:>8} failed",
            run.ok.get(n).unwrap_or(&0),
            run.err.get(n).unwrap_or(&0)
        );
    }
    assert!(
        run.failures.is_empty(),
        "{} failure(s):\n{}",
        run.failures.len(),
        run.failures.join("\n")
    );
}

#[test]
fn call_sequences_keep_the_abi_contract() {
    let seed = common::seed("call_sequences_keep_the_abi_contract");
    let calls: u64 = std::env::var("SIKV_FUZZ_CALLS")
        .map(|s| s.trim().parse().expect("SIKV_FUZZ_CALLS must be a number"))
        .unwrap_or(20_000);
    let t = std::time::Instant::now();
    let run = fuzz(seed, calls);
    println!("{} calls in {:.1} s", run.calls, t.elapsed().as_secs_f64());
    report(&run);
    // The run must have reached the interesting paths, not only bounced off argument checks.
    if calls >= 20_000 {
        for n in [
            "seq_add",
            "seq_fork",
            "calibrate",
            "append",
            "attend",
            "select",
            "attend_selected",
            "attend_dense",
        ] {
            assert!(
                run.ok.get(n).copied().unwrap_or(0) > 0,
                "seed {seed:#x}: no successful {n} in {} calls",
                run.calls
            );
        }
        for e in ["append", "calibrate", "seq_fork"] {
            assert!(
                run.err.get(e).copied().unwrap_or(0) > 0,
                "seed {seed:#x}: no failed {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal replays of what fuzzing found

/// Found by a coverage-guided run over `sikv_query_layout` (docs/RELIABILITY.md): the
/// configuration validation accepts num_layers = 0xF6F6F600 with 0xF6F6F6F6 query and KV
/// heads, and the layout's size products overflow (`layer_plane_bytes * num_layers`). A debug
/// build panics inside the call (SIKV_ERR_INTERNAL, handle-less); a release build wraps, so
/// the reported pool sizes are wrong — and `sikv_cache_create_with_pools` trusts the same
/// figures for engine-owned pools. The call must either reject the configuration or report
/// sizes that are the true products (fixed: the configuration now bounds the pools' sizes).
#[test]
fn huge_layer_and_head_counts_do_not_overflow_the_layout() {
    let mut c = config_init(SIKV_PROFILE_2_1);
    c.device = SIKV_DEVICE_CPU;
    c.device_ordinal = 0x0002_9696;
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 0xF6F6_F600;
    c.num_q_heads = 0xF6F6_F6F6;
    c.num_kv_heads = 0xF6F6_F6F6;
    let mut l = MaybeUninit::<SikvLayoutInfo>::uninit();
    let st = sikv_query_layout(&c, l.as_mut_ptr());
    assert_ne!(st, SIKV_ERR_INTERNAL, "{}", msg());
    // The configuration check now bounds the pools' sizes: such a configuration is refused.
    assert_eq!(st, SIKV_ERR_OUT_OF_BOUNDS, "{}", msg());
    if st == SIKV_OK {
        let l = unsafe { l.assume_init() };
        let want = (l.layer_plane_bytes as u128) * c.num_layers as u128;
        assert_eq!(l.total_plane_bytes as u128, want, "total_plane_bytes wrapped around");
    }
}
