//! A host model of the dense decode on tensor cores (kernels/dense.cu, attend_tc.cuh, the
//! combine of attend.cu) for one (sequence, KV head): the kernels' f16 roundings where the
//! kernels make them (Q', K, P, V), their chunk and warp ranges, per-warp online softmax in log2
//! units, the kept-entry split in f32 and the combine's merge. The f32 arithmetic between the
//! roundings is taken in f64: its error is far below one f16 ulp of the output, and the tensor
//! cores' own f32 accumulation order is not modelled.
//!
//! Why it exists: the decode matrix's 4-bit dense decode missed its fixed tolerance at some
//! seeds (docs/RELIABILITY.md §13-17). Run on the regenerated inputs, the model says whether the
//! GPU's values are what these roundings give (a precision tail) or not (a defect), and which
//! rounding carries the error (`Roundings` switches each off).

use half::f16;
use selfindexkv::config::CacheConfig;
use selfindexkv::cpu::{cand_end, dense_entries, expected_candidates, read_state, PageTable};
use selfindexkv::gpu::geometry::{ATTEND_THREADS, DENSE_CHUNK_ALIGN};
use selfindexkv::layout::{
    Layout, QUANT_GROUP, SIKV_PLANE_KMAG, SIKV_PLANE_KPAR, SIKV_PLANE_SIGN, SIKV_PLANE_VCODE, SIKV_PLANE_VPAR,
};
use selfindexkv::reference::encode::{group_params, mag_code};

use crate::common::HostPools;

/// Warps of a dense chunk's block, each walking a quarter of the chunk.
const WARPS: usize = ATTEND_THREADS as usize / 32;

/// Which of the kernels' f16 roundings the model makes.
#[derive(Clone, Copy, Debug)]
pub struct Roundings {
    pub q: bool,
    pub k: bool,
    pub p: bool,
    pub v: bool,
}

impl Roundings {
    pub const ALL: Roundings = Roundings {
        q: true,
        k: true,
        p: true,
        v: true,
    };
    pub const NONE: Roundings = Roundings {
        q: false,
        k: false,
        p: false,
        v: false,
    };
}

/// The device's grid choices that set the dense decode's ranges (src/gpu/workspace.rs): the
/// grid's candidate chunks per row and the floor on a chunk's positions.
#[derive(Clone, Copy, Debug)]
pub struct DenseGrid {
    pub chunks: usize,
    pub min_chunk: usize,
}

fn f16r(x: f64, on: bool) -> f64 {
    if on {
        f16::from_f64(x).to_f64()
    } else {
        x
    }
}

/// A split's partial: m in natural-log units, l, acc (G x d), as attend.cu writes them.
struct Partial {
    m: Vec<f64>,
    l: Vec<f64>,
    acc: Vec<f64>,
}

/// The modelled output (G x d, before the output's own rounding to the model dtype) of
/// (sequence `b` in slot `slot`, KV head `h`) for its query heads `qs` (G x d).
#[allow(clippy::too_many_arguments)] // one row's inputs, as the kernels take them
pub fn dense_tc_row(
    layout: &Layout,
    cfg: &CacheConfig,
    host: &HostPools,
    table: &PageTable,
    b: usize,
    slot: usize,
    h: usize,
    qs: &[f32],
    grid: DenseGrid,
    r: Roundings,
) -> Vec<f64> {
    let d = cfg.head_dim as usize;
    let g_n = qs.len() / d;
    let n_sink = cfg.n_sink as usize;
    let rec = read_state(layout, cfg.dtype.storage(), &host.state, slot, h);
    let len = table.seq_len(b, layout.page_size);
    let mut parts = Vec::new();

    // The kept entries: attend_body in f32 (no f16 operand), natural-log units.
    {
        let mut p = Partial {
            m: vec![f64::NEG_INFINITY; g_n],
            l: vec![0.0; g_n],
            acc: vec![0.0; g_n * d],
        };
        let kept: Vec<usize> = dense_entries(cfg, &rec.dense_pos, len)
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        for g in 0..g_n {
            let q = &qs[g * d..(g + 1) * d];
            let logits: Vec<f64> = kept
                .iter()
                .map(|&e| {
                    let k = &rec.dense_k[e * d..(e + 1) * d];
                    cfg.softmax_scale as f64 * q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            p.m[g] = m;
            for (i, &e) in kept.iter().enumerate() {
                let w = (logits[i] - m).exp();
                p.l[g] += w;
                for c in 0..d {
                    p.acc[g * d + c] += w * rec.dense_v[e * d + c] as f64;
                }
            }
        }
        parts.push(p);
    }

    // Q' = q a softmax_scale log2(e) in f32, a power of two into [2^13, 2^14), then f16.
    let f = cfg.softmax_scale * std::f32::consts::LOG2_E;
    let qv: Vec<f32> = (0..g_n * d).map(|i| qs[i] * rec.scale[i % d] * f).collect();
    let qm = qv.iter().fold(0f32, |m, x| m.max(x.abs()));
    let e2 = if qm > 0.0 { qm.log2().floor() as i32 - 13 } else { 0 };
    let q_down = 2f64.powi(-e2);
    let s_up = 2f64.powi(e2);
    let qa: Vec<f64> = qv.iter().map(|&v| f16r(v as f64 * q_down, r.q)).collect();

    // The candidates (ascending: no heavy position) and their end, as the kernel sizes chunks.
    let cands = expected_candidates(cfg, &rec.dense_pos, len);
    let end = cand_end(cfg, len);
    let chunk = end
        .div_ceil(grid.chunks)
        .max(grid.min_chunk)
        .div_ceil(DENSE_CHUNK_ALIGN)
        * DENSE_CHUNK_ALIGN;
    let rows = |pos: usize| {
        let (page, s) = table.locate(b, pos, layout.page_size);
        host.rows(layout, page, h, s)
    };
    for c in 0..grid.chunks {
        let clo = c * chunk;
        let lo = clo.max(n_sink);
        let hi = (clo + chunk).min(end);
        if lo >= hi {
            continue;
        }
        // Warps: a quarter of the chunk each, in tiles of 16 aligned positions.
        let quarter = chunk / WARPS;
        let mut wm = vec![vec![f64::NEG_INFINITY; g_n]; WARPS];
        let mut wl = vec![vec![0f64; g_n]; WARPS];
        let mut wacc = vec![vec![0f64; g_n * d]; WARPS];
        for w in 0..WARPS {
            let wlo0 = clo + w * quarter;
            let whi = (wlo0 + quarter).min(hi);
            let vlo = lo.max(wlo0);
            let mut base = lo.max(wlo0) & !15;
            while base < whi {
                let toks: Vec<usize> = (base..base + 16)
                    .filter(|&p| p >= vlo && p < whi && cands.binary_search(&(p as u32)).is_ok())
                    .collect();
                base += 16;
                if toks.is_empty() {
                    // An all-invalid tile leaves the running max where it is.
                    continue;
                }
                // S (log2 units) of each token and head.
                let mut sv = vec![0f64; toks.len() * g_n];
                let mut vals = vec![0f64; toks.len() * d];
                for (ti, &pos) in toks.iter().enumerate() {
                    let rw = rows(pos);
                    let mut k = vec![0f64; d];
                    for (ch, kc) in k.iter_mut().enumerate() {
                        let (delta, zero) = group_params(rw[SIKV_PLANE_KPAR], ch / QUANT_GROUP);
                        let code = mag_code(rw[SIKV_PLANE_KMAG], ch, cfg.key_bits) as f64;
                        let mag = f16r(code * delta as f64 + zero as f64, r.k);
                        let pos_sign = (rw[SIKV_PLANE_SIGN][ch >> 3] >> (ch & 7)) & 1 == 1;
                        *kc = if pos_sign { mag } else { -mag };
                        let (vd, vz) = group_params(rw[SIKV_PLANE_VPAR], ch / QUANT_GROUP);
                        let vcode = mag_code(rw[SIKV_PLANE_VCODE], ch, cfg.value_bits) as f64;
                        vals[ti * d + ch] = f16r(vcode * vd as f64 + vz as f64, r.v);
                    }
                    for g in 0..g_n {
                        let qg = &qa[g * d..(g + 1) * d];
                        let mut s = 0f64;
                        // The key scale a is in Q' (qa), so k is the unscaled magnitude here.
                        for ch in 0..d {
                            s += qg[ch] * k[ch];
                        }
                        sv[ti * g_n + g] = s * s_up;
                    }
                }
                for g in 0..g_n {
                    let mx = (0..toks.len())
                        .map(|ti| sv[ti * g_n + g])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let m_new = wm[w][g].max(mx);
                    let al = (wm[w][g] - m_new).exp2();
                    if wm[w][g] != m_new {
                        wl[w][g] *= al;
                        for x in &mut wacc[w][g * d..(g + 1) * d] {
                            *x *= al;
                        }
                        wm[w][g] = m_new;
                    }
                    for ti in 0..toks.len() {
                        let pw = f16r((sv[ti * g_n + g] - m_new).exp2(), r.p);
                        wl[w][g] += pw;
                        for ch in 0..d {
                            wacc[w][g * d + ch] += pw * vals[ti * d + ch];
                        }
                    }
                }
            }
        }
        // finish: the warps merged at the block's max (log2), m stored in natural-log units.
        let mut p = Partial {
            m: vec![f64::NEG_INFINITY; g_n],
            l: vec![0.0; g_n],
            acc: vec![0.0; g_n * d],
        };
        for g in 0..g_n {
            let mm = (0..WARPS).map(|w| wm[w][g]).fold(f64::NEG_INFINITY, f64::max);
            if mm == f64::NEG_INFINITY {
                continue;
            }
            for w in 0..WARPS {
                if wm[w][g] == f64::NEG_INFINITY {
                    continue;
                }
                let s = (wm[w][g] - mm).exp2();
                p.l[g] += s * wl[w][g];
                for ch in 0..d {
                    p.acc[g * d + ch] += s * wacc[w][g * d + ch];
                }
            }
            p.m[g] = mm * std::f64::consts::LN_2;
        }
        parts.push(p);
    }

    // The combine: the partials merged at the largest m (natural-log units).
    let mut out = vec![0f64; g_n * d];
    for g in 0..g_n {
        let mm = parts.iter().map(|p| p.m[g]).fold(f64::NEG_INFINITY, f64::max);
        let (mut l, mut acc) = (0f64, vec![0f64; d]);
        for p in &parts {
            if p.m[g] == f64::NEG_INFINITY {
                continue;
            }
            let w = (p.m[g] - mm).exp();
            l += w * p.l[g];
            for (a, x) in acc.iter_mut().zip(&p.acc[g * d..(g + 1) * d]) {
                *a += w * x;
            }
        }
        for (o, a) in out[g * d..(g + 1) * d].iter_mut().zip(&acc) {
            *o = if l > 0.0 { a / l } else { 0.0 };
        }
    }
    out
}
