//! Stage `topk`: deterministic top-k (higher score first, ties to the smaller position).
//!
//! Ranking: numeric order of the scores (so -0.0 ties with +0.0; a radix kernel must
//! canonicalise -0.0 to +0.0 first), NaN below every number (NaNs tie among themselves), ties
//! broken by the smaller position.

use std::cmp::Ordering;

/// `Less` when `(sa, pa)` ranks before (is better than) `(sb, pb)`.
pub fn rank_order(sa: f32, pa: u32, sb: f32, pb: u32) -> Ordering {
    match (sa.is_nan(), sb.is_nan()) {
        (true, true) => pa.cmp(&pb),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => sb.partial_cmp(&sa).unwrap().then(pa.cmp(&pb)),
    }
}

/// Returns the positions of the `k` best `(score, position)` pairs, sorted ascending by
/// position. NaN scores rank below every number. `k` larger than the input returns all.
pub fn topk(scores: &[f32], positions: &[u32], k: usize) -> Vec<u32> {
    assert_eq!(
        scores.len(),
        positions.len(),
        "topk: scores and positions differ in length"
    );
    let n = scores.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let cmp = |a: &usize, b: &usize| rank_order(scores[*a], positions[*a], scores[*b], positions[*b]);
    if k < n {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    let mut out: Vec<u32> = idx[..k].iter().map(|&i| positions[i]).collect();
    out.sort_unstable();
    out
}
