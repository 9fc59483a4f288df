//! Stage `score`: group-mean query, the centroid LUT, and the estimated score of a token from
//! its sign row alone (method §10.5 steps 2-4); also the sign x sign ablation.
//!
//! Arithmetic order (f32 throughout): the group mean sums the G rows in order and divides by G;
//! a LUT entry sums its 4 products in channel order; a score sums the d/4 entries in
//! sub-vector order.

use crate::layout::{CENTROIDS, SUBVEC};

use super::encode::sub_code;

/// qbar = (1/G) sum_g q_g over the `G x d` queries of one KV group.
pub fn group_mean_query(q: &[f32], head_dim: usize) -> Vec<f32> {
    assert!(
        head_dim > 0 && q.len() % head_dim == 0 && !q.is_empty(),
        "group_mean_query: q is not G x d"
    );
    let g = q.len() / head_dim;
    let mut out = vec![0f32; head_dim];
    for row in q.chunks(head_dim) {
        for (o, x) in out.iter_mut().zip(row) {
            *o += *x;
        }
    }
    for o in out.iter_mut() {
        *o /= g as f32;
    }
    out
}

/// LUT `[d/4][16]`: T[s][u] = sum_i C[s][u][i] * qbar[4s+i].
pub fn build_lut(codebook: &[f32], qbar: &[f32]) -> Vec<f32> {
    let nsub = qbar.len() / SUBVEC;
    assert!(
        codebook.len() >= nsub * CENTROIDS * SUBVEC,
        "build_lut: codebook is too short"
    );
    let mut lut = vec![0f32; nsub * CENTROIDS];
    for s in 0..nsub {
        let q = &qbar[SUBVEC * s..SUBVEC * s + SUBVEC];
        for u in 0..CENTROIDS {
            let c = &codebook[(s * CENTROIDS + u) * SUBVEC..(s * CENTROIDS + u + 1) * SUBVEC];
            let mut t = 0f32;
            for i in 0..SUBVEC {
                t += c[i] * q[i];
            }
            lut[s * CENTROIDS + u] = t;
        }
    }
    lut
}

/// Estimated score: sum over sub-vectors of T[s][code_s(t)].
pub fn lut_score(lut: &[f32], sign_row: &[u8]) -> f32 {
    let nsub = lut.len() / CENTROIDS;
    let mut acc = 0f32;
    for s in 0..nsub {
        acc += lut[s * CENTROIDS + sub_code(sign_row, s)];
    }
    acc
}

/// sum_c sgn(k'_c) * sgn(qbar_c - qmed_c), with sgn from the sign bit (+1/-1) for the key and
/// sgn(0) = 0 for the query side.
pub fn sign_sign_score(sign_row: &[u8], qbar: &[f32], qmed: &[f32]) -> f32 {
    let mut acc = 0i32;
    for (c, (&q, &m)) in qbar.iter().zip(qmed).enumerate() {
        let diff = q - m;
        let sq = if diff > 0.0 {
            1
        } else if diff < 0.0 {
            -1
        } else {
            0
        };
        let sk = if (sign_row[c >> 3] >> (c & 7)) & 1 == 1 { 1 } else { -1 };
        acc += sq * sk;
    }
    acc as f32
}
