//! Stage `rerank`: the second selection stage. The 1-bit scan's best `c*k` candidates are
//! re-scored with the key as stored (`qbar . k'^`, dequantised) and the best `k` kept.

/// `keys[i]` is the reconstructed centred key of `positions[i]`. Returns the best `k`
/// positions by `qbar . keys[i]`, ascending, with the same tie rule as `topk`.
pub fn rerank(qbar: &[f32], positions: &[u32], keys: &[Vec<f32>], k: usize) -> Vec<u32> {
    unimplemented!()
}
