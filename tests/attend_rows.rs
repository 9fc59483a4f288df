//! `sikv_attend_rows` on the CPU, through the C ABI: several new tokens per sequence in one call
//! (issue #15). What it must equal, bit for bit:
//!
//! - one row per sequence: `sikv_attend`'s selecting path;
//! - the last row of each sequence (per-row selection): `sikv_attend` of that row's query;
//! - earlier rows do not depend on later rows' queries (per-row selection);
//! - with SIKV_FLAG_ROWS_MEAN_QUERY and one row per sequence, the per-row result.
//!
//! The table of every export's bad arguments (abi_bad_input.rs) has the call's rows too. On a
//! CUDA cache the call is checked against this backend in tests/gpu_managed.rs (both selections).

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use common::{last_error, OwnedCache, Rng};
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::SikvStatus;

const HQ: usize = 8;
const HK: usize = 2;
const D: usize = 64;

fn config(flags: u32) -> SikvConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.dtype = SIKV_DTYPE_F32;
    c.num_layers = 2;
    c.num_q_heads = HQ as u32;
    c.num_kv_heads = HK as u32;
    c.head_dim = D as u32;
    c.page_size = 16;
    c.max_seqs = 3;
    c.max_batch = 3;
    c.max_seq_len = 1024;
    c.max_append_tokens = 64;
    c.n_sink = 4;
    c.n_heavy = 8;
    c.n_window = 16;
    c.budget_min = 8;
    c.budget_max = 48;
    // sikv_attend is compared on its selecting path.
    c.dense_crossover = 0;
    c.flags = flags;
    c
}

fn vp(x: &[f32]) -> *const c_void {
    x.as_ptr() as *const c_void
}

/// A cache of three calibrated sequences (prompts of 150, 233 and 301 tokens) at both layers.
fn cache(rng: &mut Rng, flags: u32) -> OwnedCache {
    let c = config(flags);
    let mut h = null_mut();
    assert_eq!(sikv_cache_create(&c, &mut h), SikvStatus::SIKV_OK, "{}", last_error());
    let cache = OwnedCache(h);
    for (id, n) in [(11i64, 150u32), (12, 233), (13, 301)] {
        assert_eq!(sikv_seq_add(cache.0, id), SikvStatus::SIKV_OK, "{}", last_error());
        for layer in 0..c.num_layers {
            let k = rng.normals(n as usize * HK * D);
            let v = rng.normals(n as usize * HK * D);
            let q = rng.normals(2 * HQ * D);
            let s = sikv_calibrate(cache.0, layer, id, n, vp(&k), vp(&v), 2, vp(&q), null_mut());
            assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
        }
    }
    cache
}

/// Appends `rows[i]` random tokens to `ids[i]` at `layer`.
fn append(rng: &mut Rng, cache: &OwnedCache, layer: u32, ids: &[i64], rows: &[u32]) {
    let total: u32 = rows.iter().sum();
    let k = rng.normals(total as usize * HK * D);
    let v = rng.normals(total as usize * HK * D);
    let s = sikv_append(
        cache.0,
        layer,
        ids.len() as u32,
        ids.as_ptr(),
        rows.as_ptr(),
        vp(&k),
        vp(&v),
        null_mut(),
    );
    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
}

fn attend_rows(cache: &OwnedCache, layer: u32, ids: &[i64], rows: &[u32], q: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    let s = sikv_attend_rows(
        cache.0,
        layer,
        ids.len() as u32,
        ids.as_ptr(),
        rows.as_ptr(),
        vp(q),
        out.as_mut_ptr() as *mut c_void,
        null_mut(),
    );
    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
    out
}

fn attend(cache: &OwnedCache, layer: u32, ids: &[i64], q: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    let s = sikv_attend(
        cache.0,
        layer,
        ids.len() as u32,
        ids.as_ptr(),
        vp(q),
        out.as_mut_ptr() as *mut c_void,
        null_mut(),
    );
    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
    out
}

const ROW: usize = HQ * D;

#[test]
fn one_row_per_sequence_is_attend() {
    for flags in [0, SIKV_FLAG_ROWS_MEAN_QUERY] {
        let mut rng = Rng::new("one_row_per_sequence_is_attend");
        let cache = cache(&mut rng, flags);
        let ids = [11i64, 12, 13];
        for step in 0..4 {
            for layer in 0..2 {
                append(&mut rng, &cache, layer, &ids, &[1, 1, 1]);
                let q = rng.normals(ids.len() * ROW);
                let got = attend_rows(&cache, layer, &ids, &[1, 1, 1], &q);
                let want = attend(&cache, layer, &ids, &q);
                assert!(
                    got == want,
                    "flags {flags:#x} step {step} layer {layer}: one row each differs from sikv_attend"
                );
            }
        }
    }
}

#[test]
fn the_last_row_is_a_one_token_decode_and_rows_are_causal() {
    let mut rng = Rng::new("the_last_row_is_a_one_token_decode_and_rows_are_causal");
    let cache = cache(&mut rng, 0);
    let ids = [11i64, 12, 13];
    let rows = [4u32, 1, 8];
    let starts = [0usize, 4, 5];
    for layer in 0..2 {
        append(&mut rng, &cache, layer, &ids, &rows);
        let q = rng.normals(13 * ROW);
        let got = attend_rows(&cache, layer, &ids, &rows, &q);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "layer {layer}: a row was not written"
        );
        // The last row of each sequence is sikv_attend of its query.
        let last: Vec<f32> = (0..3)
            .flat_map(|i| {
                let r = starts[i] + rows[i] as usize - 1;
                q[r * ROW..(r + 1) * ROW].to_vec()
            })
            .collect();
        let one = attend(&cache, layer, &ids, &last);
        for i in 0..3 {
            let r = starts[i] + rows[i] as usize - 1;
            assert!(
                got[r * ROW..(r + 1) * ROW] == one[i * ROW..(i + 1) * ROW],
                "layer {layer}: the last row of sequence {i} differs from a one-token decode"
            );
        }
        // A later row's query changes nothing before it.
        let mut q2 = q.clone();
        for x in &mut q2[(starts[2] + 5) * ROW..(starts[2] + 6) * ROW] {
            *x = -3.0 * *x + 1.0;
        }
        let got2 = attend_rows(&cache, layer, &ids, &rows, &q2);
        let (lo, hi) = ((starts[2] + 5) * ROW, (starts[2] + 6) * ROW);
        assert!(
            got2[..lo] == got[..lo],
            "layer {layer}: rows before the changed one moved"
        );
        assert!(
            got2[lo..hi] != got[lo..hi],
            "layer {layer}: the changed row did not move"
        );
    }
}

#[test]
fn a_row_count_outside_the_bounds_is_refused_and_nothing_is_written() {
    let mut rng = Rng::new("a_row_count_outside_the_bounds_is_refused_and_nothing_is_written");
    let cache = cache(&mut rng, 0);
    let ids = [11i64, 12];
    append(&mut rng, &cache, 0, &ids, &[2, 3]);
    let mut before = 0u64;
    assert_eq!(sikv_cache_checksum(cache.0, &mut before), SikvStatus::SIKV_OK);
    let q = rng.normals(4 * ROW);
    let mut out = vec![7.0f32; q.len()];
    // A row count outside 1..=SIKV_MAX_QUERY_ROWS is refused before `q` is sized from the counts.
    for (rows, needle) in [([17u32, 1], "rows[0] = 17"), ([1, 0], "rows[1] = 0")] {
        let s = sikv_attend_rows(
            cache.0,
            0,
            2,
            ids.as_ptr(),
            rows.as_ptr(),
            vp(&q),
            out.as_mut_ptr() as *mut c_void,
            null_mut(),
        );
        assert_eq!(s, SikvStatus::SIKV_ERR_OUT_OF_BOUNDS, "{rows:?}");
        assert!(last_error().contains(needle), "{rows:?}: {}", last_error());
    }
    assert!(out.iter().all(|&x| x == 7.0), "a refused call wrote `out`");
    let mut after = 0u64;
    assert_eq!(sikv_cache_checksum(cache.0, &mut after), SikvStatus::SIKV_OK);
    assert_eq!(before, after, "a refused call changed the cache");
}

/// SIKV_FLAG_ROWS_MEAN_QUERY reaches the selection: two caches with the same contents, one per
/// setting, differ somewhere over eight rows per sequence of random queries, and agree on a
/// one-row call (the mean of one row is that row).
#[test]
fn the_mean_query_flag_changes_the_selection_of_multi_row_calls() {
    let mut a = Rng::new("the_mean_query_flag_changes_the_selection_of_multi_row_calls");
    let mut b = Rng(a.0);
    let per_row = cache(&mut a, 0);
    let mean = cache(&mut b, SIKV_FLAG_ROWS_MEAN_QUERY);
    let ids = [11i64, 13];
    append(&mut a, &per_row, 1, &ids, &[8, 8]);
    append(&mut b, &mean, 1, &ids, &[8, 8]);
    let q = a.normals(16 * ROW);
    let x = attend_rows(&per_row, 1, &ids, &[8, 8], &q);
    let y = attend_rows(&mean, 1, &ids, &[8, 8], &q);
    assert!(x.iter().chain(&y).all(|v| v.is_finite()));
    assert!(
        x != y,
        "per-row and mean-query selection gave the same outputs over 16 rows"
    );
    // One row each: the mean of one row is that row.
    let q1 = a.normals(2 * ROW);
    assert!(attend_rows(&per_row, 1, &ids, &[1, 1], &q1) == attend_rows(&mean, 1, &ids, &[1, 1], &q1));
}
