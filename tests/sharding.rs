//! Tensor-parallel shards (issue #16, what one device allows): a cache that holds a contiguous
//! range of the model's KV heads (with their query heads) is just a cache configured with the
//! shard's head counts and fed the shard's slices of K, V and q. Calibration, the selection
//! and the budget are per KV head, so two half-caches must reproduce the unsharded cache
//! exactly: the same selections and the same attention outputs, bit for bit, on the same
//! device. Run on the CPU and, where there is one, on a CUDA device.

mod common;

use common::Rng;
use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::{numeric, CacheConfig, SikvStatus};

const D: usize = 64;
const HQ: usize = 8;
const HK: usize = 4;
const G: usize = HQ / HK;
const SHARDS: usize = 2;

fn config(device: u32, dtype: u32, kv_heads: usize) -> SikvConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = device;
    c.dtype = dtype;
    c.num_layers = 1;
    c.num_q_heads = (kv_heads * G) as u32;
    c.num_kv_heads = kv_heads as u32;
    c.head_dim = D as u32;
    c.page_size = 16;
    c.max_seqs = 2;
    c.max_batch = 2;
    c.max_seq_len = 1024;
    c.max_append_tokens = 1024;
    c.n_sink = 2;
    c.n_heavy = 8;
    c.n_window = 8;
    c.budget_min = 8;
    c.budget_max = 24;
    c.dense_crossover = 0; // compare the selections too
    c
}

/// Rows `[n][heads][D]` of `x` restricted to heads `[h0, h1)`.
fn heads(x: &[f32], heads: usize, h0: usize, h1: usize) -> Vec<f32> {
    x.chunks(heads * D)
        .flat_map(|row| row[h0 * D..h1 * D].to_vec())
        .collect()
}

/// The activation type of a C dtype value (the library's own parsing of it).
fn dtype_of(dtype: u32) -> Dtype {
    CacheConfig::from_c(&config(SIKV_DEVICE_CPU, dtype, HK)).unwrap().dtype
}

fn to_bytes(dtype: u32, x: &[f32]) -> Vec<u8> {
    let dt = dtype_of(dtype);
    let mut b = vec![0u8; x.len() * dt.size()];
    numeric::from_f32(dt, x, &mut b);
    b
}

/// What one cache gave: per step, the selection counts and indices and the output bytes.
#[derive(Default)]
struct Trace {
    counts: Vec<Vec<i32>>,
    indices: Vec<Vec<i32>>,
    out: Vec<Vec<u8>>,
}

/// Feeds `cache` (holding KV heads [h0, h1) of the model) the shard's slices of the same
/// prompts and decode steps (the model's full tensors are drawn from `seed`, then sliced).
fn drive(cache: &mut Cache, dtype: u32, h0: usize, h1: usize, seed: u64) -> Trace {
    let mut rng = Rng(seed);
    let ids = [7i64, 9];
    let prompts = [300usize, 211];
    let (hk, hq) = (h1 - h0, (h1 - h0) * G);
    let null = std::ptr::null_mut();
    let mut t = Trace::default();
    for (&id, &n) in ids.iter().zip(&prompts) {
        let (k, v, q) = (
            rng.normals(n * HK * D),
            rng.normals(n * HK * D),
            rng.normals(2 * HQ * D),
        );
        cache.add_seq(id).unwrap();
        let (k, v) = (heads(&k, HK, h0, h1), heads(&v, HK, h0, h1));
        let q = heads(&q, HQ, h0 * G, h1 * G);
        cache
            .calibrate(
                0,
                id,
                n as u32,
                Activations::Host(&to_bytes(dtype, &k)),
                Activations::Host(&to_bytes(dtype, &v)),
                2,
                Activations::Host(&to_bytes(dtype, &q)),
                null,
            )
            .unwrap();
    }
    let dsize = dtype_of(dtype).size();
    for _ in 0..6 {
        let (k, v, q) = (
            rng.normals(2 * HK * D),
            rng.normals(2 * HK * D),
            rng.normals(2 * HQ * D),
        );
        let (k, v) = (heads(&k, HK, h0, h1), heads(&v, HK, h0, h1));
        let q = to_bytes(dtype, &heads(&q, HQ, h0 * G, h1 * G));
        cache
            .append(
                0,
                &ids,
                &[1, 1],
                Activations::Host(&to_bytes(dtype, &k)),
                Activations::Host(&to_bytes(dtype, &v)),
                null,
            )
            .unwrap();
        let budget = 24;
        let (mut idx, mut cnt) = (vec![0i32; 2 * hk * budget], vec![0i32; 2 * hk]);
        cache
            .select(0, &ids, Activations::Host(&q), &mut idx, &mut cnt, null)
            .unwrap();
        let mut out = vec![0u8; 2 * hq * D * dsize];
        cache
            .attend(0, &ids, Activations::Host(&q), Output::Host(&mut out), null)
            .unwrap();
        t.counts.push(cnt);
        t.indices.push(idx);
        t.out.push(out);
    }
    t
}

/// Per-shard arrays `[seq][shard heads][..]` of one step, reassembled in the model's head order.
fn merge(parts: &[Vec<Vec<i32>>], step: usize) -> Vec<i32> {
    let mut m = Vec::new();
    for s in 0..2 {
        for p in parts {
            let rows = p[step].len() / 2;
            m.extend_from_slice(&p[step][s * rows..(s + 1) * rows]);
        }
    }
    m
}

fn shards_equal_unsharded(device: u32, dtype: u32, test: &str) {
    let seed = common::seed(test);
    let make = |hk: usize| Cache::new(CacheConfig::from_c(&config(device, dtype, hk)).unwrap());
    let mut full = match make(HK) {
        Ok(c) => c,
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => {
            common::skip_no_cuda_device(test);
            return;
        }
        Err(e) => panic!("{test}: {e}"),
    };
    let want = drive(&mut full, dtype, 0, HK, seed);
    let per = HK / SHARDS;
    let got: Vec<Trace> = (0..SHARDS)
        .map(|s| drive(&mut make(per).unwrap(), dtype, s * per, (s + 1) * per, seed))
        .collect();
    let dsize = dtype_of(dtype).size();
    let mut selected = 0usize;
    for step in 0..want.out.len() {
        let counts: Vec<Vec<Vec<i32>>> = got.iter().map(|t| t.counts.clone()).collect();
        let indices: Vec<Vec<Vec<i32>>> = got.iter().map(|t| t.indices.clone()).collect();
        assert_eq!(merge(&counts, step), want.counts[step], "{test} step {step}: counts");
        assert_eq!(
            merge(&indices, step),
            want.indices[step],
            "{test} step {step}: selections"
        );
        selected += want.counts[step].iter().map(|&c| c as usize).sum::<usize>();
        // Outputs [seq][H_q][D]: each shard holds a contiguous block of query heads.
        let row = HQ / SHARDS * D * dsize;
        let mut out = Vec::new();
        for s in 0..2 {
            for t in &got {
                out.extend_from_slice(&t.out[step][s * row..(s + 1) * row]);
            }
        }
        assert_eq!(out, want.out[step], "{test} step {step}: attention outputs differ");
    }
    println!(
        "{test}: {SHARDS} shards of {per} KV heads = the unsharded cache of {HK}: selections ({selected} positions) and outputs bit for bit over {} steps",
        want.out.len()
    );
}

#[test]
fn shards_equal_unsharded_on_cpu() {
    shards_equal_unsharded(SIKV_DEVICE_CPU, SIKV_DTYPE_F32, "shards_equal_unsharded_on_cpu");
}

#[test]
fn shards_equal_unsharded_on_gpu() {
    shards_equal_unsharded(SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, "shards_equal_unsharded_on_gpu");
}
