//! Stage `rerank`: the second selection stage. The 1-bit scan's best `c*k` candidates are
//! re-scored with the key as stored (`qbar . k'^`, dequantised) and the best `k` kept.

use super::encode::{decode_key_into, group_params};
use super::topk::topk;
use crate::config::HalfKind;
use crate::layout::{
    TokenFormat, CENTROIDS, QUANT_GROUP, SIKV_NUM_PLANES, SIKV_PLANE_KMAG, SIKV_PLANE_KPAR, SIKV_PLANE_SIGN, SUBVEC,
};

/// `qbar . key` in f32, summed in channel order: the stage-2 score.
pub fn rerank_score(qbar: &[f32], key: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (q, k) in qbar.iter().zip(key) {
        acc += q * k;
    }
    acc
}

/// `keys[i]` is the reconstructed centred key of `positions[i]`. Returns the best `k`
/// positions by `qbar . keys[i]`, ascending, with the same tie rule as `topk`.
pub fn rerank(qbar: &[f32], positions: &[u32], keys: &[Vec<f32>], k: usize) -> Vec<u32> {
    assert_eq!(
        positions.len(),
        keys.len(),
        "rerank: positions and keys differ in length"
    );
    let scores: Vec<f32> = keys.iter().map(|key| rerank_score(qbar, key)).collect();
    topk(&scores, positions, k)
}

/// The stage-2 score of stored keys for one query row: `qbar . k'^` with `k'^` the key as
/// [`decode_key_into`] reconstructs it (`+-(code * delta + zero) * a_c`).
///
/// For 2-bit keys the sum is regrouped so that a key costs table lookups instead of a decode:
/// with `qa_c = qbar_c * a_c` and, per group of QUANT_GROUP channels,
/// `sum_c +-(code_c delta + zero) qa_c = delta * sum_c +-code_c qa_c + zero * sum_c +-qa_c`,
/// where over a nibble of channels `sum_{c in m} +-qa_c = 2 P[m & signs] - P[m]` and
/// `P[m] = sum_{c in m} qa_c` (16 subset sums per nibble). Equal to the channel-order sum up
/// to f32 rounding; the kernel (score.cu, `rerank_dot2`) performs these operations in this
/// order, so the two agree bit for bit. Other widths are decoded and summed in channel order.
pub struct RerankQuery<'a> {
    format: &'a TokenFormat,
    qbar: &'a [f32],
    scale: &'a [f32],
    /// 2-bit keys: `P[s][m]` per nibble `s` (channels 4s..4s+3), and `P[s][15]` summed over a
    /// group's nibbles.
    subsets: Vec<[f32; CENTROIDS]>,
    group_full: Vec<f32>,
}

impl<'a> RerankQuery<'a> {
    /// `qbar`: the group-mean query; `scale`: the head's per-channel key scale `a_c`.
    pub fn new(format: &'a TokenFormat, qbar: &'a [f32], scale: &'a [f32]) -> RerankQuery<'a> {
        let d = format.head_dim;
        let (mut subsets, mut group_full) = (Vec::new(), Vec::new());
        if format.key_bits == 2 {
            let qa: Vec<f32> = (0..d).map(|c| qbar[c] * scale[c]).collect();
            subsets = (0..d / SUBVEC)
                .map(|s| {
                    std::array::from_fn(|m| {
                        let mut t = 0f32;
                        for i in 0..SUBVEC {
                            if (m >> i) & 1 == 1 {
                                t += qa[SUBVEC * s + i];
                            }
                        }
                        t
                    })
                })
                .collect();
            let per_group = QUANT_GROUP / SUBVEC;
            group_full = (0..d / QUANT_GROUP)
                .map(|g| {
                    let mut t = 0f32;
                    for sub in &subsets[g * per_group..(g + 1) * per_group] {
                        t += sub[CENTROIDS - 1];
                    }
                    t
                })
                .collect();
        }
        RerankQuery {
            format,
            qbar: &qbar[..d],
            scale,
            subsets,
            group_full,
        }
    }

    /// The stage-2 score of the key stored in `rows` (`key`: scratch of head_dim floats for
    /// the widths that are decoded).
    pub fn score(&self, storage: HalfKind, rows: &[&[u8]; SIKV_NUM_PLANES], key: &mut [f32]) -> f32 {
        let format = self.format;
        if format.key_bits != 2 {
            decode_key_into(format, storage, rows, self.scale, key);
            return rerank_score(self.qbar, &key[..format.head_dim]);
        }
        let (sign, kmag, kpar) = (rows[SIKV_PLANE_SIGN], rows[SIKV_PLANE_KMAG], rows[SIKV_PLANE_KPAR]);
        let per_group = QUANT_GROUP / SUBVEC;
        let mut acc = 0f32;
        for (g, full) in self.group_full.iter().enumerate() {
            // Sums over the group's nibbles of P[signs], P[b0 & signs], P[b0], P[b1 & signs],
            // P[b1] (b0, b1: the low and high bits of the nibble's four codes).
            let (mut e, mut a0, mut p0, mut a1, mut p1) = (0f32, 0f32, 0f32, 0f32, 0f32);
            for s in g * per_group..(g + 1) * per_group {
                let t = &self.subsets[s];
                let sn = ((sign[s / 2] >> (4 * (s % 2))) & 0xF) as usize;
                let byte = kmag[s];
                let (mut b0, mut b1) = (0usize, 0usize);
                for i in 0..SUBVEC {
                    b0 |= (((byte >> (2 * i)) & 1) as usize) << i;
                    b1 |= (((byte >> (2 * i + 1)) & 1) as usize) << i;
                }
                e += t[sn];
                a0 += t[b0 & sn];
                p0 += t[b0];
                a1 += t[b1 & sn];
                p1 += t[b1];
            }
            let signed = (e + e) - full;
            let s0 = (a0 + a0) - p0;
            let s1 = (a1 + a1) - p1;
            let coded = s0 + (s1 + s1);
            let (delta, zero) = group_params(kpar, g);
            acc += delta * coded + zero * signed;
        }
        acc
    }
}
