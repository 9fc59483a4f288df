//! Demo: a decode workload on synthetic long-context data with realistic structure (a few
//! dominant tokens, outlier channels, RoPE rotation), through the managed cache on the
//! embedded default device (the GPU when one is usable, else the CPU). Prints bytes per token
//! against fp16, the recall of the oracle top-k attention mass, the largest attention-output
//! error against exact dense attention, and the time per decode step.
//!
//! Usage: sikv_demo [--context N] [--steps T] [--batch B] [--profile 4+1 (default)|2+1|16+1|parity] [--cpu]
//!                  [--budget-ratio R] [--budget-max K]

use std::time::Instant;

use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::{numeric, telemetry, CacheConfig};

struct Args {
    context: u32,
    steps: u32,
    batch: u32,
    profile: u32,
    cpu: bool,
    ratio: Option<f32>,
    kmax: Option<u32>,
}

fn parse_args() -> Args {
    let mut a = Args {
        context: 8192,
        steps: 16,
        batch: 2,
        // The default profile: 4+1 decodes at the exact top-k's perplexity (docs/QUALITY.md).
        profile: SIKV_PROFILE_4_1,
        cpu: false,
        ratio: None,
        kmax: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--context" => a.context = val().parse().expect("--context N"),
            "--steps" => a.steps = val().parse().expect("--steps T"),
            "--batch" => a.batch = val().parse().expect("--batch B"),
            "--budget-ratio" => a.ratio = Some(val().parse().expect("--budget-ratio R")),
            "--budget-max" => a.kmax = Some(val().parse().expect("--budget-max K")),
            "--profile" => {
                a.profile = match val().as_str() {
                    "2+1" => SIKV_PROFILE_2_1,
                    "4+1" => SIKV_PROFILE_4_1,
                    "16+1" => SIKV_PROFILE_16_1,
                    "parity" => SIKV_PROFILE_PARITY,
                    p => panic!("unknown profile {p}"),
                }
            }
            "--cpu" => {
                a.cpu = true;
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// splitmix64 + Box-Muller: reproducible Gaussian noise.
struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        ((-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos()) as f32
    }
}

/// Applies RoPE at position `pos` to one head vector (pairs (i, i + d/2), theta 10000).
fn rope(x: &mut [f32], pos: u32) {
    let d = x.len();
    for i in 0..d / 2 {
        let f = (pos as f64) * 10000f64.powf(-2.0 * i as f64 / d as f64);
        let (s, c) = f.sin_cos();
        let (a, b) = (x[i] as f64, x[i + d / 2] as f64);
        x[i] = (a * c - b * s) as f32;
        x[i + d / 2] = (a * s + b * c) as f32;
    }
}

/// The synthetic model of one (sequence, layer, KV head): a mean with outlier channels, a
/// hidden query direction, and a few dominant tokens aligned with it.
struct HeadModel {
    mean: Vec<f32>,
    dir: Vec<f32>,
    dominant: Vec<u32>,
    vmean: Vec<f32>,
}

impl HeadModel {
    fn new(rng: &mut Rng, d: usize, context: u32) -> HeadModel {
        let mut mean: Vec<f32> = (0..d).map(|_| 0.3 * rng.normal()).collect();
        for _ in 0..4 {
            let c = (rng.u64() % d as u64) as usize;
            mean[c] = if rng.u64() & 1 == 0 { 6.0 } else { -6.0 };
        }
        let mut dir: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        let n = dir.iter().map(|x| x * x).sum::<f32>().sqrt();
        dir.iter_mut().for_each(|x| *x /= n);
        let dominant = (0..16).map(|_| (rng.u64() % context as u64) as u32).collect();
        let vmean = (0..d).map(|_| rng.normal()).collect();
        HeadModel {
            mean,
            dir,
            dominant,
            vmean,
        }
    }
    /// Values share a per-head mean (as real value vectors do) plus token-specific noise.
    fn value(&self, rng: &mut Rng) -> Vec<f32> {
        self.vmean.iter().map(|m| m + 0.7 * rng.normal()).collect()
    }
    fn key(&self, rng: &mut Rng, pos: u32) -> Vec<f32> {
        // Alignment with the query direction: Gaussian for ordinary tokens (a smooth tail of
        // relevance), large for the few dominant ones.
        let align = if self.dominant.contains(&pos) {
            12.0
        } else {
            1.5 * rng.normal()
        };
        let mut k: Vec<f32> = (0..self.mean.len())
            .map(|c| self.mean[c] + rng.normal() + align * self.dir[c])
            .collect();
        rope(&mut k, pos);
        k
    }
    fn query(&self, rng: &mut Rng, pos: u32) -> Vec<f32> {
        let mut q: Vec<f32> = self.dir.iter().map(|x| 8.0 * x + 0.15 * rng.normal()).collect();
        rope(&mut q, pos);
        q
    }
}

fn main() {
    let args = parse_args();
    let mut c = SikvConfig::for_profile(args.profile).expect("profile");
    c.device = if args.cpu { SIKV_DEVICE_CPU } else { SIKV_DEVICE_AUTO };
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 2;
    c.num_q_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.max_seqs = args.batch;
    c.max_batch = args.batch;
    c.max_seq_len = args.context + args.steps;
    c.max_append_tokens = args.context.max(args.batch);
    // The demo shows the sparse path against dense attention; the default crossover would run
    // calls of up to 8192 tokens in all (e.g. --batch 1 --context 8192) dense.
    c.dense_crossover = 0;
    if let Some(r) = args.ratio {
        c.budget_ratio = r;
    }
    if let Some(k) = args.kmax {
        c.budget_max = k;
        c.budget_min = c.budget_min.min(k);
    }
    let cfg = CacheConfig::from_c(&c).expect("config");
    let (l_n, hq, hk, d) = (
        cfg.num_layers,
        cfg.num_q_heads as usize,
        cfg.num_kv_heads as usize,
        cfg.head_dim as usize,
    );
    let g = hq / hk;
    let mut cache = Cache::new(cfg.clone()).unwrap_or_else(|e| panic!("cache: {e}"));
    let on_gpu = cache.stats().on_gpu;
    println!(
        "selfindexkv demo: device {}, profile {}+1 (key {} bits, value {} bits), selection {}, budget {} of the candidates in [{}, {}], {} layers, {} q / {} kv heads, head_dim {}, batch {}, context {}, {} decode steps",
        if on_gpu { "CUDA" } else { "CPU" },
        cfg.key_bits,
        cfg.key_bits,
        cfg.value_bits,
        if cfg.two_stage() { format!("two-stage (1-bit scan keeps {}k, re-rank)", cfg.rerank_factor) } else { "one-stage (1-bit scan)".into() },
        cfg.budget.ratio,
        cfg.budget.min,
        cfg.budget.max,
        l_n,
        hq,
        hk,
        d,
        args.batch,
        args.context,
        args.steps
    );
    if on_gpu {
        println!("note: the demo feeds host data; on a GPU use the GPU benchmark for timings");
    }

    let mut rng = Rng(0x5eed_0000_0000_0001);
    let seqs: Vec<i64> = (0..args.batch as i64).collect();
    // Exact (uncompressed) keys and values per [seq][layer][head]: the oracle.
    let mut models = Vec::new();
    let mut keys: Vec<Vec<Vec<Vec<f32>>>> = Vec::new();
    let mut vals: Vec<Vec<Vec<Vec<f32>>>> = Vec::new();
    let dt = cfg.dtype;
    let to_bytes = |x: &[f32]| {
        let mut b = vec![0u8; x.len() * dt.size()];
        numeric::from_f32(dt, x, &mut b);
        b
    };
    let rounded = |x: Vec<f32>| -> Vec<f32> { x.iter().map(|v| numeric::round_half(HalfKind::F16, *v)).collect() };
    let prefill = Instant::now();
    for &s in &seqs {
        cache.add_seq(s).unwrap();
        let mut ms = Vec::new();
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for layer in 0..l_n {
            let heads: Vec<HeadModel> = (0..hk).map(|_| HeadModel::new(&mut rng, d, args.context)).collect();
            let n = args.context as usize;
            let mut kb = vec![0f32; n * hk * d];
            let mut vb = vec![0f32; n * hk * d];
            let (mut kh, mut vh) = (vec![Vec::new(); hk], vec![Vec::new(); hk]);
            for t in 0..n {
                for (h, m) in heads.iter().enumerate() {
                    let k = rounded(m.key(&mut rng, t as u32));
                    let v = rounded(m.value(&mut rng));
                    kb[(t * hk + h) * d..(t * hk + h + 1) * d].copy_from_slice(&k);
                    vb[(t * hk + h) * d..(t * hk + h + 1) * d].copy_from_slice(&v);
                    kh[h].extend(k);
                    vh[h].extend(v);
                }
            }
            let mut qb = vec![0f32; hq * d];
            for (h, m) in heads.iter().enumerate() {
                for i in 0..g {
                    qb[(h * g + i) * d..(h * g + i + 1) * d].copy_from_slice(&m.query(&mut rng, args.context - 1));
                }
            }
            let (kbytes, vbytes, qbytes) = (to_bytes(&kb), to_bytes(&vb), to_bytes(&qb));
            cache
                .calibrate(
                    layer,
                    s,
                    n as u32,
                    Activations::Host(&kbytes),
                    Activations::Host(&vbytes),
                    1,
                    Activations::Host(&qbytes),
                    std::ptr::null_mut(),
                )
                .unwrap_or_else(|e| panic!("calibrate: {e}"));
            ms.push(heads);
            ks.push(kh);
            vs.push(vh);
        }
        models.push(ms);
        keys.push(ks);
        vals.push(vs);
    }
    println!("prefill + calibration: {:.2} s", prefill.elapsed().as_secs_f64());

    let b = args.batch as usize;
    let mut step_times = Vec::new();
    let (mut recall_sum, mut recall_n, mut recall_min) = (0.0f64, 0usize, f64::INFINITY);
    let (mut max_err, mut max_ref, mut worst_rel) = (0.0f64, 0.0f64, 0.0f64);
    for step in 0..args.steps {
        let pos = args.context + step;
        // New token per sequence and layer, and the query of this step.
        let mut new_k = vec![vec![0f32; b * hk * d]; l_n as usize];
        let mut new_v = vec![vec![0f32; b * hk * d]; l_n as usize];
        let mut q = vec![vec![0f32; b * hq * d]; l_n as usize];
        for (si, _) in seqs.iter().enumerate() {
            for layer in 0..l_n as usize {
                for h in 0..hk {
                    let m = &models[si][layer][h];
                    let k = rounded(m.key(&mut rng, pos));
                    let v = rounded(m.value(&mut rng));
                    new_k[layer][(si * hk + h) * d..(si * hk + h + 1) * d].copy_from_slice(&k);
                    new_v[layer][(si * hk + h) * d..(si * hk + h + 1) * d].copy_from_slice(&v);
                    keys[si][layer][h].extend(k);
                    vals[si][layer][h].extend(v);
                    for i in 0..g {
                        let qq = rounded(m.query(&mut rng, pos));
                        q[layer][(si * hq + h * g + i) * d..(si * hq + h * g + i + 1) * d].copy_from_slice(&qq);
                    }
                }
            }
        }
        let counts = vec![1u32; b];
        let mut outs = vec![vec![0u8; b * hq * d * dt.size()]; l_n as usize];
        let inputs: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = (0..l_n as usize)
            .map(|l| (to_bytes(&new_k[l]), to_bytes(&new_v[l]), to_bytes(&q[l])))
            .collect();
        let t0 = Instant::now();
        for layer in 0..l_n {
            let (kb, vb, qb) = &inputs[layer as usize];
            cache
                .append(
                    layer,
                    &seqs,
                    &counts,
                    Activations::Host(kb),
                    Activations::Host(vb),
                    std::ptr::null_mut(),
                )
                .unwrap();
            cache
                .attend(
                    layer,
                    &seqs,
                    Activations::Host(qb),
                    Output::Host(&mut outs[layer as usize]),
                    std::ptr::null_mut(),
                )
                .unwrap();
        }
        step_times.push(t0.elapsed().as_secs_f64());

        // Quality against the exact dense attention of this step.
        for (si, &s) in seqs.iter().enumerate() {
            for layer in 0..l_n as usize {
                let mut out = vec![0f32; b * hq * d];
                numeric::to_f32(dt, &outs[layer], &mut out);
                let qs = &q[layer][si * hq * d..(si + 1) * hq * d];
                let mut kflat = vec![0f32; (pos as usize + 1) * hk * d];
                for h in 0..hk {
                    for t in 0..=pos as usize {
                        kflat[(t * hk + h) * d..(t * hk + h + 1) * d]
                            .copy_from_slice(&keys[si][layer][h][t * d..(t + 1) * d]);
                    }
                }
                let rec = selfindexkv::cache::telemetry_recall(&mut cache, layer as u32, s, qs, &kflat).unwrap();
                for r in rec {
                    recall_sum += r as f64;
                    recall_n += 1;
                    recall_min = recall_min.min(r as f64);
                }
                for h in 0..hk {
                    for i in 0..g {
                        let qh = &qs[(h * g + i) * d..(h * g + i + 1) * d];
                        let w = telemetry::exact_weights(qh, &keys[si][layer][h], d, cfg.softmax_scale);
                        let (mut e2, mut r2) = (0.0f64, 0.0f64);
                        for c in 0..d {
                            let r: f64 = w
                                .iter()
                                .enumerate()
                                .map(|(t, wt)| wt * vals[si][layer][h][t * d + c] as f64)
                                .sum();
                            let o = out[(si * hq + h * g + i) * d + c] as f64;
                            max_err = max_err.max((o - r).abs());
                            max_ref = max_ref.max(r.abs());
                            e2 += (o - r) * (o - r);
                            r2 += r * r;
                        }
                        worst_rel = worst_rel.max((e2 / r2.max(1e-300)).sqrt());
                    }
                }
            }
        }
    }
    step_times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = step_times[step_times.len() / 2];
    let bpt = cache.layout.bytes_per_token();
    println!(
        "bytes per token per KV head : {bpt} (fp16 K+V: {}; {:.2}x smaller)",
        4 * d,
        (4 * d) as f64 / bpt as f64
    );
    println!(
        "oracle attention-mass recall: mean {:.4}, min {:.4} (over {recall_n} head-steps)",
        recall_sum / recall_n as f64,
        recall_min
    );
    println!(
        "largest output error vs dense: {:.5} max abs (largest |dense output| {:.3}); worst relative L2 {:.4}",
        max_err, max_ref, worst_rel
    );
    println!(
        "time per decode step        : {:.3} ms median ({} layers x batch {}, append + attend, {})",
        median * 1e3,
        l_n,
        b,
        if on_gpu { "CUDA" } else { "CPU reference" }
    );
}
