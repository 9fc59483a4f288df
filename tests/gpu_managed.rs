//! The managed cache end to end on a CUDA device against the CPU backend: a ragged batch (one
//! sequence longer than 100K tokens, lengths not multiples of the page size), prefill +
//! calibrate, then decode steps of append + attend at every layer, fork and remove. Without a
//! CUDA device it prints one counted `skipped` line.

use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::{numeric, CacheConfig, SikvStatus};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1) plus a per-channel offset, never all zeros.
    fn vec(&mut self, n: usize, d: usize) -> Vec<f32> {
        (0..n).map(|i| ((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) + 0.05 * ((i % d) as f32 / d as f32)).collect()
    }
}

fn quick() -> bool {
    std::env::var("SIKV_GPU_TEST_QUICK").map(|v| v == "1").unwrap_or(false)
}

fn config(device: u32, dtype: u32, max_seq_len: u32) -> CacheConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
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
    CacheConfig::from_c(&c).unwrap()
}

fn to_bytes(dt: Dtype, x: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; x.len() * dt.size()];
    numeric::from_f32(dt, x, &mut b);
    b
}

#[test]
fn managed_cache_on_gpu_matches_cpu_backend() {
    let (lens, steps): (Vec<u32>, u32) = if quick() { (vec![300, 1000, 4097], 8) } else { (vec![1000, 3333, 100_003], 256) };
    let max_len = lens.iter().max().unwrap() + steps + 8;
    let gpu_cfg = config(SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, max_len);
    let mut gpu = match Cache::new(gpu_cfg.clone()) {
        Ok(c) => c,
        Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => {
            println!("gpu tests skipped: no CUDA device (1 test: managed cache end to end)");
            return;
        }
        Err(e) => panic!("GPU cache: {e}"),
    };
    assert!(gpu.stats().on_gpu);
    let mut cpu = Cache::new(config(SIKV_DEVICE_CPU, SIKV_DTYPE_F16, max_len)).unwrap();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("managed GPU vs CPU: seed {seed}, lengths {lens:?}, {steps} decode steps");
    let mut rng = Rng(seed);
    let cfg = &gpu_cfg;
    let (hq, hk, d, dt) = (cfg.num_q_heads as usize, cfg.num_kv_heads as usize, cfg.head_dim as usize, cfg.dtype);
    let ids: Vec<i64> = (0..lens.len() as i64).map(|i| 100 + i).collect();
    let null = std::ptr::null_mut();
    for (&id, &n) in ids.iter().zip(&lens) {
        gpu.add_seq(id).unwrap();
        cpu.add_seq(id).unwrap();
        for layer in 0..cfg.num_layers {
            let k = to_bytes(dt, &rng.vec(n as usize * hk * d, d));
            let v = to_bytes(dt, &rng.vec(n as usize * hk * d, d));
            let q = to_bytes(dt, &rng.vec(2 * hq * d, d));
            for c in [&mut gpu, &mut cpu] {
                c.calibrate(layer, id, n, Activations::Host(&k), Activations::Host(&v), 2, Activations::Host(&q), null)
                    .unwrap_or_else(|e| panic!("calibrate seq {id} layer {layer}: {e}"));
            }
        }
    }
    let b = ids.len();
    let counts = vec![1u32; b];
    let (mut worst, mut sel_mismatch, mut compared) = (0f32, 0usize, 0usize);
    for step in 0..steps {
        for layer in 0..cfg.num_layers {
            let k = to_bytes(dt, &rng.vec(b * hk * d, d));
            let v = to_bytes(dt, &rng.vec(b * hk * d, d));
            let q = to_bytes(dt, &rng.vec(b * hq * d, d));
            let mut outs = [vec![0xFFu8; b * hq * d * 2], vec![0u8; b * hq * d * 2]];
            for (c, out) in [&mut gpu, &mut cpu].into_iter().zip(outs.iter_mut()) {
                c.append(layer, &ids, &counts, Activations::Host(&k), Activations::Host(&v), null).unwrap();
                c.attend(layer, &ids, Activations::Host(&q), Output::Host(out), null).unwrap();
            }
            let (mut og, mut oc) = (vec![0f32; b * hq * d], vec![0f32; b * hq * d]);
            numeric::to_f32(dt, &outs[0], &mut og);
            numeric::to_f32(dt, &outs[1], &mut oc);
            let scale = oc.iter().fold(1f32, |m, x| m.max(x.abs()));
            for (g, c) in og.iter().zip(&oc) {
                assert!(g.is_finite(), "step {step} layer {layer}: non-finite GPU output");
                worst = worst.max((g - c).abs() / scale);
            }
            if step % 32 == 0 {
                // Selections agree except for positions whose scores tie within rounding.
                let rows = b * hk;
                let kmax = cfg.budget.max as usize;
                let (mut ig, mut cg) = (vec![0i32; rows * kmax], vec![0i32; rows]);
                let (mut ic, mut cc) = (vec![0i32; rows * kmax], vec![0i32; rows]);
                gpu.select(layer, &ids, Activations::Host(&q), &mut ig, &mut cg, null).unwrap();
                cpu.select(layer, &ids, Activations::Host(&q), &mut ic, &mut cc, null).unwrap();
                assert_eq!(cg, cc, "step {step} layer {layer}: selection counts differ");
                for r in 0..rows {
                    let a: std::collections::BTreeSet<i32> = ig[r * kmax..r * kmax + cg[r] as usize].iter().copied().collect();
                    let c: std::collections::BTreeSet<i32> = ic[r * kmax..r * kmax + cc[r] as usize].iter().copied().collect();
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
    let q = to_bytes(dt, &rng.vec(hq * d, d));
    let mut outs = [vec![0xFFu8; hq * d * 2], vec![0u8; hq * d * 2]];
    for (c, out) in [&mut gpu, &mut cpu].into_iter().zip(outs.iter_mut()) {
        c.attend(0, &[999], Activations::Host(&q), Output::Host(out), null).unwrap();
    }
    let (mut og, mut oc) = (vec![0f32; hq * d], vec![0f32; hq * d]);
    numeric::to_f32(dt, &outs[0], &mut og);
    numeric::to_f32(dt, &outs[1], &mut oc);
    let scale = oc.iter().fold(1f32, |m, x| m.max(x.abs()));
    let fork_err = og.iter().zip(&oc).fold(0f32, |m, (g, c)| m.max((g - c).abs() / scale));
    println!(
        "managed GPU vs CPU: worst output error {worst:.2e} (relative to max |out|), fork {fork_err:.2e}, selection differences {sel_mismatch} of {compared}"
    );
    // fp16 outputs; a boundary tie can swap one low-weight token of ~2K.
    assert!(worst < 1e-2, "GPU output differs from the CPU backend by {worst}");
    assert!(fork_err < 1e-2, "forked sequence differs by {fork_err}");
    assert!(sel_mismatch * 1000 <= compared, "{sel_mismatch} of {compared} selected positions differ");
}
