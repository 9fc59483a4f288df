//! Bad input through the C ABI: every failing call returns its status, leaves a message naming
//! the argument, writes no out-parameter, and leaves the cache unchanged (same checksum).

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, Ordering};

mod common;

use common::Rng;
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::SikvStatus::{self, *};

/// Uniform in [-1, 1), shifted off zero so that no input is all zeros.
fn vals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.range(-1.0, 1.0) + 1e-3).collect()
}

fn msg() -> String {
    unsafe { CStr::from_ptr(sikv_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn expect(status: SikvStatus, want: SikvStatus, needle: &str) {
    assert_eq!(status, want, "last error: {}", msg());
    let m = msg();
    assert!(m.contains(needle), "message `{m}` does not mention `{needle}`");
}

fn small_config() -> SikvConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.dtype = SIKV_DTYPE_F32;
    c.num_layers = 2;
    c.num_q_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.page_size = 16;
    c.max_seqs = 4;
    c.max_seq_len = 256;
    c.max_batch = 2;
    c.max_append_tokens = 64;
    c.num_pages = 24;
    c.n_sink = 2;
    c.n_heavy = 4;
    c.n_window = 8;
    c.budget_min = 8;
    c.budget_max = 32;
    c
}

struct Cache(*mut SikvCache);
impl Drop for Cache {
    fn drop(&mut self) {
        sikv_cache_destroy(self.0);
    }
}
impl Cache {
    fn new(c: &SikvConfig) -> Cache {
        let mut h = null_mut();
        assert_eq!(sikv_cache_create(c, &mut h), SIKV_OK, "{}", msg());
        Cache(h)
    }
    fn checksum(&self) -> u64 {
        let mut x = 0u64;
        assert_eq!(sikv_cache_checksum(self.0, &mut x), SIKV_OK);
        x
    }
    /// Adds `id` and calibrates it at every layer with an `n`-token prompt.
    fn prompt(&self, c: &SikvConfig, rng: &mut Rng, id: i64, n: u32) {
        assert_eq!(sikv_seq_add(self.0, id), SIKV_OK, "{}", msg());
        let kv = vals(rng, (n * c.num_kv_heads * c.head_dim) as usize);
        let vv = vals(rng, kv.len());
        let q = vals(rng, (c.num_q_heads * c.head_dim) as usize);
        for l in 0..c.num_layers {
            let s = sikv_calibrate(self.0, l, id, n, p(&kv), p(&vv), 1, p(&q), null_mut());
            assert_eq!(s, SIKV_OK, "{}", msg());
        }
    }
}

fn p(v: &[f32]) -> *const c_void {
    v.as_ptr() as *const c_void
}

#[test]
fn config_errors_name_the_field() {
    let mut h: *mut SikvCache = null_mut();
    expect(sikv_cache_create(null(), &mut h), SIKV_ERR_NULL_POINTER, "config");
    assert!(h.is_null());
    let good = small_config();
    expect(sikv_cache_create(&good, null_mut()), SIKV_ERR_NULL_POINTER, "out");

    type Case = (Box<dyn Fn(&mut SikvConfig)>, SikvStatus, &'static str);
    let cases: Vec<Case> = vec![
        (Box::new(|c| c.dtype = 7), SIKV_ERR_UNSUPPORTED, "config.dtype"),
        (Box::new(|c| c.device = 9), SIKV_ERR_UNSUPPORTED, "config.device"),
        (Box::new(|c| c.selector = 5), SIKV_ERR_UNSUPPORTED, "config.selector"),
        (Box::new(|c| c.centre = 5), SIKV_ERR_UNSUPPORTED, "config.centre"),
        (Box::new(|c| c.flags = 1 << 9), SIKV_ERR_UNSUPPORTED, "config.flags"),
        (Box::new(|c| c.head_dim = 96), SIKV_ERR_UNSUPPORTED, "config.head_dim"),
        (Box::new(|c| c.key_bits = 3), SIKV_ERR_UNSUPPORTED, "config.key_bits"),
        (Box::new(|c| c.page_size = 24), SIKV_ERR_UNSUPPORTED, "config.page_size"),
        (
            Box::new(|c| c.num_q_heads = 7),
            SIKV_ERR_INVALID_ARGUMENT,
            "num_q_heads",
        ),
        (
            Box::new(|c| c.max_batch = 99),
            SIKV_ERR_INVALID_ARGUMENT,
            "config.max_batch",
        ),
        (
            Box::new(|c| c.budget_min = 64),
            SIKV_ERR_INVALID_ARGUMENT,
            "config.budget_min",
        ),
        (
            Box::new(|c| c.budget_ratio = f32::NAN),
            SIKV_ERR_INVALID_ARGUMENT,
            "config.budget_ratio",
        ),
        (
            Box::new(|c| c.rerank_factor = 99),
            SIKV_ERR_OUT_OF_BOUNDS,
            "config.rerank_factor",
        ),
    ];
    for (edit, status, needle) in cases {
        let mut c = good;
        edit(&mut c);
        let mut h: *mut SikvCache = null_mut();
        expect(sikv_cache_create(&c, &mut h), status, needle);
        assert!(h.is_null(), "out-parameter written on failure");
        let mut info = SikvLayoutInfo::default();
        expect(sikv_query_layout(&c, &mut info), status, needle);
        assert_eq!(info, SikvLayoutInfo::default(), "layout written on failure");
    }
    let mut c = SikvConfig::for_profile(0).unwrap();
    expect(sikv_config_init(&mut c, 42), SIKV_ERR_UNSUPPORTED, "profile 42");
    assert_eq!(c, SikvConfig::for_profile(0).unwrap());
}

#[test]
fn destroy_null_is_a_noop_and_versions_are_consistent() {
    sikv_cache_destroy(null_mut());
    sikv_kernels_destroy(null_mut());
    assert_eq!(sikv_abi_version(), SIKV_ABI_VERSION);
    let v = unsafe { CStr::from_ptr(sikv_version()) }.to_str().unwrap();
    let number = v.split(' ').next().unwrap();
    assert_eq!(
        number,
        format!("{SIKV_VERSION_MAJOR}.{SIKV_VERSION_MINOR}.{SIKV_VERSION_PATCH}")
    );
    assert!(
        v.contains("(kernels: "),
        "sikv_version() does not say how the kernels were built: {v}"
    );
    let b = unsafe { CStr::from_ptr(sikv_build_info()) }.to_str().unwrap();
    assert!(b.contains("kernels="), "{b}");
}

#[test]
fn layout_query_reports_112_bytes_for_two_plus_one() {
    let mut c = small_config();
    c.head_dim = 128;
    let mut info = SikvLayoutInfo::default();
    assert_eq!(sikv_query_layout(&c, &mut info), SIKV_OK);
    assert_eq!(info.bytes_per_token, 112);
    assert!((info.compression_vs_fp16 - 512.0 / 112.0).abs() < 1e-12);
    assert_eq!(info.bytes_per_page, 112 * 16 * 2);
    assert_eq!(
        (info.key_bits, info.value_bits, info.rerank_factor),
        (2, 2, c.rerank_factor)
    );
    c.key_bits = 4;
    c.value_bits = 4;
    assert_eq!(sikv_query_layout(&c, &mut info), SIKV_OK);
    assert_eq!(info.bytes_per_token, 176);
    assert_eq!((info.key_bits, info.value_bits), (4, 4));
}

#[test]
fn cpu_request_for_cuda_without_device_is_no_device() {
    let mut c = small_config();
    c.device = SIKV_DEVICE_CUDA;
    let mut h: *mut SikvKernels = null_mut();
    let s = sikv_kernels_create(&c, &mut h);
    if s == SIKV_OK {
        // A machine with a GPU: the request is honoured.
        sikv_kernels_destroy(h);
        println!("CUDA device present: NO_DEVICE path not exercised");
    } else {
        expect(s, SIKV_ERR_NO_DEVICE, "CUDA");
        assert!(h.is_null());
    }
}

#[test]
fn sequence_errors_leave_the_cache_unchanged() {
    let c = small_config();
    let mut rng = Rng::new("sequence_errors_leave_the_cache_unchanged");
    let cache = Cache::new(&c);
    cache.prompt(&c, &mut rng, 10, 40);
    let before = cache.checksum();

    expect(sikv_seq_add(cache.0, 10), SIKV_ERR_SEQUENCE_EXISTS, "10");
    expect(sikv_seq_remove(cache.0, 99), SIKV_ERR_UNKNOWN_SEQUENCE, "99");
    expect(sikv_seq_fork(cache.0, 99, 11), SIKV_ERR_UNKNOWN_SEQUENCE, "99");
    expect(sikv_seq_fork(cache.0, 10, 10), SIKV_ERR_SEQUENCE_EXISTS, "10");
    let mut len = 777u32;
    expect(sikv_seq_len(cache.0, 99, 0, &mut len), SIKV_ERR_UNKNOWN_SEQUENCE, "99");
    expect(sikv_seq_len(cache.0, 10, 5, &mut len), SIKV_ERR_OUT_OF_BOUNDS, "layer");
    assert_eq!(len, 777);
    assert_eq!(cache.checksum(), before);

    // A removed sequence is unknown afterwards.
    assert_eq!(sikv_seq_add(cache.0, 12), SIKV_OK);
    assert_eq!(sikv_seq_remove(cache.0, 12), SIKV_OK);
    let before = cache.checksum();
    let q = vals(&mut rng, (c.num_q_heads * c.head_dim) as usize);
    let mut out = vec![0f32; q.len()];
    let ids = [12i64];
    expect(
        sikv_attend(
            cache.0,
            0,
            1,
            ids.as_ptr(),
            p(&q),
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
        ),
        SIKV_ERR_UNKNOWN_SEQUENCE,
        "12",
    );
    assert_eq!(cache.checksum(), before);
}

#[test]
fn append_and_attend_errors_leave_the_cache_unchanged() {
    let c = small_config();
    let mut rng = Rng::new("append_and_attend_errors_leave_the_cache_unchanged");
    let cache = Cache::new(&c);
    cache.prompt(&c, &mut rng, 1, 30);
    assert_eq!(sikv_seq_add(cache.0, 2), SIKV_OK);
    let before = cache.checksum();
    let row = (c.num_kv_heads * c.head_dim) as usize;
    let k = vals(&mut rng, row * 100);
    let v = vals(&mut rng, row * 100);

    // Not calibrated.
    let id2 = [2i64];
    expect(
        sikv_append(cache.0, 0, 1, id2.as_ptr(), null(), p(&k), p(&v), null_mut()),
        SIKV_ERR_NOT_CALIBRATED,
        "2",
    );
    // Too many tokens for one call.
    let n = [65u32];
    let id1 = [1i64];
    expect(
        sikv_append(cache.0, 0, 1, id1.as_ptr(), n.as_ptr(), p(&k), p(&v), null_mut()),
        SIKV_ERR_OUT_OF_BOUNDS,
        "max_append_tokens",
    );
    // Layer out of range.
    expect(
        sikv_append(cache.0, 2, 1, id1.as_ptr(), null(), p(&k), p(&v), null_mut()),
        SIKV_ERR_OUT_OF_BOUNDS,
        "layer",
    );
    // NULL inputs.
    expect(
        sikv_append(cache.0, 0, 1, id1.as_ptr(), null(), null(), p(&v), null_mut()),
        SIKV_ERR_NULL_POINTER,
        "`k`",
    );
    expect(
        sikv_append(cache.0, 0, 1, null(), null(), p(&k), p(&v), null_mut()),
        SIKV_ERR_NULL_POINTER,
        "seq_ids",
    );
    // Unknown id in a batch with a good one: nothing of the batch is applied.
    let mixed = [1i64, 77];
    expect(
        sikv_append(cache.0, 0, 2, mixed.as_ptr(), null(), p(&k), p(&v), null_mut()),
        SIKV_ERR_UNKNOWN_SEQUENCE,
        "77",
    );
    // The same id twice.
    let twice = [1i64, 1];
    expect(
        sikv_append(cache.0, 0, 2, twice.as_ptr(), null(), p(&k), p(&v), null_mut()),
        SIKV_ERR_INVALID_ARGUMENT,
        "twice",
    );
    // Beyond max_seq_len.
    let big = [60u32];
    for _ in 0..3 {
        assert_eq!(
            sikv_append(cache.0, 0, 1, id1.as_ptr(), big.as_ptr(), p(&k), p(&v), null_mut()),
            SIKV_OK,
            "{}",
            msg()
        );
    }
    let grown = cache.checksum();
    expect(
        sikv_append(cache.0, 0, 1, id1.as_ptr(), big.as_ptr(), p(&k), p(&v), null_mut()),
        SIKV_ERR_OUT_OF_BOUNDS,
        "max_seq_len",
    );
    assert_eq!(cache.checksum(), grown);

    // Attend: batch too large, NULL out.
    let q = vals(&mut rng, (3 * c.num_q_heads * c.head_dim) as usize);
    let mut out = vec![0f32; q.len()];
    let three = [1i64, 2, 3];
    expect(
        sikv_attend(
            cache.0,
            0,
            3,
            three.as_ptr(),
            p(&q),
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
        ),
        SIKV_ERR_OUT_OF_BOUNDS,
        "max_batch",
    );
    expect(
        sikv_attend(cache.0, 0, 1, id1.as_ptr(), p(&q), null_mut(), null_mut()),
        SIKV_ERR_NULL_POINTER,
        "out",
    );
    assert_eq!(cache.checksum(), grown);
    assert_ne!(before, grown);

    // Calibrating twice.
    let kp = vals(&mut rng, row * 10);
    expect(
        sikv_calibrate(cache.0, 0, 1, 10, p(&kp), p(&kp), 1, p(&q), null_mut()),
        SIKV_ERR_ALREADY_CALIBRATED,
        "already calibrated",
    );
    assert_eq!(cache.checksum(), grown);
}

#[test]
fn page_pool_exhaustion_is_reported_and_harmless() {
    let mut c = small_config();
    c.num_pages = 6; // 96 tokens in all
    let mut rng = Rng::new("page_pool_exhaustion_is_reported_and_harmless");
    let cache = Cache::new(&c);
    cache.prompt(&c, &mut rng, 1, 64); // 4 pages
    let before = cache.checksum();
    let row = (c.num_kv_heads * c.head_dim) as usize;
    let k = vals(&mut rng, row * 40);
    let n = [40u32]; // needs 3 more pages, 2 free
    let id = [1i64];
    expect(
        sikv_append(cache.0, 0, 1, id.as_ptr(), n.as_ptr(), p(&k), p(&k), null_mut()),
        SIKV_ERR_OUT_OF_PAGES,
        "exhausted",
    );
    assert_eq!(cache.checksum(), before);
    // A second sequence whose prompt does not fit.
    assert_eq!(sikv_seq_add(cache.0, 2), SIKV_OK);
    let mid = cache.checksum();
    let kp = vals(&mut rng, row * 40);
    let q = vals(&mut rng, (c.num_q_heads * c.head_dim) as usize);
    expect(
        sikv_calibrate(cache.0, 0, 2, 40, p(&kp), p(&kp), 1, p(&q), null_mut()),
        SIKV_ERR_OUT_OF_PAGES,
        "exhausted",
    );
    assert_eq!(cache.checksum(), mid);
    let mut info = SikvCacheInfo::default();
    assert_eq!(sikv_cache_info(cache.0, &mut info), SIKV_OK);
    assert_eq!((info.free_pages, info.num_pages, info.num_seqs), (2, 6, 2));
    // Removing the first sequence frees its pages; the prompt then fits.
    assert_eq!(sikv_seq_remove(cache.0, 1), SIKV_OK);
    assert_eq!(
        sikv_calibrate(cache.0, 0, 2, 40, p(&kp), p(&kp), 1, p(&q), null_mut()),
        SIKV_OK,
        "{}",
        msg()
    );
}

#[test]
fn borrowed_pools_are_checked_for_size() {
    let c = small_config();
    let mut info = SikvLayoutInfo::default();
    assert_eq!(sikv_query_layout(&c, &mut info), SIKV_OK);
    let mut planes = vec![0u8; info.total_plane_bytes];
    let mut state = vec![0u8; info.total_state_bytes - 1];
    let desc = SikvPoolsDesc {
        planes: planes.as_mut_ptr() as *mut c_void,
        planes_bytes: planes.len(),
        state: state.as_mut_ptr() as *mut c_void,
        state_bytes: state.len(),
        workspace: null_mut(),
        workspace_bytes: 0,
    };
    let mut h: *mut SikvCache = null_mut();
    expect(
        sikv_cache_create_with_pools(&c, &desc, &mut h),
        SIKV_ERR_BUFFER_TOO_SMALL,
        "pools.state_bytes",
    );
    assert!(h.is_null());
    let mut state = vec![0u8; info.total_state_bytes];
    let desc = SikvPoolsDesc {
        state: state.as_mut_ptr() as *mut c_void,
        state_bytes: state.len(),
        ..desc
    };
    assert_eq!(sikv_cache_create_with_pools(&c, &desc, &mut h), SIKV_OK, "{}", msg());
    // The engine's memory holds the cache: a calibrated prompt lands in it.
    let cache = Cache(h);
    let mut rng = Rng::new("borrowed_pools_are_checked_for_size");
    cache.prompt(&c, &mut rng, 5, 20);
    assert!(
        planes.iter().any(|&b| b != 0),
        "no byte of the borrowed plane pool was written"
    );
}

#[test]
fn stateless_calls_validate_before_running() {
    let c = small_config();
    let mut kh: *mut SikvKernels = null_mut();
    assert_eq!(sikv_kernels_create(&c, &mut kh), SIKV_OK, "{}", msg());
    let mut ws = 5usize;
    expect(sikv_workspace_size(kh, 0, &mut ws), SIKV_ERR_OUT_OF_BOUNDS, "batch");
    expect(sikv_workspace_size(kh, 3, &mut ws), SIKV_ERR_OUT_OF_BOUNDS, "batch");
    assert_eq!(ws, 5);
    let mut info = SikvLayoutInfo::default();
    assert_eq!(sikv_query_layout(&c, &mut info), SIKV_OK);
    let mut planes = vec![0u8; info.layer_plane_bytes];
    let mut state = vec![0u8; info.layer_state_bytes];
    let base = planes.as_mut_ptr();
    let pools = SikvLayerPools {
        plane: std::array::from_fn(|i| {
            if info.plane_bytes[i] == 0 {
                null_mut()
            } else {
                unsafe { base.add(info.plane_offset[i]) as *mut c_void }
            }
        }),
        state: state.as_mut_ptr() as *mut c_void,
    };
    let snapshot = (planes.clone(), state.clone());
    let indptr = [0i32, 2];
    let indices = [0i32, 999];
    let last = [5i32];
    let table = SikvPageTable {
        indptr: indptr.as_ptr(),
        indices: indices.as_ptr(),
        last_page_len: last.as_ptr(),
        batch: 1,
    };
    let slot = [0i32];
    let mut rng = Rng::new("stateless_calls_validate_before_running");
    let q = vals(&mut rng, (c.num_q_heads * c.head_dim) as usize);
    let mut idx = vec![0i32; (c.num_kv_heads * c.budget_max) as usize];
    let mut cnt = vec![0i32; c.num_kv_heads as usize];
    let s = sikv_kernel_select(
        kh,
        &pools,
        &table,
        slot.as_ptr(),
        p(&q),
        idx.as_mut_ptr(),
        cnt.as_mut_ptr(),
        null_mut(),
        0,
        null_mut(),
    );
    expect(s, SIKV_ERR_OUT_OF_BOUNDS, "page_table.indices[1]");
    let bad_batch = SikvPageTable { batch: 9, ..table };
    let s = sikv_kernel_select(
        kh,
        &pools,
        &bad_batch,
        slot.as_ptr(),
        p(&q),
        idx.as_mut_ptr(),
        cnt.as_mut_ptr(),
        null_mut(),
        0,
        null_mut(),
    );
    expect(s, SIKV_ERR_OUT_OF_BOUNDS, "page_table.batch");
    let kv = vals(&mut rng, (c.num_kv_heads * c.head_dim) as usize);
    let sm = [(c.num_pages as i64) * c.page_size as i64];
    let pos = [0i32];
    let s = sikv_kernel_append(
        kh,
        &pools,
        1,
        p(&kv),
        p(&kv),
        sm.as_ptr(),
        slot.as_ptr(),
        pos.as_ptr(),
        null_mut(),
    );
    assert_ne!(s, SIKV_OK);
    assert_eq!(
        (planes.clone(), state.clone()),
        snapshot,
        "a failed stateless call wrote to the pools"
    );
    sikv_kernels_destroy(kh);
}

#[test]
fn a_panic_poisons_the_handle_and_does_not_unwind() {
    let flag = AtomicBool::new(false);
    let s = boundary(Some(&flag), || panic!("boom"));
    assert_eq!(s, SIKV_ERR_INTERNAL);
    assert!(msg().contains("boom"));
    assert!(flag.load(Ordering::Acquire));
    let s = boundary(Some(&flag), || Ok(()));
    assert_eq!(s, SIKV_ERR_POISONED);
    assert!(msg().contains("poisoned"));
}

#[test]
fn attend_selected_errors_leave_the_cache_unchanged() {
    let c = small_config();
    let mut rng = Rng::new("attend_selected_errors_leave_the_cache_unchanged");
    let cache = Cache::new(&c);
    cache.prompt(&c, &mut rng, 1, 40);
    cache.prompt(&c, &mut rng, 2, 70);
    let ids = [1i64, 2];
    let (hk, kmax) = (c.num_kv_heads as usize, c.budget_max as usize);
    let q = vals(&mut rng, 2 * (c.num_q_heads * c.head_dim) as usize);
    let mut idx = vec![-1i32; 2 * hk * kmax];
    let mut cnt = vec![0i32; 2 * hk];
    let s = sikv_select(
        cache.0,
        0,
        2,
        ids.as_ptr(),
        p(&q),
        idx.as_mut_ptr(),
        cnt.as_mut_ptr(),
        null_mut(),
    );
    assert_eq!(s, SIKV_OK, "{}", msg());
    let before = cache.checksum();
    let attend = |ids: &[i64], idx: &[i32], cnt: &[i32]| -> (SikvStatus, Vec<f32>) {
        let mut out = vec![7.5f32; q.len()];
        let s = sikv_attend_selected(
            cache.0,
            0,
            ids.len() as u32,
            ids.as_ptr(),
            p(&q),
            idx.as_ptr(),
            cnt.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
        );
        (s, out)
    };
    assert_eq!(attend(&ids, &idx, &cnt).0, SIKV_OK, "{}", msg());

    // Row 3: sequence 2 (70 tokens), KV head 1; the library picked >= budget_min = 8 there.
    let (r, len) = (3usize, 70i32);
    let n = cnt[r] as usize;
    assert!(n >= 2);
    let first = r * kmax;
    type Edit = Box<dyn Fn(&mut [i32], &mut [i32])>;
    let cases: Vec<(&str, Edit, SikvStatus, &str)> = vec![
        (
            "count > budget_max",
            Box::new(move |_, c| c[r] = kmax as i32 + 1),
            SIKV_ERR_OUT_OF_BOUNDS,
            "budget_max",
        ),
        (
            "negative count",
            Box::new(move |_, c| c[r] = -1),
            SIKV_ERR_OUT_OF_BOUNDS,
            "budget_max",
        ),
        (
            "descending",
            Box::new(move |i, _| i.swap(first, first + 1)),
            SIKV_ERR_INVALID_ARGUMENT,
            "ascending",
        ),
        (
            "duplicate",
            Box::new(move |i, _| i[first + 1] = i[first]),
            SIKV_ERR_INVALID_ARGUMENT,
            "repeats",
        ),
        (
            "position >= len",
            Box::new(move |i, _| i[first + n - 1] = len),
            SIKV_ERR_OUT_OF_BOUNDS,
            "0..len (70)",
        ),
        (
            "negative position",
            Box::new(move |i, _| i[first] = -3),
            SIKV_ERR_OUT_OF_BOUNDS,
            "-3",
        ),
        (
            "sink",
            Box::new(move |i, _| i[first] = 1),
            SIKV_ERR_INVALID_ARGUMENT,
            "sink",
        ),
        (
            "window",
            Box::new(move |i, _| i[first + n - 1] = len - 1),
            SIKV_ERR_INVALID_ARGUMENT,
            "window",
        ),
    ];
    for (what, edit, status, needle) in cases {
        let (mut i, mut k) = (idx.clone(), cnt.clone());
        edit(&mut i, &mut k);
        let (s, out) = attend(&ids, &i, &k);
        expect(s, status, needle);
        assert!(msg().contains("sequence 2"), "{what}: `{}` names no sequence", msg());
        assert!(out.iter().all(|&x| x == 7.5), "{what}: out written on failure");
        assert_eq!(cache.checksum(), before, "{what}: the cache changed");
    }
    let mut out = vec![0f32; q.len()];
    for (i, k, needle) in [(null(), cnt.as_ptr(), "indices"), (idx.as_ptr(), null(), "counts")] {
        let o = out.as_mut_ptr() as *mut c_void;
        let s = sikv_attend_selected(cache.0, 0, 2, ids.as_ptr(), p(&q), i, k, o, null_mut());
        expect(s, SIKV_ERR_NULL_POINTER, needle);
    }

    // One position at a time in one row of sequence 1 (40 tokens): exactly the candidates are
    // accepted, and the rest are named as the sinks, heavy tokens and window of the config.
    let (mut sinks, mut heavy, mut window, mut accepted) = (0u32, 0u32, 0u32, Vec::new());
    for pos in 0..40 {
        let mut i = vec![-1i32; hk * kmax];
        let mut k = vec![0i32; hk];
        i[kmax] = pos;
        k[1] = 1;
        let (s, _) = attend(&ids[..1], &i, &k);
        match s {
            SIKV_OK => accepted.push(pos),
            SIKV_ERR_INVALID_ARGUMENT if msg().contains("sink") => sinks += 1,
            SIKV_ERR_INVALID_ARGUMENT if msg().contains("heavy") => heavy += 1,
            SIKV_ERR_INVALID_ARGUMENT if msg().contains("window") => window += 1,
            _ => panic!("position {pos}: {s:?} {}", msg()),
        }
    }
    assert_eq!((sinks, heavy, window), (c.n_sink, c.n_heavy, c.n_window));
    assert_eq!(accepted.len() as u32, 40 - c.n_sink - c.n_heavy - c.n_window);
    let (s, _) = attend(&ids[..1], &idx[..hk * kmax], &cnt[..hk]);
    assert_eq!(s, SIKV_OK, "{}", msg());
    for &pos in &idx[kmax..kmax + cnt[1] as usize] {
        assert!(
            accepted.contains(&pos),
            "select picked {pos}, which attend_selected refuses"
        );
    }
    assert_eq!(cache.checksum(), before);
}
