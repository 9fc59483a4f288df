//! Stage `calibrate` (end of prefill, method §10.4): centre, scale, sign-pattern codebook with
//! the empty-cell fallback, query median, and the heavy set.
//!
//! Arithmetic: the mean centre and the codebook sums are accumulated in f64 (token order) and
//! rounded to f32 once; `k' = centred(k, m)` (`k - m` saturated at `±f32::MAX`) and the heavy
//! scores `k'_t . qbar_last` are f32 (channel order). The codebook always uses `!signbit(k')`,
//! whatever the encoder predicate. Keys and queries are expected finite: `cpu::stages`
//! sanitises them as it reads them (NaN -> 0, ±inf -> ± the dtype's largest finite value;
//! docs/DESIGN.md, "Non-finite and out-of-range inputs").

use crate::config::Centre;
use crate::layout::{CENTROIDS, SUBVEC};

use super::encode::centred;
use super::topk::topk;

/// What calibration needs to know about the dense set.
#[derive(Clone, Copy, Debug)]
pub struct CalibrateParams {
    pub centre: Centre,
    pub n_sink: u32,
    pub n_heavy: u32,
    pub n_window: u32,
}

/// The calibrated state of one (sequence, layer, KV head).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadCalibration {
    /// Per-channel centre m (`head_dim`).
    pub centre: Vec<f32>,
    /// Per-channel scale a = max |k' | over the codebook tokens, clamped to >= 1e-6.
    pub scale: Vec<f32>,
    /// 1 / a.
    pub inv_scale: Vec<f32>,
    /// Per-channel lower median of the group-mean prompt queries (0 when fewer than 2 given).
    pub qmed: Vec<f32>,
    /// Centroids `[d/4][16][4]` in centred-key space.
    pub codebook: Vec<f32>,
    /// Heavy positions, ascending: the top-`n_heavy` of `(k_t - m) . qbar_last` over positions
    /// in `[n_sink, n - n_window)` (ties: smaller position first).
    pub heavy: Vec<u32>,
}

/// Smallest scale a channel may get.
pub const MIN_SCALE: f32 = 1e-6;

/// Per-channel lower median (torch.median semantics: the lower of the two middle values).
/// Reorders `values`; returns 0 for an empty slice. Ordering is `f32::total_cmp`.
pub fn lower_median(values: &mut [f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mid = (values.len() - 1) / 2;
    *values.select_nth_unstable_by(mid, f32::total_cmp).1
}

/// The token set the scale and the codebook are fitted over: `[0, n)` minus sinks minus
/// `heavy`, or all tokens when that is empty. Ascending.
pub fn codebook_tokens(n: usize, n_sink: u32, heavy: &[u32]) -> Vec<usize> {
    let mut is_heavy = vec![false; n];
    for &h in heavy {
        if (h as usize) < n {
            is_heavy[h as usize] = true;
        }
    }
    let t: Vec<usize> = (0..n).filter(|&t| t >= n_sink as usize && !is_heavy[t]).collect();
    if t.is_empty() {
        (0..n).collect()
    } else {
        t
    }
}

/// Codebook `[d/4][16][4]` of the centred keys `kp` (`n x d`) over the tokens `set`:
/// conditional means per sign pattern (`!signbit`), with the 1-bit fallback
/// `(2 bit_i(u) - 1) * mean |k'_{4s+i}|` for empty cells.
pub fn fit_codebook(head_dim: usize, kp: &[f32], set: &[usize]) -> Vec<f32> {
    let d = head_dim;
    let nsub = d / SUBVEC;
    let mut sum = vec![0f64; nsub * CENTROIDS * SUBVEC];
    let mut cnt = vec![0u64; nsub * CENTROIDS];
    let mut abs_sum = vec![0f64; d];
    for &t in set {
        let row = &kp[t * d..(t + 1) * d];
        for s in 0..nsub {
            let sv = &row[SUBVEC * s..SUBVEC * (s + 1)];
            let mut u = 0usize;
            for (i, x) in sv.iter().enumerate() {
                if !x.is_sign_negative() {
                    u |= 1 << i;
                }
            }
            cnt[s * CENTROIDS + u] += 1;
            for (i, x) in sv.iter().enumerate() {
                sum[(s * CENTROIDS + u) * SUBVEC + i] += *x as f64;
            }
        }
        for (a, x) in abs_sum.iter_mut().zip(row) {
            *a += x.abs() as f64;
        }
    }
    let nset = set.len().max(1) as f64;
    let mut cb = vec![0f32; nsub * CENTROIDS * SUBVEC];
    for s in 0..nsub {
        for u in 0..CENTROIDS {
            let n = cnt[s * CENTROIDS + u];
            for i in 0..SUBVEC {
                let at = (s * CENTROIDS + u) * SUBVEC + i;
                cb[at] = if n > 0 {
                    (sum[at] / n as f64) as f32
                } else {
                    let mag = abs_sum[SUBVEC * s + i] / nset;
                    (if (u >> i) & 1 == 1 { mag } else { -mag }) as f32
                };
            }
        }
    }
    cb
}

/// Calibrates one KV head. `keys` is `n x d` raw post-RoPE keys of the prompt (chunk) in
/// position order; `qbar` is `nq x d` group-mean queries of the last `nq >= 1` prompt tokens
/// (the last row is the last prompt token's). Codebook and scale are fitted over the tokens
/// that are neither sinks nor heavy (`[0, n)` minus sinks minus heavy; when that is empty,
/// over all tokens).
pub fn calibrate_head(p: &CalibrateParams, head_dim: usize, keys: &[f32], qbar: &[f32]) -> HeadCalibration {
    let d = head_dim;
    assert!(
        d > 0 && d % SUBVEC == 0,
        "calibrate_head: head_dim must be a multiple of 4"
    );
    assert!(keys.len() % d == 0, "calibrate_head: keys is not n x d");
    assert!(qbar.len() % d == 0, "calibrate_head: qbar is not nq x d");
    let n = keys.len() / d;
    let nq = qbar.len() / d;

    // Centre.
    let centre: Vec<f32> = match p.centre {
        Centre::Median => {
            let mut col = vec![0f32; n];
            (0..d)
                .map(|c| {
                    for t in 0..n {
                        col[t] = keys[t * d + c];
                    }
                    lower_median(&mut col)
                })
                .collect()
        }
        Centre::Mean => (0..d)
            .map(|c| {
                if n == 0 {
                    0.0
                } else {
                    ((0..n).map(|t| keys[t * d + c] as f64).sum::<f64>() / n as f64) as f32
                }
            })
            .collect(),
    };
    let kp: Vec<f32> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| centred(k, centre[i % d]))
        .collect();

    // Heavy set.
    let lo = p.n_sink as usize;
    let hi = n.saturating_sub(p.n_window as usize);
    let heavy = if hi > lo && p.n_heavy > 0 && nq > 0 {
        let ql = &qbar[(nq - 1) * d..nq * d];
        let positions: Vec<u32> = (lo as u32..hi as u32).collect();
        let scores: Vec<f32> = (lo..hi)
            .map(|t| {
                let mut s = 0f32;
                for c in 0..d {
                    s += kp[t * d + c] * ql[c];
                }
                s
            })
            .collect();
        topk(&scores, &positions, p.n_heavy as usize)
    } else {
        Vec::new()
    };

    // Scale and codebook over T.
    let set = codebook_tokens(n, p.n_sink, &heavy);
    let mut scale = vec![0f32; d];
    for &t in &set {
        for c in 0..d {
            scale[c] = scale[c].max(kp[t * d + c].abs());
        }
    }
    for a in scale.iter_mut() {
        // NaN-safe: max() ignores NaN, leaving MIN_SCALE.
        *a = a.max(MIN_SCALE);
    }
    let inv_scale: Vec<f32> = scale.iter().map(|a| 1.0 / a).collect();
    let codebook = fit_codebook(d, &kp, &set);

    // Query median.
    let qmed = if nq >= 2 {
        let mut col = vec![0f32; nq];
        (0..d)
            .map(|c| {
                for j in 0..nq {
                    col[j] = qbar[j * d + c];
                }
                lower_median(&mut col)
            })
            .collect()
    } else {
        vec![0f32; d]
    };

    HeadCalibration {
        centre,
        scale,
        inv_scale,
        qmed,
        codebook,
        heavy,
    }
}
