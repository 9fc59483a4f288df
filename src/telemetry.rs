//! Selection telemetry: how much of the exact attention mass the attended set captures.

/// Exact softmax weights (f64) of one query over keys `[n][d]` (row-major), logits
/// `scale * q . k`.
pub fn exact_weights(q: &[f32], keys: &[f32], head_dim: usize, scale: f32) -> Vec<f64> {
    let n = keys.len() / head_dim;
    let logits: Vec<f64> = (0..n)
        .map(|t| {
            let k = &keys[t * head_dim..(t + 1) * head_dim];
            scale as f64 * q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Oracle-mass recall of an attended set: the exact attention mass on `attended` divided by
/// the mass of the best set of the same size (the oracle top-|attended| by exact weight).
/// 1.0 means the selection is as good as exact top-k selection could be.
pub fn mass_recall(weights: &[f64], attended: &[u32]) -> f64 {
    if attended.is_empty() {
        return 0.0;
    }
    let got: f64 = attended.iter().map(|&t| weights[t as usize]).sum();
    let mut sorted = weights.to_vec();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
    let best: f64 = sorted.iter().take(attended.len()).sum();
    if best > 0.0 {
        (got / best).min(1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_is_one_for_the_oracle_set_and_less_otherwise() {
        let w = [0.5, 0.1, 0.3, 0.1];
        assert!((mass_recall(&w, &[0, 2]) - 1.0).abs() < 1e-12);
        assert!((mass_recall(&w, &[1, 3]) - 0.2 / 0.8).abs() < 1e-12);
        let q = [1.0f32, 0.0];
        let keys = [1.0f32, 0.0, 0.0, 1.0];
        let ew = exact_weights(&q, &keys, 2, 1.0);
        assert!((ew[0] - 1.0f64.exp() / (1.0f64.exp() + 1.0)).abs() < 1e-12);
    }
}
