//! Both ABI layers on a CUDA device against the CPU backend. The managed cache end to end: a ragged batch (one
//! sequence longer than 100K tokens, lengths not multiples of the page size), prefill +
//! calibrate, then decode steps of append + attend at every layer, fork and remove. Without a
//! CUDA device each test prints one line `skipped: no CUDA device (<test>)`, which CI counts;
//! with one, each prints its seed (`SIKV_TEST_SEED` replays it).

mod common;

use common::Rng;
use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::{numeric, CacheConfig, SikvStatus};

/// Uniform in [-1, 1) plus a per-channel offset, never all zeros.
fn vals(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    (0..n)
        .map(|i| rng.range(-1.0, 1.0) + 0.05 * ((i % d) as f32 / d as f32))
        .collect()
}

/// The largest |gpu - cpu| of each row of `d` values over that row's own max |cpu| (no floor:
/// a row of small outputs is held to the same relative accuracy as a row of large ones).
fn row_rel_err(gpu: &[f32], cpu: &[f32], d: usize) -> f32 {
    let mut worst = 0f32;
    for (g, c) in gpu.chunks(d).zip(cpu.chunks(d)) {
        assert!(g.iter().all(|x| x.is_finite()), "non-finite GPU output");
        let scale = c.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in g.iter().zip(c) {
            let e = if scale > 0.0 {
                (a - b).abs() / scale
            } else if a == b {
                0.0
            } else {
                f32::INFINITY
            };
            worst = worst.max(e);
        }
    }
    worst
}

/// Tolerance of f16 outputs against the CPU backend, relative to each row's max |out|: about
/// 10x the worst recorded on the H200 (8.3e-4 over 256 managed decode steps, 2026-12-02).
const F16_ROW_TOL: f32 = 8e-3;

fn quick() -> bool {
    std::env::var("SIKV_GPU_TEST_QUICK").map(|v| v == "1").unwrap_or(false)
}

fn config(device: u32, dtype: u32, max_seq_len: u32) -> CacheConfig {
    config_flags(device, dtype, max_seq_len, 0)
}

/// `config` with the SIKV_FLAG_* bits `flags`.
fn config_flags(device: u32, dtype: u32, max_seq_len: u32, flags: u32) -> CacheConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.flags |= flags;
    c.device = device;
    c.dtype = dtype;
    c.num_layers = 2;
    c.num_q_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.page_size = 64;
    c.max_seqs = 4;
    c.max_batch = 3;
    c.max_seq_len = max_seq_len;
    c.max_append_tokens = max_seq_len;
    // The sparse path on both devices (the default crossover would run these short
    // sequences dense).
    c.dense_crossover = 0;
    CacheConfig::from_c(&c).unwrap()
}

fn to_bytes(dt: Dtype, x: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; x.len() * dt.size()];
    numeric::from_f32(dt, x, &mut b);
    b
}

/// The same configuration on the GPU and on the CPU backend, and test `test`'s generator (its
/// seed line printed); `None` (after the counted skip line) without a CUDA device.
fn gpu_and_cpu_caches(max_len: u32, test: &str) -> Option<(Cache, Cache, CacheConfig, Rng)> {
    gpu_and_cpu_caches_flags(max_len, test, 0)
}

/// `gpu_and_cpu_caches` with the SIKV_FLAG_* bits `flags` on both.
fn gpu_and_cpu_caches_flags(max_len: u32, test: &str, flags: u32) -> Option<(Cache, Cache, CacheConfig, Rng)> {
    let gpu_cfg = config_flags(SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, max_len, flags);
    let gpu = match Cache::new(gpu_cfg.clone()) {
        Ok(c) => c,
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => {
            common::skip_no_cuda_device(test);
            return None;
        }
        Err(e) => panic!("GPU cache: {e}"),
    };
    assert!(gpu.stats().on_gpu);
    let cpu = Cache::new(config_flags(SIKV_DEVICE_CPU, SIKV_DTYPE_F16, max_len, flags)).unwrap();
    Some((gpu, cpu, gpu_cfg, Rng::new(test)))
}

/// Adds `ids` to both caches and calibrates every layer with the same random prompt of `lens`
/// tokens (and 2 queries).
fn prefill_both(gpu: &mut Cache, cpu: &mut Cache, cfg: &CacheConfig, ids: &[i64], lens: &[u32], rng: &mut Rng) {
    let (hq, hk, d, dt) = (
        cfg.num_q_heads as usize,
        cfg.num_kv_heads as usize,
        cfg.head_dim as usize,
        cfg.dtype,
    );
    for (&id, &n) in ids.iter().zip(lens) {
        gpu.add_seq(id).unwrap();
        cpu.add_seq(id).unwrap();
        for layer in 0..cfg.num_layers {
            let k = to_bytes(dt, &vals(rng, n as usize * hk * d, d));
            let v = to_bytes(dt, &vals(rng, n as usize * hk * d, d));
            let q = to_bytes(dt, &vals(rng, 2 * hq * d, d));
            for c in [&mut *gpu, &mut *cpu] {
                c.calibrate(
                    layer,
                    id,
                    n,
                    Activations::Host(&k),
                    Activations::Host(&v),
                    2,
                    Activations::Host(&q),
                    std::ptr::null_mut(),
                )
                .unwrap_or_else(|e| panic!("calibrate seq {id} layer {layer}: {e}"));
            }
        }
    }
}

#[test]
fn managed_cache_on_gpu_matches_cpu_backend() {
    let (lens, steps): (Vec<u32>, u32) = if quick() {
        (vec![300, 1000, 4097], 8)
    } else {
        (vec![1000, 3333, 100_003], 256)
    };
    let max_len = lens.iter().max().unwrap() + steps + 8;
    let Some((mut gpu, mut cpu, gpu_cfg, mut rng)) =
        gpu_and_cpu_caches(max_len, "managed_cache_on_gpu_matches_cpu_backend")
    else {
        return;
    };
    println!("managed GPU vs CPU: lengths {lens:?}, {steps} decode steps");
    let cfg = &gpu_cfg;
    let (hq, hk, d, dt) = (
        cfg.num_q_heads as usize,
        cfg.num_kv_heads as usize,
        cfg.head_dim as usize,
        cfg.dtype,
    );
    let ids: Vec<i64> = (0..lens.len() as i64).map(|i| 100 + i).collect();
    let null = std::ptr::null_mut();
    prefill_both(&mut gpu, &mut cpu, cfg, &ids, &lens, &mut rng);
    let b = ids.len();
    let counts = vec![1u32; b];
    let (mut worst, mut sel_mismatch, mut compared) = (0f32, 0usize, 0usize);
    for step in 0..steps {
        for layer in 0..cfg.num_layers {
            let k = to_bytes(dt, &vals(&mut rng, b * hk * d, d));
            let v = to_bytes(dt, &vals(&mut rng, b * hk * d, d));
            let q = to_bytes(dt, &vals(&mut rng, b * hq * d, d));
            let mut outs = [vec![0xFFu8; b * hq * d * 2], vec![0u8; b * hq * d * 2]];
            for (c, out) in [&mut gpu, &mut cpu].into_iter().zip(outs.iter_mut()) {
                c.append(layer, &ids, &counts, Activations::Host(&k), Activations::Host(&v), null)
                    .unwrap();
                c.attend(layer, &ids, Activations::Host(&q), Output::Host(out), null)
                    .unwrap();
            }
            let (mut og, mut oc) = (vec![0f32; b * hq * d], vec![0f32; b * hq * d]);
            numeric::to_f32(dt, &outs[0], &mut og);
            numeric::to_f32(dt, &outs[1], &mut oc);
            worst = worst.max(row_rel_err(&og, &oc, d));
            if step % 32 == 0 {
                // Selections agree except for positions whose scores tie within rounding.
                let rows = b * hk;
                let kmax = cfg.budget.max as usize;
                let (mut ig, mut cg) = (vec![0i32; rows * kmax], vec![0i32; rows]);
                let (mut ic, mut cc) = (vec![0i32; rows * kmax], vec![0i32; rows]);
                gpu.select(layer, &ids, Activations::Host(&q), &mut ig, &mut cg, null)
                    .unwrap();
                cpu.select(layer, &ids, Activations::Host(&q), &mut ic, &mut cc, null)
                    .unwrap();
                assert_eq!(cg, cc, "step {step} layer {layer}: selection counts differ");
                for r in 0..rows {
                    let a: std::collections::BTreeSet<i32> =
                        ig[r * kmax..r * kmax + cg[r] as usize].iter().copied().collect();
                    let c: std::collections::BTreeSet<i32> =
                        ic[r * kmax..r * kmax + cc[r] as usize].iter().copied().collect();
                    sel_mismatch += a.symmetric_difference(&c).count();
                    compared += c.len();
                }
            }
        }
    }
    // Fork the long sequence on both, decode one more step on the fork, remove the source.
    for c in [&mut gpu, &mut cpu] {
        c.fork_seq(ids[2], 999).unwrap();
        c.remove_seq(ids[2]).unwrap();
    }
    let q = to_bytes(dt, &vals(&mut rng, hq * d, d));
    let mut outs = [vec![0xFFu8; hq * d * 2], vec![0u8; hq * d * 2]];
    for (c, out) in [&mut gpu, &mut cpu].into_iter().zip(outs.iter_mut()) {
        c.attend(0, &[999], Activations::Host(&q), Output::Host(out), null)
            .unwrap();
    }
    let (mut og, mut oc) = (vec![0f32; hq * d], vec![0f32; hq * d]);
    numeric::to_f32(dt, &outs[0], &mut og);
    numeric::to_f32(dt, &outs[1], &mut oc);
    let fork_err = row_rel_err(&og, &oc, d);
    println!(
        "managed GPU vs CPU: worst output error {worst:.2e} (relative to each row's max |out|), fork {fork_err:.2e}, selection differences {sel_mismatch} of {compared}"
    );
    assert!(
        worst < F16_ROW_TOL,
        "GPU output differs from the CPU backend by {worst}"
    );
    assert!(fork_err < F16_ROW_TOL, "forked sequence differs by {fork_err}");
    // The kernels score exactly as the CPU does and break ties by the smaller position.
    assert_eq!(
        sel_mismatch, 0,
        "{sel_mismatch} of {compared} selected positions differ"
    );
}

/// `attend_rows` on a CUDA cache against the CPU backend: several new tokens per sequence
/// appended, then attended as query rows (causal among them, selected per row), over decode
/// steps at every layer, one step's call larger than max_batch (run as groups of whole
/// sequences); one sequence with more rows than max_batch is refused before anything runs.
#[test]
fn attend_rows_on_gpu_matches_cpu_backend() {
    attend_rows_on_gpu(0, "attend_rows_on_gpu_matches_cpu_backend");
}

/// As `attend_rows_on_gpu_matches_cpu_backend`, selecting once per sequence from the mean of
/// its rows' queries (SIKV_FLAG_ROWS_MEAN_QUERY) on both devices.
#[test]
fn attend_rows_mean_query_on_gpu_matches_cpu_backend() {
    attend_rows_on_gpu(
        SIKV_FLAG_ROWS_MEAN_QUERY,
        "attend_rows_mean_query_on_gpu_matches_cpu_backend",
    );
}

fn attend_rows_on_gpu(flags: u32, test: &str) {
    let lens: Vec<u32> = if quick() {
        vec![300, 1000, 4097]
    } else {
        vec![1000, 3333, 20_003]
    };
    let steps = if quick() { 4 } else { 12 };
    let max_len = lens.iter().max().unwrap() + 4 * steps + 8;
    let Some((mut gpu, mut cpu, gpu_cfg, mut rng)) = gpu_and_cpu_caches_flags(max_len, test, flags) else {
        return;
    };
    let cfg = &gpu_cfg;
    let (hq, hk, d, dt) = (
        cfg.num_q_heads as usize,
        cfg.num_kv_heads as usize,
        cfg.head_dim as usize,
        cfg.dtype,
    );
    let ids: Vec<i64> = (0..lens.len() as i64).map(|i| 100 + i).collect();
    let null = std::ptr::null_mut();
    prefill_both(&mut gpu, &mut cpu, cfg, &ids, &lens, &mut rng);
    let mut worst = 0f32;
    for step in 0..steps {
        // Rows per sequence this step; the GPU cache's max_batch is 3, so the fourth pattern
        // (7 rows) runs there as groups of whole sequences ([2], [3], [2]).
        let (sids, rows): (Vec<i64>, Vec<u32>) = match step % 4 {
            0 => (vec![ids[0], ids[2]], vec![1, 2]),
            1 => (vec![ids[1]], vec![3]),
            2 => (ids.clone(), vec![1, 1, 1]),
            _ => (ids.clone(), vec![2, 3, 2]),
        };
        let total: usize = rows.iter().map(|&n| n as usize).sum();
        for layer in 0..cfg.num_layers {
            let k = to_bytes(dt, &vals(&mut rng, total * hk * d, d));
            let v = to_bytes(dt, &vals(&mut rng, total * hk * d, d));
            let q = to_bytes(dt, &vals(&mut rng, total * hq * d, d));
            let mut outs = [vec![0xFFu8; total * hq * d * 2], vec![0u8; total * hq * d * 2]];
            for (c, out) in [&mut gpu, &mut cpu].into_iter().zip(outs.iter_mut()) {
                c.append(layer, &sids, &rows, Activations::Host(&k), Activations::Host(&v), null)
                    .unwrap();
                c.attend_rows(layer, &sids, &rows, Activations::Host(&q), Output::Host(out), null)
                    .unwrap_or_else(|e| panic!("step {step} layer {layer}: attend_rows: {e}"));
            }
            let (mut og, mut oc) = (vec![0f32; total * hq * d], vec![0f32; total * hq * d]);
            numeric::to_f32(dt, &outs[0], &mut og);
            numeric::to_f32(dt, &outs[1], &mut oc);
            worst = worst.max(row_rel_err(&og, &oc, d));
        }
    }
    println!("managed attend_rows GPU vs CPU (flags {flags}): worst output error {worst:.2e} over {steps} steps");
    assert!(
        worst < F16_ROW_TOL,
        "GPU attend_rows differs from the CPU backend by {worst}"
    );
    // Four rows for one sequence on a cache of max_batch 3: refused before any group runs,
    // the output untouched.
    let q = to_bytes(dt, &vals(&mut rng, 5 * hq * d, d));
    let mut out = vec![0x5Au8; 5 * hq * d * 2];
    let e = gpu
        .attend_rows(
            0,
            &ids[..2],
            &[1, 4],
            Activations::Host(&q),
            Output::Host(&mut out),
            null,
        )
        .expect_err("4 query rows for one sequence on a max_batch 3 GPU cache");
    assert_eq!(e.status, SikvStatus::SIKV_ERR_OUT_OF_BOUNDS, "{e}");
    assert!(e.message.contains("max_batch"), "{e}");
    assert!(out.iter().all(|&x| x == 0x5A), "a refused call wrote its output");
}

/// `attend_selected` on a CUDA cache: the library's own selection handed back is `attend` bit
/// for bit, and the same selection on the CPU backend gives the same output within fp16
/// tolerance; a bad selection is refused on the host before anything runs.
#[test]
fn attend_selected_on_gpu_matches_attend_and_cpu() {
    let lens = [700u32, 2049];
    let steps = 3u32;
    let max_len = 4096;
    let Some((mut gpu, mut cpu, gpu_cfg, mut rng)) =
        gpu_and_cpu_caches(max_len, "attend_selected_on_gpu_matches_attend_and_cpu")
    else {
        return;
    };
    let cfg = &gpu_cfg;
    let (hq, hk, d, dt) = (
        cfg.num_q_heads as usize,
        cfg.num_kv_heads as usize,
        cfg.head_dim as usize,
        cfg.dtype,
    );
    let ids = [5i64, 6];
    let null = std::ptr::null_mut();
    prefill_both(&mut gpu, &mut cpu, cfg, &ids, &lens, &mut rng);
    let b = ids.len();
    for _ in 0..steps {
        for layer in 0..cfg.num_layers {
            let k = to_bytes(dt, &vals(&mut rng, b * hk * d, d));
            let v = to_bytes(dt, &vals(&mut rng, b * hk * d, d));
            for c in [&mut gpu, &mut cpu] {
                c.append(layer, &ids, &[1, 1], Activations::Host(&k), Activations::Host(&v), null)
                    .unwrap();
            }
        }
    }
    let (rows, kmax) = (b * hk, cfg.budget.max as usize);
    let mut worst = 0f32;
    for layer in 0..cfg.num_layers {
        let q = to_bytes(dt, &vals(&mut rng, b * hq * d, d));
        let (mut idx, mut cnt) = (vec![0i32; rows * kmax], vec![0i32; rows]);
        gpu.select(layer, &ids, Activations::Host(&q), &mut idx, &mut cnt, null)
            .unwrap();
        // What follows a row's count is the caller's business; the kernels must not read it.
        for r in 0..rows {
            idx[r * kmax + cnt[r] as usize..(r + 1) * kmax].fill(i32::MAX);
        }
        let mut want = vec![0xFFu8; b * hq * d * 2];
        gpu.attend(layer, &ids, Activations::Host(&q), Output::Host(&mut want), null)
            .unwrap();
        let mut outs = [vec![0xFFu8; want.len()], vec![0u8; want.len()]];
        for (c, out) in [&mut gpu, &mut cpu].into_iter().zip(outs.iter_mut()) {
            c.attend_selected(layer, &ids, Activations::Host(&q), &idx, &cnt, Output::Host(out), null)
                .unwrap_or_else(|e| panic!("layer {layer}: attend_selected: {e}"));
        }
        assert!(
            outs[0] == want,
            "layer {layer}: attend_selected with select's output differs from attend on the GPU"
        );
        let (mut og, mut oc) = (vec![0f32; b * hq * d], vec![0f32; b * hq * d]);
        numeric::to_f32(dt, &outs[0], &mut og);
        numeric::to_f32(dt, &outs[1], &mut oc);
        worst = worst.max(row_rel_err(&og, &oc, d));
        let before = gpu.checksum().unwrap();
        let mut sink = idx.clone();
        sink[0] = 0;
        let mut out = vec![0xFFu8; want.len()];
        let e = gpu
            .attend_selected(
                layer,
                &ids,
                Activations::Host(&q),
                &sink,
                &cnt,
                Output::Host(&mut out),
                null,
            )
            .unwrap_err();
        assert_eq!(e.status, SikvStatus::SIKV_ERR_INVALID_ARGUMENT, "{e}");
        assert!(e.message.contains("sink"), "{e}");
        assert!(out.iter().all(|&x| x == 0xFF), "out written on failure");
        assert_eq!(gpu.checksum().unwrap(), before);
    }
    println!("managed GPU attend_selected vs CPU: worst output error {worst:.2e} (relative to each row's max |out|)");
    assert!(
        worst < F16_ROW_TOL,
        "GPU attend_selected differs from the CPU backend by {worst}"
    );
}

/// The stateless C ABI on a CUDA device against the same calls on the CPU: calibrate two
/// sequence slots, append decode tokens, run the fused decode and the separate select; pools
/// must be byte-identical (encode and calibrate are exact) and outputs within fp16 tolerance.
#[test]
fn stateless_abi_on_gpu_matches_cpu() {
    use selfindexkv::ffi::*;
    use selfindexkv::gpu::GpuContext;
    use selfindexkv::layout::Layout;
    use std::ffi::c_void;
    use std::ptr::null_mut;

    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CUDA;
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 1;
    c.num_q_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.page_size = 16;
    c.max_seqs = 2;
    c.max_batch = 2;
    c.max_seq_len = 640;
    c.max_append_tokens = 640;
    c.dense_crossover = 0; // the sparse path
    c.num_pages = 80;
    c.budget_min = 16;
    c.budget_max = 64;
    let mut gk: *mut SikvKernels = null_mut();
    let s = sikv_kernels_create(&c, &mut gk);
    if s == SikvStatus::SIKV_ERR_NO_DEVICE {
        common::skip_no_cuda_device("stateless_abi_on_gpu_matches_cpu");
        return;
    }
    assert_eq!(s, SikvStatus::SIKV_OK);
    let mut cc = c;
    cc.device = SIKV_DEVICE_CPU;
    let mut ck: *mut SikvKernels = null_mut();
    assert_eq!(sikv_kernels_create(&cc, &mut ck), SikvStatus::SIKV_OK);
    let cfg = CacheConfig::from_c(&c).unwrap();
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).unwrap();
    let mut info = SikvLayoutInfo::default();
    assert_eq!(sikv_query_layout(&c, &mut info), SikvStatus::SIKV_OK);
    let mut ws_bytes = 0usize;
    assert_eq!(sikv_workspace_size(gk, 2, &mut ws_bytes), SikvStatus::SIKV_OK);
    let null = null_mut();

    // Pools: device and host, same layout.
    let dplanes = ctx.alloc(info.layer_plane_bytes).unwrap();
    let dstate = ctx.alloc(info.layer_state_bytes).unwrap();
    let dws = ctx.alloc(ws_bytes).unwrap();
    let mut hplanes = vec![0u8; info.layer_plane_bytes];
    let mut hstate = vec![0u8; info.layer_state_bytes];
    ctx.copy_htod_async(dplanes.ptr(), &hplanes, null).unwrap();
    ctx.copy_htod_async(dstate.ptr(), &hstate, null).unwrap();
    let pools_of = |base: u64, state: u64| SikvLayerPools {
        plane: std::array::from_fn(|i| {
            if info.plane_bytes[i] == 0 {
                null_mut()
            } else {
                (base + info.plane_offset[i] as u64) as *mut c_void
            }
        }),
        state: state as *mut c_void,
    };
    let dpools = pools_of(dplanes.ptr(), dstate.ptr());
    let hpools = pools_of(hplanes.as_mut_ptr() as u64, hstate.as_mut_ptr() as u64);
    for (k, p) in [(gk, &dpools), (ck, &hpools)] {
        for slot in 0..2 {
            assert_eq!(sikv_kernel_reset_slot(k, p, slot, null), SikvStatus::SIKV_OK);
        }
    }
    // A device scratch arena for activations and metadata, filled per call.
    let arena = ctx.alloc(1 << 20).unwrap();
    let put = |off: usize, bytes: &[u8]| -> *mut c_void {
        ctx.copy_htod_async(arena.ptr() + off as u64, bytes, null).unwrap();
        (arena.ptr() + off as u64) as *mut c_void
    };
    let mut rng = Rng::new("stateless_abi_on_gpu_matches_cpu");
    let (hq, hk, d) = (8usize, 2usize, 64usize);
    let dt = Dtype::F16;
    let lens = [300usize, 157];
    let pages: [Vec<i32>; 2] = [(0..40).collect(), (40..80).rev().collect()];
    let slot_of = |s: usize, pos: usize| pages[s][pos / 16] as i64 * 16 + (pos % 16) as i64;
    for (s, &n) in lens.iter().enumerate() {
        let k = to_bytes(dt, &vals(&mut rng, n * hk * d, d));
        let v = to_bytes(dt, &vals(&mut rng, n * hk * d, d));
        let q = to_bytes(dt, &vals(&mut rng, 2 * hq * d, d));
        let sm: Vec<i64> = (0..n).map(|t| slot_of(s, t)).collect();
        let smb: Vec<u8> = sm.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (dk, dv, dq, dsm) = (put(0, &k), put(262144, &v), put(524288, &q), put(786432, &smb));
        let st = sikv_kernel_calibrate(
            gk,
            &dpools,
            s as u32,
            n as u32,
            dk,
            dv,
            2,
            dq,
            dsm as *const i64,
            dws.ptr() as *mut c_void,
            ws_bytes,
            null,
        );
        assert_eq!(st, SikvStatus::SIKV_OK);
        let st = sikv_kernel_calibrate(
            ck,
            &hpools,
            s as u32,
            n as u32,
            k.as_ptr() as _,
            v.as_ptr() as _,
            2,
            q.as_ptr() as _,
            sm.as_ptr(),
            null,
            0,
            null,
        );
        assert_eq!(st, SikvStatus::SIKV_OK);
        ctx.synchronize(null).unwrap();
    }
    let mut len = lens;
    let (mut worst, mut worst_rows) = (0f32, 0f32);
    for step in 0..6 {
        // One new token per sequence.
        let k = to_bytes(dt, &vals(&mut rng, 2 * hk * d, d));
        let v = to_bytes(dt, &vals(&mut rng, 2 * hk * d, d));
        let q = to_bytes(dt, &vals(&mut rng, 2 * hq * d, d));
        let sm: Vec<i64> = (0..2).map(|s| slot_of(s, len[s])).collect();
        let ss = [0i32, 1];
        let pos = [len[0] as i32, len[1] as i32];
        let b8 = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let b4 = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (dk, dv, dq) = (put(0, &k), put(4096, &v), put(8192, &q));
        let (dsm, dss, dpos) = (put(16384, &b8(&sm)), put(20480, &b4(&ss)), put(24576, &b4(&pos)));
        assert_eq!(
            sikv_kernel_append(gk, &dpools, 2, dk, dv, dsm as _, dss as _, dpos as _, null),
            SikvStatus::SIKV_OK
        );
        assert_eq!(
            sikv_kernel_append(
                ck,
                &hpools,
                2,
                k.as_ptr() as _,
                v.as_ptr() as _,
                sm.as_ptr(),
                ss.as_ptr(),
                pos.as_ptr(),
                null
            ),
            SikvStatus::SIKV_OK
        );
        len = [len[0] + 1, len[1] + 1];
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut last = Vec::new();
        for s in 0..2 {
            let np = len[s].div_ceil(16);
            indices.extend_from_slice(&pages[s][..np]);
            indptr.push(indices.len() as i32);
            last.push((len[s] - (np - 1) * 16) as i32);
        }
        let (di, dx, dl) = (
            put(32768, &b4(&indptr)),
            put(36864, &b4(&indices)),
            put(40960, &b4(&last)),
        );
        let dtable = SikvPageTable {
            indptr: di as _,
            indices: dx as _,
            last_page_len: dl as _,
            batch: 2,
        };
        let htable = SikvPageTable {
            indptr: indptr.as_ptr(),
            indices: indices.as_ptr(),
            last_page_len: last.as_ptr(),
            batch: 2,
        };
        let dout = (arena.ptr() + 49152) as *mut c_void;
        let mut hout = vec![0u8; 2 * hq * d * 2];
        assert_eq!(
            sikv_kernel_decode(gk, &dpools, &dtable, dss as _, dq, dout, dws.ptr() as _, ws_bytes, null),
            SikvStatus::SIKV_OK
        );
        assert_eq!(
            sikv_kernel_decode(
                ck,
                &hpools,
                &htable,
                ss.as_ptr(),
                q.as_ptr() as _,
                hout.as_mut_ptr() as _,
                null,
                0,
                null
            ),
            SikvStatus::SIKV_OK
        );
        ctx.synchronize(null).unwrap();
        let mut gout = vec![0u8; hout.len()];
        ctx.copy_dtoh(&mut gout, arena.ptr() + 49152).unwrap();
        let (mut og, mut oc) = (vec![0f32; 2 * hq * d], vec![0f32; 2 * hq * d]);
        numeric::to_f32(dt, &gout, &mut og);
        numeric::to_f32(dt, &hout, &mut oc);
        worst = worst.max(row_rel_err(&og, &oc, d));
        assert!(worst < F16_ROW_TOL, "step {step}: decode output differs by {worst}");

        // The last tokens as several query rows: 3 of the first sequence, 2 of the second.
        let rows_off = [0i32, 3, 5];
        let qr = to_bytes(dt, &vals(&mut rng, 5 * hq * d, d));
        let (dqr, doff) = (put(53248, &qr), put(45056, &b4(&rows_off)));
        let mut ws_rows = 0usize;
        assert_eq!(sikv_workspace_size_rows(gk, 5, &mut ws_rows), SikvStatus::SIKV_OK);
        let dws_rows = ctx.alloc(ws_rows).unwrap();
        let drout = (arena.ptr() + 65536) as *mut c_void;
        let mut hrout = vec![0u8; 5 * hq * d * 2];
        assert_eq!(
            sikv_kernel_decode_rows(
                gk,
                &dpools,
                &dtable,
                dss as _,
                doff as _,
                5,
                dqr,
                drout,
                dws_rows.ptr() as _,
                ws_rows,
                null
            ),
            SikvStatus::SIKV_OK
        );
        assert_eq!(
            sikv_kernel_decode_rows(
                ck,
                &hpools,
                &htable,
                ss.as_ptr(),
                rows_off.as_ptr(),
                5,
                qr.as_ptr() as _,
                hrout.as_mut_ptr() as _,
                null,
                0,
                null
            ),
            SikvStatus::SIKV_OK,
            "{}",
            last_error_message()
        );
        ctx.synchronize(null).unwrap();
        let mut grout = vec![0u8; hrout.len()];
        ctx.copy_dtoh(&mut grout, arena.ptr() + 65536).unwrap();
        let (mut og, mut oc) = (vec![0f32; 5 * hq * d], vec![0f32; 5 * hq * d]);
        numeric::to_f32(dt, &grout, &mut og);
        numeric::to_f32(dt, &hrout, &mut oc);
        worst_rows = worst_rows.max(row_rel_err(&og, &oc, d));
        assert!(
            worst_rows < F16_ROW_TOL,
            "step {step}: decode_rows output differs by {worst_rows}"
        );
    }
    // Pools are byte-identical: encode and calibrate are exact on both devices.
    let mut gp = vec![0u8; hplanes.len()];
    let mut gs = vec![0u8; hstate.len()];
    ctx.copy_dtoh(&mut gp, dplanes.ptr()).unwrap();
    ctx.copy_dtoh(&mut gs, dstate.ptr()).unwrap();
    assert!(gp == hplanes, "plane pools differ between the GPU and the CPU");
    assert!(gs == hstate, "state pools differ between the GPU and the CPU");
    println!(
        "stateless ABI GPU vs CPU: pools identical, worst decode output difference {worst:.2e}, decode_rows {worst_rows:.2e}"
    );
    sikv_kernels_destroy(gk);
    sikv_kernels_destroy(ck);
}

/// The managed hot-path calls never wait for the stream: with the stream held shut by a
/// device-side wait, `sikv_append` and `sikv_attend` (device pointers) return at once and leave
/// their work queued; once the stream is let go, the output equals that of the same calls made
/// on an open stream. A call that waited would not return until a watchdog opens the gate
/// (after 5 s), which the test reports as a failure rather than a hang.
#[test]
fn managed_hot_path_returns_with_the_stream_held() {
    use selfindexkv::ffi::*;
    use selfindexkv::gpu::GpuContext;
    use std::time::{Duration, Instant};
    let test = "managed_hot_path_returns_with_the_stream_held";
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CUDA;
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 1;
    c.num_q_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.max_seqs = 2;
    c.max_batch = 2;
    c.max_seq_len = 4096;
    let cfg = CacheConfig::from_c(&c).unwrap();
    let layout = selfindexkv::Layout::new(&cfg);
    let ctx = match GpuContext::new(&cfg, &layout) {
        Ok(x) => x,
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => return common::skip_no_cuda_device(test),
        Err(e) => panic!("GPU context: {e}"),
    };
    let mut rng = Rng::new(test);
    let mut cache: *mut SikvCache = std::ptr::null_mut();
    assert_eq!(
        sikv_cache_create(&c, &mut cache),
        SikvStatus::SIKV_OK,
        "{}",
        last_error_message()
    );
    let stream = ctx.create_stream().unwrap();
    let (hq, hk, d, n) = (8usize, 2usize, 128usize, 3000usize);
    let upload = |x: &[f32]| {
        let b = to_bytes(Dtype::F16, x);
        let buf = ctx.alloc(b.len()).unwrap();
        ctx.copy_htod_async(buf.ptr(), &b, stream.raw).unwrap();
        buf
    };
    let k = upload(&vals(&mut rng, n * hk * d, d));
    let v = upload(&vals(&mut rng, n * hk * d, d));
    let q = upload(&vals(&mut rng, hq * d, d));
    let k1 = upload(&vals(&mut rng, hk * d, d));
    let v1 = upload(&vals(&mut rng, hk * d, d));
    let out = [ctx.alloc(hq * d * 2).unwrap(), ctx.alloc(hq * d * 2).unwrap()];
    let ok = |s: SikvStatus| assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error_message());
    let ptr = |b: &selfindexkv::gpu::DeviceBuffer| b.ptr() as *mut std::ffi::c_void;
    // Two sequences with the same prompt: one decodes on an open stream, one behind the gate.
    for id in [0i64, 1] {
        ok(sikv_seq_add(cache, id));
        ok(sikv_calibrate(
            cache,
            0,
            id,
            n as u32,
            ptr(&k),
            ptr(&v),
            1,
            ptr(&q),
            stream.raw,
        ));
    }
    let step = |id: i64| {
        ok(sikv_append(
            cache,
            0,
            1,
            &id,
            std::ptr::null(),
            ptr(&k1),
            ptr(&v1),
            stream.raw,
        ));
        ok(sikv_attend(
            cache,
            0,
            1,
            &id,
            ptr(&q),
            ptr(&out[id as usize]),
            stream.raw,
        ));
    };
    step(0);
    ctx.synchronize(stream.raw).unwrap();

    let gate = std::sync::Arc::new(ctx.shut_stream(stream.raw).unwrap());
    let watchdog = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(5));
            gate.open();
        })
    };
    let t0 = Instant::now();
    step(1);
    let took = t0.elapsed();
    let queued = !ctx.stream_done(stream.raw).unwrap();
    gate.open();
    ctx.synchronize(stream.raw).unwrap();
    assert!(
        took < Duration::from_secs(1),
        "append + attend took {took:?} with the stream held: a call waited for the stream"
    );
    assert!(
        queued,
        "the stream had finished before the gate opened: the calls ran synchronously"
    );
    let mut a = vec![0u8; hq * d * 2];
    let mut b = vec![0u8; hq * d * 2];
    ctx.copy_dtoh(&mut a, out[0].ptr()).unwrap();
    ctx.copy_dtoh(&mut b, out[1].ptr()).unwrap();
    assert_eq!(a, b, "the call behind the gate computed another output");
    println!("{test}: append + attend returned in {took:?} with the stream held");
    sikv_cache_destroy(cache);
    drop(watchdog);
}

/// Concurrency (issue #13, part 5, the GPU half): four host threads, each with its own cache
/// and its own stream, run calibrate + 24 decode steps (append + attend) at once; every
/// thread's outputs must equal, bit for bit, the same work run serially on one thread.
#[test]
fn threads_with_own_caches_and_streams_match_serial() {
    use selfindexkv::gpu::GpuContext;
    let test = "threads_with_own_caches_and_streams_match_serial";
    let seed = common::seed(test);
    let cfg = config(SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, 4096);
    let layout = selfindexkv::Layout::new(&cfg);
    match GpuContext::new(&cfg, &layout) {
        Ok(_) => {}
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => return common::skip_no_cuda_device(test),
        Err(e) => panic!("GPU context: {e}"),
    }
    let (threads, steps) = (4usize, 24usize);
    // One worker's whole run: its outputs, step by step. `own_stream`: on a stream of its own
    // (else the legacy default stream).
    let work = |t: usize, own_stream: bool| -> Vec<Vec<u8>> {
        let cfg = cfg.clone();
        let ctx = GpuContext::new(&cfg, &selfindexkv::Layout::new(&cfg)).expect("context");
        let stream = ctx.create_stream().expect("stream");
        let st = if own_stream { stream.raw } else { std::ptr::null_mut() };
        let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9));
        let (hq, hk, d) = (
            cfg.num_q_heads as usize,
            cfg.num_kv_heads as usize,
            cfg.head_dim as usize,
        );
        let dt = cfg.dtype;
        let mut cache = Cache::new(cfg.clone()).expect("cache");
        let ids = [10i64, 11];
        for (i, &id) in ids.iter().enumerate() {
            let n = 900 + 300 * i + 50 * t;
            cache.add_seq(id).unwrap();
            let k = to_bytes(dt, &vals(&mut rng, n * hk * d, d));
            let v = to_bytes(dt, &vals(&mut rng, n * hk * d, d));
            let q = to_bytes(dt, &vals(&mut rng, hq * d, d));
            cache
                .calibrate(
                    0,
                    id,
                    n as u32,
                    Activations::Host(&k),
                    Activations::Host(&v),
                    1,
                    Activations::Host(&q),
                    st,
                )
                .unwrap();
        }
        let mut outs = Vec::new();
        for _ in 0..steps {
            let k = to_bytes(dt, &vals(&mut rng, 2 * hk * d, d));
            let v = to_bytes(dt, &vals(&mut rng, 2 * hk * d, d));
            let q = to_bytes(dt, &vals(&mut rng, 2 * hq * d, d));
            cache
                .append(0, &ids, &[1, 1], Activations::Host(&k), Activations::Host(&v), st)
                .unwrap();
            let mut out = vec![0u8; 2 * hq * d * dt.size()];
            cache
                .attend(0, &ids, Activations::Host(&q), Output::Host(&mut out), st)
                .unwrap();
            outs.push(out);
        }
        ctx.synchronize(st).unwrap();
        outs
    };
    let concurrent: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|t| s.spawn(move || work(t, true))).collect();
        hs.into_iter().map(|h| h.join().expect("worker thread")).collect()
    });
    for (t, got) in concurrent.iter().enumerate() {
        let want = work(t, false);
        assert_eq!(got.len(), want.len());
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "{test}: thread {t} step {step}: concurrent output differs from the serial run"
            );
        }
    }
    // Different threads were given different data: their outputs must differ too.
    assert!(
        concurrent[0][0] != concurrent[1][0],
        "{test}: two threads gave the same output"
    );
    println!("{test}: {threads} threads x {steps} steps with own caches and streams = serial, bit for bit");
}

/// Allocation failure at create (issue #13, part 4): a configuration whose pools exceed the
/// device's memory is refused with SIKV_ERR_OUT_OF_MEMORY and a message, no handle is returned,
/// and a cache of a normal size created right after works (nothing leaked or left poisoned).
#[test]
fn create_beyond_device_memory_is_refused_cleanly() {
    use selfindexkv::ffi::*;
    let test = "create_beyond_device_memory_is_refused_cleanly";
    let small = config(SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, 4096);
    let layout = selfindexkv::Layout::new(&small);
    if let Err(e) = selfindexkv::gpu::GpuContext::new(&small, &layout) {
        if e.status == SikvStatus::SIKV_ERR_NO_DEVICE {
            return common::skip_no_cuda_device(test);
        }
        panic!("GPU context: {e}");
    }
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CUDA;
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 80;
    c.num_q_heads = 64;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.max_seqs = 64;
    c.max_batch = 64;
    c.max_seq_len = 131072;
    c.max_append_tokens = 131072;
    c.num_pages = 0; // every slot full: 80 layers x 8 heads x 8M tokens x 112 B, about 600 GB
    let mut h: *mut SikvCache = std::ptr::null_mut();
    let s = sikv_cache_create(&c, &mut h);
    let msg = last_error_message();
    assert_eq!(s, SikvStatus::SIKV_ERR_OUT_OF_MEMORY, "{test}: {msg}");
    assert!(h.is_null(), "{test}: a handle came back from a failed create");
    assert!(!msg.is_empty(), "{test}: no message");
    // A normal cache right after: created and usable.
    let mut cache = Cache::new(small).expect("a normal cache after the refused one");
    cache.add_seq(1).unwrap();
    println!("{test}: refused with SIKV_ERR_OUT_OF_MEMORY ({msg}); a normal cache works after it");
}
