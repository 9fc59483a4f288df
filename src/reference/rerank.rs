//! Stage `rerank`: the second selection stage. The 1-bit scan's best `c*k` candidates are
//! re-scored with the key as stored (`qbar . k'^`, dequantised) and the best `k` kept.

use super::topk::topk;

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
