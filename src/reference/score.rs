//! Stage `score`: group-mean query, the centroid LUT, and the estimated score of a token from
//! its sign row alone (method §10.5 steps 2-4); also the sign x sign ablation.

/// qbar = (1/G) sum_g q_g over the `G x d` queries of one KV group.
pub fn group_mean_query(q: &[f32], head_dim: usize) -> Vec<f32> {
    unimplemented!()
}

/// LUT `[d/4][16]`: T[s][u] = sum_i C[s][u][i] * qbar[4s+i].
pub fn build_lut(codebook: &[f32], qbar: &[f32]) -> Vec<f32> {
    unimplemented!()
}

/// Estimated score: sum over sub-vectors of T[s][code_s(t)].
pub fn lut_score(lut: &[f32], sign_row: &[u8]) -> f32 {
    unimplemented!()
}

/// sum_c sgn(k'_c) * sgn(qbar_c - qmed_c), with sgn from the sign bit (+1/-1) for the key and
/// sgn(0) = 0 for the query side.
pub fn sign_sign_score(sign_row: &[u8], qbar: &[f32], qmed: &[f32]) -> f32 {
    unimplemented!()
}
