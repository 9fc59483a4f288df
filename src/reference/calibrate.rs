//! Stage `calibrate` (end of prefill, method §10.4): centre, scale, sign-pattern codebook with
//! the empty-cell fallback, query median, and the heavy set.

use crate::config::Centre;

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

/// Per-channel lower median (torch.median semantics: the lower of the two middle values).
pub fn lower_median(values: &mut [f32]) -> f32 {
    unimplemented!()
}

/// Calibrates one KV head. `keys` is `n x d` raw post-RoPE keys of the prompt (chunk) in
/// position order; `qbar` is `nq x d` group-mean queries of the last `nq >= 1` prompt tokens
/// (the last row is the last prompt token's). Codebook and scale are fitted over the tokens
/// that are neither sinks nor heavy (`[0, n)` minus sinks minus heavy; when that is empty,
/// over all tokens).
pub fn calibrate_head(p: &CalibrateParams, head_dim: usize, keys: &[f32], qbar: &[f32]) -> HeadCalibration {
    unimplemented!()
}
