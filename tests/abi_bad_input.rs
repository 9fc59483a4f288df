//! One table of bad input over every export of the C ABI that takes input (architecture §3):
//! one row per (export, bad argument), each a call with exactly one argument made bad — a NULL
//! pointer, a NULL handle, a count one past its bound, a pool size one byte short, a misaligned
//! typed pointer, an unknown enum value — and the status, the message and the unchanged state
//! it must give. Every row is checked for:
//!
//! - the exact status;
//! - a last-error message that is fresh (a distinct message is planted before the row) and
//!   names the argument;
//! - an unchanged fixture: the managed cache's checksum, and a hash of every byte of host
//!   memory the "engine" owns — the stateless layer's pools, the pools lent to
//!   `sikv_cache_create_with_pools`, every input array, and every out-parameter and output
//!   buffer, all pre-filled with a sentinel. Hashing everything (not only the row's own
//!   out-parameters) also catches a call that writes somewhere it should not.
//!
//! Each export has one good call (its arguments as a struct, in the header's order); each row
//! is that call with one argument edited, and every good call is checked to succeed on a fresh
//! copy of the fixture, so a row fails for its one bad argument and nothing else. Mismatches
//! are collected and reported together, with the count of rows per export.
//!
//! What the table does not have, and why:
//! - Misaligned activations (`k`, `v`, `q`, `q_tail`, `out`) and pool pointers: the ABI types
//!   them `void *` and the CPU backend reads them as bytes, so no alignment is required.
//! - `workspace_bytes` one too small: the CPU backend needs no workspace
//!   (`sikv_workspace_size` reports 0), so no size is short; the GPU path checks it.
//! - Lengths of host arrays the caller does not pass (q, k, out, ...): the ABI derives them
//!   from the configuration and the counts, so "one too small" is the count rows.
//! - A misaligned handle: handles are opaque and only come from `*_create`.
//! - `sikv_version`, `sikv_abi_version`, `sikv_build_info`, `sikv_last_error_message`,
//!   `sikv_last_error_cuda_code`: they take no arguments.

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

mod common;

use common::Rng;
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::layout::SIKV_PLANE_SIGN;
use selfindexkv::SikvStatus::{self, *};

/// The byte every out-parameter and output buffer is pre-filled with.
const SENTINEL: u8 = 0xA5;

fn msg() -> String {
    unsafe { CStr::from_ptr(sikv_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Leaves a last-error message that no row produces, so a row whose call sets no message of its
/// own cannot pass on an earlier row's.
fn plant_stale_message() -> String {
    let mut c = std::mem::MaybeUninit::<SikvConfig>::uninit();
    assert_eq!(sikv_config_init(c.as_mut_ptr(), 0xDEAD), SIKV_ERR_UNSUPPORTED);
    msg()
}

// ---------------------------------------------------------------------------------------------
// Engine-owned host memory.

/// Host memory with a stable address, 8-byte aligned, with 8 spare bytes at the end so a
/// pointer one byte in still addresses as many bytes as an aligned one.
struct Buf {
    words: Vec<u64>,
    bytes: usize,
}

impl Buf {
    fn base(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }
}

/// Two pointers into one host buffer: its aligned start and one byte past it.
#[derive(Clone, Copy)]
struct At<T> {
    ok: *mut T,
    mis: *mut T,
}

impl<T> At<T> {
    fn c(self) -> *const T {
        self.ok
    }
    fn cmis(self) -> *const T {
        self.mis
    }
    fn void(self) -> *mut c_void {
        self.ok as *mut c_void
    }
}

fn vals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.range(-1.0, 1.0) + 1e-3).collect()
}

// ---------------------------------------------------------------------------------------------
// One struct per export: its arguments, in the header's order, and the call.

macro_rules! args {
    ($name:ident => $f:ident { $($arg:ident : $ty:ty),* $(,)? }) => {
        #[derive(Clone, Copy)]
        struct $name { $($arg: $ty),* }
        impl $name {
            fn call(self) -> SikvStatus {
                $f($(self.$arg),*)
            }
        }
    };
}

args!(ConfigInit => sikv_config_init { out: *mut SikvConfig, profile: u32 });
args!(QueryLayout => sikv_query_layout { config: *const SikvConfig, out: *mut SikvLayoutInfo });
args!(CacheCreate => sikv_cache_create { config: *const SikvConfig, out: *mut *mut SikvCache });
args!(CacheCreateWithPools => sikv_cache_create_with_pools {
    config: *const SikvConfig, pools: *const SikvPoolsDesc, out: *mut *mut SikvCache,
});
args!(CacheInfo => sikv_cache_info { cache: *const SikvCache, out: *mut SikvCacheInfo });
args!(CacheChecksum => sikv_cache_checksum { cache: *const SikvCache, out: *mut u64 });
args!(SeqAdd => sikv_seq_add { cache: *mut SikvCache, seq_id: i64 });
args!(SeqRemove => sikv_seq_remove { cache: *mut SikvCache, seq_id: i64 });
args!(SeqFork => sikv_seq_fork { cache: *mut SikvCache, src_seq_id: i64, dst_seq_id: i64 });
args!(SeqLen => sikv_seq_len { cache: *const SikvCache, seq_id: i64, layer: u32, out: *mut u32 });
args!(Calibrate => sikv_calibrate {
    cache: *mut SikvCache, layer: u32, seq_id: i64, n_tokens: u32, k: *const c_void,
    v: *const c_void, n_query: u32, q_tail: *const c_void, stream: SikvStream,
});
args!(Append => sikv_append {
    cache: *mut SikvCache, layer: u32, n_seqs: u32, seq_ids: *const i64, n_tokens: *const u32,
    k: *const c_void, v: *const c_void, stream: SikvStream,
});
args!(Attend => sikv_attend {
    cache: *mut SikvCache, layer: u32, n_seqs: u32, seq_ids: *const i64, q: *const c_void,
    out: *mut c_void, stream: SikvStream,
});
args!(AttendDense => sikv_attend_dense {
    cache: *mut SikvCache, layer: u32, n_seqs: u32, seq_ids: *const i64, q: *const c_void,
    out: *mut c_void, stream: SikvStream,
});
args!(AttendSelected => sikv_attend_selected {
    cache: *mut SikvCache, layer: u32, n_seqs: u32, seq_ids: *const i64, q: *const c_void,
    indices: *const i32, counts: *const i32, out: *mut c_void, stream: SikvStream,
});
args!(AttendRows => sikv_attend_rows {
    cache: *mut SikvCache, layer: u32, n_seqs: u32, seq_ids: *const i64, rows: *const u32,
    q: *const c_void, out: *mut c_void, stream: SikvStream,
});
args!(Select => sikv_select {
    cache: *mut SikvCache, layer: u32, n_seqs: u32, seq_ids: *const i64, q: *const c_void,
    indices: *mut i32, counts: *mut i32, stream: SikvStream,
});
args!(SelectionRecall => sikv_selection_recall {
    cache: *mut SikvCache, layer: u32, seq_id: i64, q: *const f32, k_exact: *const f32,
    recall: *mut f32,
});
args!(KernelsCreate => sikv_kernels_create { config: *const SikvConfig, out: *mut *mut SikvKernels });
args!(WorkspaceSize => sikv_workspace_size { kernels: *const SikvKernels, batch: u32, out: *mut usize });
args!(KernelCalibrate => sikv_kernel_calibrate {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, seq_slot: u32, n_tokens: u32,
    k: *const c_void, v: *const c_void, n_query: u32, q_tail: *const c_void,
    slot_mapping: *const i64, workspace: *mut c_void, workspace_bytes: usize, stream: SikvStream,
});
args!(KernelAppend => sikv_kernel_append {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, n_tokens: u32, k: *const c_void,
    v: *const c_void, slot_mapping: *const i64, seq_slot: *const i32, position: *const i32,
    stream: SikvStream,
});
args!(KernelSelect => sikv_kernel_select {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, page_table: *const SikvPageTable,
    seq_slot: *const i32, q: *const c_void, indices: *mut i32, counts: *mut i32,
    workspace: *mut c_void, workspace_bytes: usize, stream: SikvStream,
});
args!(KernelAttend => sikv_kernel_attend {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, page_table: *const SikvPageTable,
    seq_slot: *const i32, q: *const c_void, indices: *const i32, counts: *const i32,
    out: *mut c_void, workspace: *mut c_void, workspace_bytes: usize, stream: SikvStream,
});
args!(KernelAttendDense => sikv_kernel_attend_dense {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, page_table: *const SikvPageTable,
    seq_slot: *const i32, q: *const c_void, out: *mut c_void, workspace: *mut c_void,
    workspace_bytes: usize, stream: SikvStream,
});
args!(KernelResetSlot => sikv_kernel_reset_slot {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, seq_slot: u32, stream: SikvStream,
});
args!(KernelDecode => sikv_kernel_decode {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, page_table: *const SikvPageTable,
    seq_slot: *const i32, q: *const c_void, out: *mut c_void, workspace: *mut c_void,
    workspace_bytes: usize, stream: SikvStream,
});
args!(WorkspaceSizeRows => sikv_workspace_size_rows { kernels: *const SikvKernels, n_rows: u32, out: *mut usize });
args!(KernelDecodeRows => sikv_kernel_decode_rows {
    kernels: *const SikvKernels, pools: *const SikvLayerPools, page_table: *const SikvPageTable,
    seq_slot: *const i32, row_offsets: *const i32, n_rows: u32, q: *const c_void, out: *mut c_void,
    workspace: *mut c_void, workspace_bytes: usize, stream: SikvStream,
});

// `*_destroy` return nothing; their one bad input, NULL, is defined as a no-op.
args!(CacheDestroy => cache_destroy { cache: *mut SikvCache });
args!(KernelsDestroy => kernels_destroy { kernels: *mut SikvKernels });

fn cache_destroy(cache: *mut SikvCache) -> SikvStatus {
    sikv_cache_destroy(cache);
    SIKV_OK
}

fn kernels_destroy(kernels: *mut SikvKernels) -> SikvStatus {
    sikv_kernels_destroy(kernels);
    SIKV_OK
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Row {
    name: String,
    call: Box<dyn Fn() -> SikvStatus>,
    want: SikvStatus,
    /// What the last-error message must contain (unchecked when `want` is SIKV_OK).
    needle: String,
}

struct Good {
    export: &'static str,
    call: Box<dyn Fn() -> SikvStatus>,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
    goods: Vec<Good>,
}

impl Table {
    /// The rows of one export: `good` must succeed (checked on a fresh fixture); each row is
    /// `good` with one argument edited.
    fn export<A: Copy + 'static>(&mut self, export: &'static str, call: fn(A) -> SikvStatus, good: A) -> Rows<'_, A> {
        self.goods.push(Good {
            export,
            call: Box::new(move || call(good)),
        });
        self.no_baseline(export, call, good)
    }

    /// The rows of an export whose good call is not run on the fixture (`*_destroy`: it would
    /// free the fixture's handles).
    fn no_baseline<A: Copy + 'static>(
        &mut self,
        export: &'static str,
        call: fn(A) -> SikvStatus,
        good: A,
    ) -> Rows<'_, A> {
        Rows {
            table: self,
            export,
            call,
            good,
        }
    }
}

/// Adds the rows of one export to the table.
struct Rows<'t, A> {
    table: &'t mut Table,
    export: &'static str,
    call: fn(A) -> SikvStatus,
    good: A,
}

impl<A: Copy + 'static> Rows<'_, A> {
    /// The good call with `edit` applied must return `want` and a message containing `needle`.
    fn bad(&mut self, what: &str, want: SikvStatus, needle: &str, edit: impl FnOnce(&mut A)) -> &mut Self {
        let mut a = self.good;
        edit(&mut a);
        let call = self.call;
        self.table.rows.push(Row {
            name: format!("{}: {what}", self.export),
            call: Box::new(move || call(a)),
            want,
            needle: needle.to_string(),
        });
        self
    }

    /// A NULL pointer: SIKV_ERR_NULL_POINTER, and the message names the argument.
    fn null(&mut self, arg: &str, edit: impl FnOnce(&mut A)) -> &mut Self {
        self.bad(&format!("{arg} NULL"), SIKV_ERR_NULL_POINTER, &format!("`{arg}`"), edit)
    }

    /// A typed pointer one byte past an aligned one: SIKV_ERR_MISALIGNED.
    fn mis(&mut self, arg: &str, edit: impl FnOnce(&mut A)) -> &mut Self {
        self.bad(
            &format!("{arg} misaligned"),
            SIKV_ERR_MISALIGNED,
            &format!("`{arg}`"),
            edit,
        )
    }

    /// One row per entry of a shared list of bad values for one argument.
    fn each<T: Copy>(&mut self, list: &[BadValue<T>], set: impl Fn(&mut A, T)) -> &mut Self {
        for &(what, value, want, needle) in list {
            self.bad(what, want, needle, |a| set(a, value));
        }
        self
    }
}

/// A bad value shared by several exports: name, value, status, message needle.
type BadValue<T> = (&'static str, T, SikvStatus, &'static str);

// ---------------------------------------------------------------------------------------------
// The fixture: a managed cache with calibrated sequences, a stateless kernels handle over
// engine-owned pools of one layer with calibrated slots, and every buffer the calls take.

fn config() -> SikvConfig {
    let mut c = std::mem::MaybeUninit::<SikvConfig>::uninit();
    assert_eq!(sikv_config_init(c.as_mut_ptr(), SIKV_PROFILE_2_1), SIKV_OK);
    let mut c = unsafe { c.assume_init() };
    c.device = SIKV_DEVICE_CPU;
    c.dtype = SIKV_DTYPE_F32;
    c.num_layers = 2;
    c.num_q_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.page_size = 16;
    c.num_pages = 0;
    c.max_seqs = 6;
    c.max_seq_len = 256;
    c.max_batch = 2;
    c.max_append_tokens = 32;
    c.n_sink = 2;
    c.n_heavy = 4;
    c.n_window = 8;
    c.budget_min = 8;
    c.budget_max = 32;
    c
}

/// Managed sequences: ids 1, 2 and 4 calibrated at both layers with this many tokens, id 3
/// added but not calibrated.
const SEQS: [(i64, u32); 3] = [(1, 40), (2, 24), (4, 30)];
const UNCALIBRATED: i64 = 3;
/// An id the cache never holds.
const UNKNOWN: i64 = 99;

struct Fx {
    cfg: SikvConfig,
    info: SikvLayoutInfo,
    cache: *mut SikvCache,
    kernels: *mut SikvKernels,
    mem: Vec<Buf>,
    /// Out-parameters of the create calls: what a good call creates is destroyed with the
    /// fixture.
    made_caches: Vec<*mut *mut SikvCache>,
    made_kernels: Vec<*mut *mut SikvKernels>,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let unset = usize::from_ne_bytes([SENTINEL; std::mem::size_of::<usize>()]);
        for &p in &self.made_caches {
            let h = unsafe { p.read() };
            if h as usize != unset {
                sikv_cache_destroy(h);
            }
        }
        for &p in &self.made_kernels {
            let h = unsafe { p.read() };
            if h as usize != unset {
                sikv_kernels_destroy(h);
            }
        }
        sikv_cache_destroy(self.cache);
        sikv_kernels_destroy(self.kernels);
    }
}

impl Fx {
    /// `n` bytes of sentinel, plus the spare word.
    fn alloc(&mut self, n: usize) -> *mut u8 {
        let words = n.div_ceil(8) + 1;
        let mut b = Buf {
            words: vec![u64::from_ne_bytes([SENTINEL; 8]); words],
            bytes: words * 8,
        };
        let p = b.base();
        self.mem.push(b);
        p
    }

    /// Room for `n` values of `T`, filled with the sentinel (out-parameters, outputs).
    fn out<T>(&mut self, n: usize) -> At<T> {
        let p = self.alloc(n * std::mem::size_of::<T>());
        At {
            ok: p as *mut T,
            mis: p.wrapping_add(1) as *mut T,
        }
    }

    /// `vals` in host memory, once at an aligned address and once one byte past one.
    fn put<T: Copy>(&mut self, vals: &[T]) -> At<T> {
        let n = std::mem::size_of_val(vals);
        let ok = self.alloc(n);
        let mis = self.alloc(n).wrapping_add(1);
        unsafe {
            std::ptr::copy_nonoverlapping(vals.as_ptr() as *const u8, ok, n);
            std::ptr::copy_nonoverlapping(vals.as_ptr() as *const u8, mis, n);
        }
        At {
            ok: ok as *mut T,
            mis: mis as *mut T,
        }
    }

    /// A configuration in host memory, `edit`ed.
    fn config_with(&mut self, edit: impl FnOnce(&mut SikvConfig)) -> *const SikvConfig {
        let mut c = self.cfg;
        edit(&mut c);
        self.put(&[c]).c()
    }

    /// The state a failed call must leave as it was.
    fn snapshot(&self) -> (u64, u64) {
        let mut sum = 0u64;
        let s = sikv_cache_checksum(self.cache, &mut sum);
        assert_eq!(s, SIKV_OK, "checksum of the fixture cache: {}", msg());
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in &self.mem {
            let bytes = unsafe { std::slice::from_raw_parts(b.words.as_ptr() as *const u8, b.bytes) };
            for chunk in bytes.chunks(8) {
                let mut w = [0u8; 8];
                w[..chunk.len()].copy_from_slice(chunk);
                h = (h ^ u64::from_ne_bytes(w))
                    .wrapping_mul(0x100_0000_01B3)
                    .rotate_left(29);
            }
        }
        (sum, h)
    }

    fn new(seed: u64) -> (Fx, Table) {
        let cfg = config();
        let mut fx = Fx {
            cfg,
            info: SikvLayoutInfo::default(),
            cache: null_mut(),
            kernels: null_mut(),
            mem: Vec::new(),
            made_caches: Vec::new(),
            made_kernels: Vec::new(),
        };
        assert_eq!(sikv_query_layout(&cfg, &mut fx.info), SIKV_OK, "{}", msg());
        assert_eq!(sikv_cache_create(&cfg, &mut fx.cache), SIKV_OK, "{}", msg());
        assert_eq!(sikv_kernels_create(&cfg, &mut fx.kernels), SIKV_OK, "{}", msg());
        let mut rng = Rng(seed);
        let (hq, hk, d) = (
            cfg.num_q_heads as usize,
            cfg.num_kv_heads as usize,
            cfg.head_dim as usize,
        );
        // Activations for the most tokens any row names (one past each bound), so that even a
        // call that ignored a bound would read inside the buffer.
        let max_tokens = cfg.max_seq_len.max(cfg.max_append_tokens) as usize + 1;
        let k = vals(&mut rng, max_tokens * hk * d);
        let v = vals(&mut rng, max_tokens * hk * d);
        let q = vals(&mut rng, (cfg.max_batch as usize + 1) * hq * d);
        let (kp, vp, qp) = (fx.put(&k), fx.put(&v), fx.put(&q));
        let (kc, vc, qc) = (
            kp.c() as *const c_void,
            vp.c() as *const c_void,
            qp.c() as *const c_void,
        );

        // The managed cache.
        let cache = fx.cache;
        for (id, n) in SEQS {
            assert_eq!(sikv_seq_add(cache, id), SIKV_OK, "{}", msg());
            for l in 0..cfg.num_layers {
                let s = sikv_calibrate(cache, l, id, n, kc, vc, 1, qc, null_mut());
                assert_eq!(s, SIKV_OK, "{}", msg());
            }
        }
        assert_eq!(sikv_seq_add(cache, UNCALIBRATED), SIKV_OK, "{}", msg());
        // Two good ids, then a third for a batch one past max_batch (all calibrated, so only
        // the count is wrong), then one with an unknown id.
        let ids = fx.put(&[1i64, 2, 4]);
        let ids_unknown = fx.put(&[1i64, UNKNOWN]);
        let one_id = fx.put(&[1i64]);
        let rows = 2 * hk;
        let kmax = cfg.budget_max as usize;
        let mut sel_idx = vec![0i32; (cfg.max_batch as usize + 1) * hk * kmax];
        let mut sel_cnt = vec![0i32; (cfg.max_batch as usize + 1) * hk];
        let s = sikv_select(
            cache,
            0,
            2,
            ids.c(),
            qc,
            sel_idx.as_mut_ptr(),
            sel_cnt.as_mut_ptr(),
            null_mut(),
        );
        assert_eq!(s, SIKV_OK, "{}", msg());
        assert!(sel_cnt[..rows].iter().all(|&c| c > 0));
        let sel_idx = fx.put(&sel_idx);
        let sel_cnt = fx.put(&sel_cnt);

        let mut t = Table::default();
        let cfg_ok = fx.config_with(|_| {});
        let cfg_mis = fx.put(&[cfg]).cmis();
        // Unknown enum values and flag bits (the first value past each known one), and a
        // head ratio that does not divide: for every export that takes a configuration.
        let cfg_bad: Vec<BadValue<*const SikvConfig>> = vec![
            ("config NULL", null(), SIKV_ERR_NULL_POINTER, "`config`"),
            ("config misaligned", cfg_mis, SIKV_ERR_MISALIGNED, "`config`"),
            (
                "config.device unknown",
                fx.config_with(|c| c.device = SIKV_DEVICE_CUDA + 1),
                SIKV_ERR_UNSUPPORTED,
                "config.device",
            ),
            (
                "config.dtype unknown",
                fx.config_with(|c| c.dtype = SIKV_DTYPE_F32 + 1),
                SIKV_ERR_UNSUPPORTED,
                "config.dtype",
            ),
            (
                "config.selector unknown",
                fx.config_with(|c| c.selector = SIKV_SELECTOR_SIGN_SIGN + 1),
                SIKV_ERR_UNSUPPORTED,
                "config.selector",
            ),
            (
                "config.centre unknown",
                fx.config_with(|c| c.centre = SIKV_CENTRE_MEAN + 1),
                SIKV_ERR_UNSUPPORTED,
                "config.centre",
            ),
            (
                "config.flags unknown bit",
                fx.config_with(|c| c.flags = SIKV_FLAG_ROWS_MEAN_QUERY << 1),
                SIKV_ERR_UNSUPPORTED,
                "config.flags",
            ),
            (
                "config.num_q_heads not a multiple of num_kv_heads",
                fx.config_with(|c| c.num_q_heads = 3),
                SIKV_ERR_INVALID_ARGUMENT,
                "num_q_heads",
            ),
        ];
        let (layers, max_batch, max_seqs) = (cfg.num_layers, cfg.max_batch, cfg.max_seqs);

        // ---- configuration and creation
        let out = fx.out::<SikvConfig>(1);
        let good = ConfigInit {
            out: out.ok,
            profile: SIKV_PROFILE_2_1,
        };
        t.export("sikv_config_init", ConfigInit::call, good)
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis)
            .bad("profile unknown", SIKV_ERR_UNSUPPORTED, "profile 4", |a| {
                a.profile = SIKV_PROFILE_PARITY + 1
            });

        let out = fx.out::<SikvLayoutInfo>(1);
        let good = QueryLayout {
            config: cfg_ok,
            out: out.ok,
        };
        t.export("sikv_query_layout", QueryLayout::call, good)
            .each(&cfg_bad, |a, c| a.config = c)
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        let out = fx.out::<*mut SikvCache>(1);
        fx.made_caches.push(out.ok);
        let good = CacheCreate {
            config: cfg_ok,
            out: out.ok,
        };
        t.export("sikv_cache_create", CacheCreate::call, good)
            .each(&cfg_bad, |a, c| a.config = c)
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        // The lent pools hold the sentinel, so a failed call that touched them (a successful
        // one zeroes the state pool) shows in the hash.
        let out = fx.out::<*mut SikvCache>(1);
        fx.made_caches.push(out.ok);
        let desc = SikvPoolsDesc {
            planes: fx.alloc(fx.info.total_plane_bytes) as *mut c_void,
            planes_bytes: fx.info.total_plane_bytes,
            state: fx.alloc(fx.info.total_state_bytes) as *mut c_void,
            state_bytes: fx.info.total_state_bytes,
            workspace: null_mut(),
            workspace_bytes: 0,
        };
        let pools = fx.put(&[desc]);
        let mut pools_with = |edit: &dyn Fn(&mut SikvPoolsDesc)| {
            let mut d = desc;
            edit(&mut d);
            fx.put(&[d]).c()
        };
        let no_planes = pools_with(&|d| d.planes = null_mut());
        let no_state = pools_with(&|d| d.state = null_mut());
        let short_planes = pools_with(&|d| d.planes_bytes -= 1);
        let short_state = pools_with(&|d| d.state_bytes -= 1);
        let good = CacheCreateWithPools {
            config: cfg_ok,
            pools: pools.c(),
            out: out.ok,
        };
        t.export("sikv_cache_create_with_pools", CacheCreateWithPools::call, good)
            .each(&cfg_bad, |a, c| a.config = c)
            .null("pools", |a| a.pools = null())
            .mis("pools", |a| a.pools = pools.cmis())
            .null("pools.planes", |a| a.pools = no_planes)
            .null("pools.state", |a| a.pools = no_state)
            .bad(
                "pools.planes_bytes one too small",
                SIKV_ERR_BUFFER_TOO_SMALL,
                "pools.planes_bytes",
                |a| a.pools = short_planes,
            )
            .bad(
                "pools.state_bytes one too small",
                SIKV_ERR_BUFFER_TOO_SMALL,
                "pools.state_bytes",
                |a| a.pools = short_state,
            )
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        let out = fx.out::<*mut SikvKernels>(1);
        fx.made_kernels.push(out.ok);
        let good = KernelsCreate {
            config: cfg_ok,
            out: out.ok,
        };
        t.export("sikv_kernels_create", KernelsCreate::call, good)
            .each(&cfg_bad, |a, c| a.config = c)
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        // NULL is defined as a no-op for both destroys: status "OK" stands for "returned".
        t.no_baseline("sikv_cache_destroy", CacheDestroy::call, CacheDestroy { cache })
            .bad("cache NULL (a no-op)", SIKV_OK, "", |a| a.cache = null_mut());
        t.no_baseline(
            "sikv_kernels_destroy",
            KernelsDestroy::call,
            KernelsDestroy { kernels: fx.kernels },
        )
        .bad("kernels NULL (a no-op)", SIKV_OK, "", |a| a.kernels = null_mut());

        // ---- the managed cache: queries and sequences
        let out = fx.out::<SikvCacheInfo>(1);
        t.export("sikv_cache_info", CacheInfo::call, CacheInfo { cache, out: out.ok })
            .null("cache", |a| a.cache = null())
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        let out = fx.out::<u64>(1);
        t.export(
            "sikv_cache_checksum",
            CacheChecksum::call,
            CacheChecksum { cache, out: out.ok },
        )
        .null("cache", |a| a.cache = null())
        .null("out", |a| a.out = null_mut())
        .mis("out", |a| a.out = out.mis);

        t.export("sikv_seq_add", SeqAdd::call, SeqAdd { cache, seq_id: 9 })
            .null("cache", |a| a.cache = null_mut())
            .bad("seq_id exists", SIKV_ERR_SEQUENCE_EXISTS, "sequence 1", |a| {
                a.seq_id = 1
            });

        t.export("sikv_seq_remove", SeqRemove::call, SeqRemove { cache, seq_id: 2 })
            .null("cache", |a| a.cache = null_mut())
            .bad("seq_id unknown", SIKV_ERR_UNKNOWN_SEQUENCE, "sequence 99", |a| {
                a.seq_id = UNKNOWN
            });

        let good = SeqFork {
            cache,
            src_seq_id: 1,
            dst_seq_id: 9,
        };
        t.export("sikv_seq_fork", SeqFork::call, good)
            .null("cache", |a| a.cache = null_mut())
            .bad("src_seq_id unknown", SIKV_ERR_UNKNOWN_SEQUENCE, "sequence 99", |a| {
                a.src_seq_id = UNKNOWN
            })
            .bad("dst_seq_id exists", SIKV_ERR_SEQUENCE_EXISTS, "sequence 2", |a| {
                a.dst_seq_id = 2
            });

        let out = fx.out::<u32>(1);
        let good = SeqLen {
            cache,
            seq_id: 1,
            layer: 1,
            out: out.ok,
        };
        t.export("sikv_seq_len", SeqLen::call, good)
            .null("cache", |a| a.cache = null())
            .bad("seq_id unknown", SIKV_ERR_UNKNOWN_SEQUENCE, "sequence 99", |a| {
                a.seq_id = UNKNOWN
            })
            .bad("layer = num_layers", SIKV_ERR_OUT_OF_BOUNDS, "layer", |a| {
                a.layer = layers
            })
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        // ---- the managed cache: calibrate and append
        let good = Calibrate {
            cache,
            layer: 0,
            seq_id: UNCALIBRATED,
            n_tokens: 20,
            k: kc,
            v: vc,
            n_query: 1,
            q_tail: qc,
            stream: null_mut(),
        };
        t.export("sikv_calibrate", Calibrate::call, good)
            .null("cache", |a| a.cache = null_mut())
            .bad("layer = num_layers", SIKV_ERR_OUT_OF_BOUNDS, "layer", |a| {
                a.layer = layers
            })
            .bad("seq_id unknown", SIKV_ERR_UNKNOWN_SEQUENCE, "sequence 99", |a| {
                a.seq_id = UNKNOWN
            })
            .bad("n_tokens = max_seq_len + 1", SIKV_ERR_OUT_OF_BOUNDS, "n_tokens", |a| {
                a.n_tokens = cfg.max_seq_len + 1
            })
            .bad(
                "n_tokens 0 (and n_query 0)",
                SIKV_ERR_INVALID_ARGUMENT,
                "n_tokens",
                |a| {
                    a.n_tokens = 0;
                    a.n_query = 0;
                },
            )
            .bad("n_query 0", SIKV_ERR_INVALID_ARGUMENT, "n_query", |a| a.n_query = 0)
            .bad("n_query = n_tokens + 1", SIKV_ERR_INVALID_ARGUMENT, "n_query", |a| {
                a.n_query = 21
            })
            .null("k", |a| a.k = null())
            .null("v", |a| a.v = null())
            .null("q_tail", |a| a.q_tail = null());

        // Two tokens to sequence 1.
        let counts = fx.put(&[2u32]);
        let counts_over = fx.put(&[cfg.max_append_tokens + 1]);
        let good = Append {
            cache,
            layer: 0,
            n_seqs: 1,
            seq_ids: one_id.c(),
            n_tokens: counts.c(),
            k: kc,
            v: vc,
            stream: null_mut(),
        };
        t.export("sikv_append", Append::call, good)
            .null("cache", |a| a.cache = null_mut())
            .bad("layer = num_layers", SIKV_ERR_OUT_OF_BOUNDS, "layer", |a| {
                a.layer = layers
            })
            .bad("n_seqs 0", SIKV_ERR_INVALID_ARGUMENT, "n_seqs", |a| a.n_seqs = 0)
            .null("seq_ids", |a| a.seq_ids = null())
            .mis("seq_ids", |a| a.seq_ids = one_id.cmis())
            .bad("seq_ids[0] unknown", SIKV_ERR_UNKNOWN_SEQUENCE, "sequence 99", |a| {
                a.seq_ids = ids_unknown.c().wrapping_add(1)
            })
            .mis("n_tokens", |a| a.n_tokens = counts.cmis())
            .bad(
                "n_tokens[0] = max_append_tokens + 1",
                SIKV_ERR_OUT_OF_BOUNDS,
                "n_tokens add up to",
                |a| a.n_tokens = counts_over.c(),
            )
            .null("k", |a| a.k = null())
            .null("v", |a| a.v = null());

        // ---- the managed cache: a decode batch of sequences 1 and 2 at layer 0. The rows all
        // four batch calls share.
        macro_rules! batch_rows {
            ($rows:expr) => {
                $rows
                    .null("cache", |a| a.cache = null_mut())
                    .bad("layer = num_layers", SIKV_ERR_OUT_OF_BOUNDS, "layer", |a| {
                        a.layer = layers
                    })
                    .bad("n_seqs 0", SIKV_ERR_INVALID_ARGUMENT, "n_seqs", |a| a.n_seqs = 0)
                    .bad("n_seqs = max_batch + 1", SIKV_ERR_OUT_OF_BOUNDS, "n_seqs", |a| {
                        a.n_seqs = max_batch + 1
                    })
                    .null("seq_ids", |a| a.seq_ids = null())
                    .mis("seq_ids", |a| a.seq_ids = ids.cmis())
                    .bad(
                        "seq_ids[1] unknown",
                        SIKV_ERR_UNKNOWN_SEQUENCE,
                        "sequence 99",
                        |a| a.seq_ids = ids_unknown.c(),
                    )
                    .null("q", |a| a.q = null())
            };
        }
        let out = fx.out::<f32>((max_batch as usize + 1) * hq * d);
        let good = Attend {
            cache,
            layer: 0,
            n_seqs: 2,
            seq_ids: ids.c(),
            q: qc,
            out: out.void(),
            stream: null_mut(),
        };
        batch_rows!(t.export("sikv_attend", Attend::call, good)).null("out", |a| a.out = null_mut());

        let good = AttendDense {
            cache,
            layer: 0,
            n_seqs: 2,
            seq_ids: ids.c(),
            q: qc,
            out: out.void(),
            stream: null_mut(),
        };
        batch_rows!(t.export("sikv_attend_dense", AttendDense::call, good)).null("out", |a| a.out = null_mut());

        let good = AttendSelected {
            cache,
            layer: 0,
            n_seqs: 2,
            seq_ids: ids.c(),
            q: qc,
            indices: sel_idx.c(),
            counts: sel_cnt.c(),
            out: out.void(),
            stream: null_mut(),
        };
        batch_rows!(t.export("sikv_attend_selected", AttendSelected::call, good))
            .null("indices", |a| a.indices = null())
            .mis("indices", |a| a.indices = sel_idx.cmis())
            .null("counts", |a| a.counts = null())
            .mis("counts", |a| a.counts = sel_cnt.cmis())
            .null("out", |a| a.out = null_mut());

        // One query row per sequence (the q the other batch calls take); rows of their own.
        let rows_ok = fx.put(&[1u32, 1, 1]);
        let rows_zero = fx.put(&[0u32, 1, 1]);
        let rows_over = fx.put(&[1u32, 17, 1]);
        let good = AttendRows {
            cache,
            layer: 0,
            n_seqs: 2,
            seq_ids: ids.c(),
            rows: rows_ok.c(),
            q: qc,
            out: out.void(),
            stream: null_mut(),
        };
        batch_rows!(t.export("sikv_attend_rows", AttendRows::call, good))
            .null("rows", |a| a.rows = null())
            .mis("rows", |a| a.rows = rows_ok.cmis())
            .bad("rows[0] = 0", SIKV_ERR_OUT_OF_BOUNDS, "rows[0] = 0", |a| {
                a.rows = rows_zero.c()
            })
            .bad("rows[1] = 17", SIKV_ERR_OUT_OF_BOUNDS, "rows[1] = 17", |a| {
                a.rows = rows_over.c()
            })
            .null("out", |a| a.out = null_mut());

        let idx_out = fx.out::<i32>((max_batch as usize + 1) * hk * kmax);
        let cnt_out = fx.out::<i32>((max_batch as usize + 1) * hk);
        let good = Select {
            cache,
            layer: 0,
            n_seqs: 2,
            seq_ids: ids.c(),
            q: qc,
            indices: idx_out.ok,
            counts: cnt_out.ok,
            stream: null_mut(),
        };
        batch_rows!(t.export("sikv_select", Select::call, good))
            .null("indices", |a| a.indices = null_mut())
            .mis("indices", |a| a.indices = idx_out.mis)
            .null("counts", |a| a.counts = null_mut())
            .mis("counts", |a| a.counts = cnt_out.mis);

        // Sequence 1 at layer 0: its exact keys are the first 40 tokens of `k`.
        let qf = fx.put(&q[..hq * d]);
        let kf = fx.put(&k[..SEQS[0].1 as usize * hk * d]);
        let recall = fx.out::<f32>(hk);
        let good = SelectionRecall {
            cache,
            layer: 0,
            seq_id: 1,
            q: qf.c(),
            k_exact: kf.c(),
            recall: recall.ok,
        };
        t.export("sikv_selection_recall", SelectionRecall::call, good)
            .null("cache", |a| a.cache = null_mut())
            .bad("layer = num_layers", SIKV_ERR_OUT_OF_BOUNDS, "layer", |a| {
                a.layer = layers
            })
            .bad("seq_id unknown", SIKV_ERR_UNKNOWN_SEQUENCE, "sequence 99", |a| {
                a.seq_id = UNKNOWN
            })
            .null("q", |a| a.q = null())
            .mis("q", |a| a.q = qf.cmis())
            .null("k_exact", |a| a.k_exact = null())
            .mis("k_exact", |a| a.k_exact = kf.cmis())
            .null("recall", |a| a.recall = null_mut())
            .mis("recall", |a| a.recall = recall.mis);

        // ---- the stateless layer: one layer's pools, engine-owned and zeroed as a fresh
        // engine allocation would be; slot 0 holds 40 tokens on pages 0..3, slot 2 holds 24 on
        // pages 3..5.
        let kernels = fx.kernels as *const SikvKernels;
        let out = fx.out::<usize>(1);
        let good = WorkspaceSize {
            kernels,
            batch: max_batch,
            out: out.ok,
        };
        t.export("sikv_workspace_size", WorkspaceSize::call, good)
            .null("kernels", |a| a.kernels = null())
            .bad("batch 0", SIKV_ERR_OUT_OF_BOUNDS, "batch", |a| a.batch = 0)
            .bad("batch = max_batch + 1", SIKV_ERR_OUT_OF_BOUNDS, "batch", |a| {
                a.batch = max_batch + 1
            })
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);
        let good = WorkspaceSizeRows {
            kernels,
            n_rows: 16 * max_batch,
            out: out.ok,
        };
        t.export("sikv_workspace_size_rows", WorkspaceSizeRows::call, good)
            .null("kernels", |a| a.kernels = null())
            .bad("n_rows 0", SIKV_ERR_OUT_OF_BOUNDS, "n_rows", |a| a.n_rows = 0)
            .bad("n_rows = 16 max_batch + 1", SIKV_ERR_OUT_OF_BOUNDS, "n_rows", |a| {
                a.n_rows = 16 * max_batch + 1
            })
            .null("out", |a| a.out = null_mut())
            .mis("out", |a| a.out = out.mis);

        assert_ne!(fx.info.plane_bytes[SIKV_PLANE_SIGN], 0);
        let planes = fx.put(&vec![0u8; fx.info.layer_plane_bytes]).ok;
        let state = fx.put(&vec![0u8; fx.info.layer_state_bytes]).ok;
        let lp = SikvLayerPools {
            plane: std::array::from_fn(|i| {
                if fx.info.plane_bytes[i] == 0 {
                    null_mut()
                } else {
                    planes.wrapping_add(fx.info.plane_offset[i]) as *mut c_void
                }
            }),
            state: state as *mut c_void,
        };
        let lp_at = fx.put(&[lp]);
        let mut sign_plane_null = lp;
        sign_plane_null.plane[SIKV_PLANE_SIGN] = null_mut();
        let lp_no_plane = fx.put(&[sign_plane_null]).c();
        let lp_no_state = fx
            .put(&[SikvLayerPools {
                state: null_mut(),
                ..lp
            }])
            .c();
        let page = cfg.page_size as i64;
        for (slot, first_page, n) in [(0u32, 0i64, 40u32), (2, 3, 24)] {
            let sm: Vec<i64> = (0..n as i64).map(|t| first_page * page + t).collect();
            let s = sikv_kernel_calibrate(
                kernels,
                lp_at.c(),
                slot,
                n,
                kc,
                vc,
                1,
                qc,
                sm.as_ptr(),
                null_mut(),
                0,
                null_mut(),
            );
            assert_eq!(s, SIKV_OK, "{}", msg());
        }
        let mut ws_bytes = 0usize;
        assert_eq!(sikv_workspace_size(kernels, max_batch, &mut ws_bytes), SIKV_OK);
        let ws = fx.out::<u8>(ws_bytes).void();

        // The pool rows every stateless call with pools shares.
        macro_rules! pool_rows {
            ($rows:expr) => {
                $rows
                    .null("kernels", |a| a.kernels = null())
                    .null("pools", |a| a.pools = null())
                    .mis("pools", |a| a.pools = lp_at.cmis())
                    .null("pools.plane[0]", |a| a.pools = lp_no_plane)
                    .null("pools.state", |a| a.pools = lp_no_state)
            };
        }

        // `reset_slot` reads only the state pool, so a missing plane is no error for it.
        let good = KernelResetSlot {
            kernels,
            pools: lp_at.c(),
            seq_slot: 0,
            stream: null_mut(),
        };
        t.export("sikv_kernel_reset_slot", KernelResetSlot::call, good)
            .null("kernels", |a| a.kernels = null())
            .null("pools", |a| a.pools = null())
            .mis("pools", |a| a.pools = lp_at.cmis())
            .null("pools.state", |a| a.pools = lp_no_state)
            .bad("seq_slot = max_seqs", SIKV_ERR_OUT_OF_BOUNDS, "seq_slot", |a| {
                a.seq_slot = max_seqs
            });

        // Slot 1, 20 tokens on pages 5 and 6.
        let mut sm = vec![-1i64; cfg.max_seq_len as usize + 1];
        for (t, e) in sm.iter_mut().take(20).enumerate() {
            *e = 5 * page + t as i64;
        }
        let sm = fx.put(&sm);
        let good = KernelCalibrate {
            kernels,
            pools: lp_at.c(),
            seq_slot: 1,
            n_tokens: 20,
            k: kc,
            v: vc,
            n_query: 1,
            q_tail: qc,
            slot_mapping: sm.c(),
            workspace: ws,
            workspace_bytes: ws_bytes,
            stream: null_mut(),
        };
        pool_rows!(t.export("sikv_kernel_calibrate", KernelCalibrate::call, good))
            .bad("seq_slot = max_seqs", SIKV_ERR_OUT_OF_BOUNDS, "seq_slot", |a| {
                a.seq_slot = max_seqs
            })
            .bad("n_tokens = max_seq_len + 1", SIKV_ERR_OUT_OF_BOUNDS, "n_tokens", |a| {
                a.n_tokens = cfg.max_seq_len + 1
            })
            .bad(
                "n_tokens 0 (and n_query 0)",
                SIKV_ERR_INVALID_ARGUMENT,
                "n_tokens",
                |a| {
                    a.n_tokens = 0;
                    a.n_query = 0;
                },
            )
            .bad("n_query 0", SIKV_ERR_INVALID_ARGUMENT, "n_query", |a| a.n_query = 0)
            .bad("n_query = n_tokens + 1", SIKV_ERR_INVALID_ARGUMENT, "n_query", |a| {
                a.n_query = 21
            })
            .null("k", |a| a.k = null())
            .null("v", |a| a.v = null())
            .null("q_tail", |a| a.q_tail = null())
            .null("slot_mapping", |a| a.slot_mapping = null())
            .mis("slot_mapping", |a| a.slot_mapping = sm.cmis());

        // Two tokens to slot 0 at positions 40 and 41 (page 2, slots 8 and 9); the arrays hold
        // max_append_tokens + 1 entries for the count row.
        let n_arr = cfg.max_append_tokens as usize + 1;
        let mut sm = vec![-1i64; n_arr];
        sm[..2].copy_from_slice(&[2 * page + 8, 2 * page + 9]);
        let mut pos = vec![0i32; n_arr];
        pos[..2].copy_from_slice(&[40, 41]);
        let sm = fx.put(&sm);
        let ss = fx.put(&vec![0i32; n_arr]);
        let pos = fx.put(&pos);
        let sm_over = fx.put(&[fx.info.num_pages as i64 * page, 2 * page + 9]);
        let pos_over = fx.put(&[cfg.max_seq_len as i32, 41]);
        let ss_over = fx.put(&[max_seqs as i32, 0]);
        let good = KernelAppend {
            kernels,
            pools: lp_at.c(),
            n_tokens: 2,
            k: kc,
            v: vc,
            slot_mapping: sm.c(),
            seq_slot: ss.c(),
            position: pos.c(),
            stream: null_mut(),
        };
        pool_rows!(t.export("sikv_kernel_append", KernelAppend::call, good))
            .bad("n_tokens 0", SIKV_ERR_INVALID_ARGUMENT, "n_tokens", |a| a.n_tokens = 0)
            .bad(
                "n_tokens = max_append_tokens + 1",
                SIKV_ERR_OUT_OF_BOUNDS,
                "n_tokens",
                |a| a.n_tokens = cfg.max_append_tokens + 1,
            )
            .null("k", |a| a.k = null())
            .null("v", |a| a.v = null())
            .null("slot_mapping", |a| a.slot_mapping = null())
            .mis("slot_mapping", |a| a.slot_mapping = sm.cmis())
            .bad(
                "slot_mapping[0] = num_pages * page_size",
                SIKV_ERR_OUT_OF_BOUNDS,
                "slot_mapping[0]",
                |a| a.slot_mapping = sm_over.c(),
            )
            .null("seq_slot", |a| a.seq_slot = null())
            .mis("seq_slot", |a| a.seq_slot = ss.cmis())
            .bad("seq_slot[0] = max_seqs", SIKV_ERR_OUT_OF_BOUNDS, "seq_slot[0]", |a| {
                a.seq_slot = ss_over.c()
            })
            .null("position", |a| a.position = null())
            .mis("position", |a| a.position = pos.cmis())
            .bad(
                "position[0] = max_seq_len",
                SIKV_ERR_OUT_OF_BOUNDS,
                "position[0]",
                |a| a.position = pos_over.c(),
            );

        // ---- the decode-batch calls: slots 0 and 2. The arrays have a third entry (slot 0
        // again, one page) for the batch one past max_batch.
        let indptr = fx.put(&[0i32, 3, 5, 6]);
        let indices = fx.put(&[0i32, 1, 2, 3, 4, 0]);
        let last = fx.put(&[8i32, 8, 8]);
        let slots = fx.put(&[0i32, 2, 0]);
        let slots_over = fx.put(&[0i32, max_seqs as i32]);
        let max_total = max_batch as i32 * cfg.max_seq_len.div_ceil(cfg.page_size) as i32;
        let indptr_over = fx.put(&[0i32, 3, max_total + 1]);
        let pt = SikvPageTable {
            indptr: indptr.c(),
            indices: indices.c(),
            last_page_len: last.c(),
            batch: 2,
        };
        let pt_at = fx.put(&[pt]);
        let mut table_with = |edit: &dyn Fn(&mut SikvPageTable)| {
            let mut p = pt;
            edit(&mut p);
            fx.put(&[p]).c()
        };
        let pt_bad: Vec<BadValue<*const SikvPageTable>> = vec![
            ("page_table NULL", null(), SIKV_ERR_NULL_POINTER, "`page_table`"),
            (
                "page_table misaligned",
                pt_at.cmis(),
                SIKV_ERR_MISALIGNED,
                "`page_table`",
            ),
            (
                "page_table.batch 0",
                table_with(&|p| p.batch = 0),
                SIKV_ERR_OUT_OF_BOUNDS,
                "page_table.batch",
            ),
            (
                "page_table.batch = max_batch + 1",
                table_with(&|p| p.batch = max_batch + 1),
                SIKV_ERR_OUT_OF_BOUNDS,
                "page_table.batch",
            ),
            (
                "page_table.indptr NULL",
                table_with(&|p| p.indptr = null()),
                SIKV_ERR_NULL_POINTER,
                "`page_table.indptr`",
            ),
            (
                "page_table.indptr misaligned",
                table_with(&|p| p.indptr = indptr.cmis()),
                SIKV_ERR_MISALIGNED,
                "`page_table.indptr`",
            ),
            (
                "page_table.indptr[batch] one past max_batch * pages per sequence",
                table_with(&|p| p.indptr = indptr_over.c()),
                SIKV_ERR_OUT_OF_BOUNDS,
                "page_table.indptr[batch]",
            ),
            (
                "page_table.indices NULL",
                table_with(&|p| p.indices = null()),
                SIKV_ERR_NULL_POINTER,
                "`page_table.indices`",
            ),
            (
                "page_table.indices misaligned",
                table_with(&|p| p.indices = indices.cmis()),
                SIKV_ERR_MISALIGNED,
                "`page_table.indices`",
            ),
            (
                "page_table.last_page_len NULL",
                table_with(&|p| p.last_page_len = null()),
                SIKV_ERR_NULL_POINTER,
                "`page_table.last_page_len`",
            ),
            (
                "page_table.last_page_len misaligned",
                table_with(&|p| p.last_page_len = last.cmis()),
                SIKV_ERR_MISALIGNED,
                "`page_table.last_page_len`",
            ),
        ];
        // The rows the four decode-batch calls share.
        macro_rules! decode_rows {
            ($rows:expr) => {
                pool_rows!($rows)
                    .each(&pt_bad, |a, p| a.page_table = p)
                    .null("seq_slot", |a| a.seq_slot = null())
                    .mis("seq_slot", |a| a.seq_slot = slots.cmis())
                    .bad(
                        "seq_slot[1] = max_seqs",
                        SIKV_ERR_OUT_OF_BOUNDS,
                        "seq_slot[1]",
                        |a| a.seq_slot = slots_over.c(),
                    )
                    .null("q", |a| a.q = null())
            };
        }
        let out = fx.out::<f32>((max_batch as usize + 1) * hq * d);
        let kidx = fx.out::<i32>((max_batch as usize + 1) * hk * kmax);
        let kcnt = fx.out::<i32>((max_batch as usize + 1) * hk);
        // The selection sikv_kernel_attend is given: the library's own on this fixture.
        let (kidx_in, kcnt_in) = {
            let mut i = vec![0i32; (max_batch as usize + 1) * hk * kmax];
            let mut c = vec![0i32; (max_batch as usize + 1) * hk];
            let s = sikv_kernel_select(
                kernels,
                lp_at.c(),
                pt_at.c(),
                slots.c(),
                qc,
                i.as_mut_ptr(),
                c.as_mut_ptr(),
                ws,
                ws_bytes,
                null_mut(),
            );
            assert_eq!(s, SIKV_OK, "{}", msg());
            assert!(c[..rows].iter().all(|&c| c > 0));
            (fx.put(&i), fx.put(&c))
        };

        let good = KernelSelect {
            kernels,
            pools: lp_at.c(),
            page_table: pt_at.c(),
            seq_slot: slots.c(),
            q: qc,
            indices: kidx.ok,
            counts: kcnt.ok,
            workspace: ws,
            workspace_bytes: ws_bytes,
            stream: null_mut(),
        };
        decode_rows!(t.export("sikv_kernel_select", KernelSelect::call, good))
            .null("indices", |a| a.indices = null_mut())
            .mis("indices", |a| a.indices = kidx.mis)
            .null("counts", |a| a.counts = null_mut())
            .mis("counts", |a| a.counts = kcnt.mis);

        let good = KernelAttend {
            kernels,
            pools: lp_at.c(),
            page_table: pt_at.c(),
            seq_slot: slots.c(),
            q: qc,
            indices: kidx_in.c(),
            counts: kcnt_in.c(),
            out: out.void(),
            workspace: ws,
            workspace_bytes: ws_bytes,
            stream: null_mut(),
        };
        decode_rows!(t.export("sikv_kernel_attend", KernelAttend::call, good))
            .null("indices", |a| a.indices = null())
            .mis("indices", |a| a.indices = kidx_in.cmis())
            .null("counts", |a| a.counts = null())
            .mis("counts", |a| a.counts = kcnt_in.cmis())
            .null("out", |a| a.out = null_mut());

        let good = KernelAttendDense {
            kernels,
            pools: lp_at.c(),
            page_table: pt_at.c(),
            seq_slot: slots.c(),
            q: qc,
            out: out.void(),
            workspace: ws,
            workspace_bytes: ws_bytes,
            stream: null_mut(),
        };
        decode_rows!(t.export("sikv_kernel_attend_dense", KernelAttendDense::call, good))
            .null("out", |a| a.out = null_mut());

        let good = KernelDecode {
            kernels,
            pools: lp_at.c(),
            page_table: pt_at.c(),
            seq_slot: slots.c(),
            q: qc,
            out: out.void(),
            workspace: ws,
            workspace_bytes: ws_bytes,
            stream: null_mut(),
        };
        decode_rows!(t.export("sikv_kernel_decode", KernelDecode::call, good)).null("out", |a| a.out = null_mut());

        // Two query rows for the first sequence, one for the second (q holds three rows).
        let row_off = fx.put(&[0i32, 2, 3]);
        let row_off_late = fx.put(&[1i32, 2, 3]);
        let row_off_empty = fx.put(&[0i32, 3, 3]);
        let good = KernelDecodeRows {
            kernels,
            pools: lp_at.c(),
            page_table: pt_at.c(),
            seq_slot: slots.c(),
            row_offsets: row_off.c(),
            n_rows: 3,
            q: qc,
            out: out.void(),
            workspace: ws,
            workspace_bytes: ws_bytes,
            stream: null_mut(),
        };
        decode_rows!(t.export("sikv_kernel_decode_rows", KernelDecodeRows::call, good))
            .null("out", |a| a.out = null_mut())
            .null("row_offsets", |a| a.row_offsets = null())
            .mis("row_offsets", |a| a.row_offsets = row_off.cmis())
            .bad("n_rows below the batch", SIKV_ERR_OUT_OF_BOUNDS, "n_rows", |a| {
                a.n_rows = 1
            })
            .bad("n_rows past 16 per sequence", SIKV_ERR_OUT_OF_BOUNDS, "n_rows", |a| {
                a.n_rows = 33
            })
            .bad(
                "row_offsets not from 0",
                SIKV_ERR_INVALID_ARGUMENT,
                "row_offsets",
                |a| a.row_offsets = row_off_late.c(),
            )
            .bad("a sequence without rows", SIKV_ERR_OUT_OF_BOUNDS, "row_offsets", |a| {
                a.row_offsets = row_off_empty.c()
            });

        (fx, t)
    }
}

#[test]
fn every_export_rejects_each_bad_argument_and_changes_nothing() {
    let seed = common::seed("every_export_rejects_each_bad_argument_and_changes_nothing");

    // Each export's good call succeeds on a fresh fixture of its own (good calls change the
    // fixture), so the rows below fail for their one bad argument only.
    let n_exports = Fx::new(seed).1.goods.len();
    for i in 0..n_exports {
        let (_fx, t) = Fx::new(seed);
        let g = &t.goods[i];
        let s = (g.call)();
        assert_eq!(s, SIKV_OK, "{}: the good call fails: {}", g.export, msg());
    }

    let (fx, table) = Fx::new(seed);
    let mut failures = Vec::new();
    let mut per_export: Vec<(String, usize)> = Vec::new();
    for row in &table.rows {
        let export = row.name.split(':').next().unwrap().to_string();
        match per_export.last_mut() {
            Some((e, n)) if *e == export => *n += 1,
            _ => per_export.push((export, 1)),
        }
        let stale = plant_stale_message();
        let before = fx.snapshot();
        let status = (row.call)();
        let m = msg();
        let after = fx.snapshot();
        let mut what = Vec::new();
        if status != row.want {
            what.push(format!("status {status:?}, want {:?}", row.want));
        }
        if row.want != SIKV_OK {
            if m == stale {
                what.push("no message of its own".to_string());
            } else if !m.contains(row.needle.as_str()) {
                what.push(format!("message `{m}` does not name `{}`", row.needle));
            }
        }
        if after.0 != before.0 {
            what.push("the cache checksum changed".to_string());
        }
        if after.1 != before.1 {
            what.push("engine-owned host memory (pools, inputs or outputs) changed".to_string());
        }
        if !what.is_empty() {
            failures.push(format!("{}: {}", row.name, what.join("; ")));
        }
    }
    println!("{} rows checked over {} exports:", table.rows.len(), per_export.len());
    for (e, n) in &per_export {
        println!("  {n:3} {e}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        table.rows.len(),
        failures.join("\n")
    );
}
