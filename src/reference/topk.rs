//! Stage `topk`: deterministic top-k (higher score first, ties to the smaller position).

/// Returns the positions of the `k` best `(score, position)` pairs, sorted ascending by
/// position. NaN scores rank below every number. `k` larger than the input returns all.
pub fn topk(scores: &[f32], positions: &[u32], k: usize) -> Vec<u32> {
    unimplemented!()
}
