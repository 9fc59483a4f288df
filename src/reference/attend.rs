//! Stage `attend` (+ `combine`): attention of the G query heads of one KV group over a token
//! set, split into chunks of `ATTEND_SPLIT` tokens with an online softmax per split and a
//! log-sum-exp merge of the splits (method §10.5 steps 6-7); and a float64 dense oracle.

/// Running softmax state of one split for one query head.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxState {
    /// Running max of the logits (-inf when empty).
    pub m: f32,
    /// Sum of exp(logit - m).
    pub l: f32,
    /// Un-normalised sum of exp(logit - m) * v.
    pub acc: Vec<f32>,
}

impl SoftmaxState {
    pub fn new(head_dim: usize) -> Self {
        unimplemented!()
    }
    /// Adds one token with the given logit and value.
    pub fn push(&mut self, logit: f32, v: &[f32]) {
        unimplemented!()
    }
    /// Merges another state into this one.
    pub fn merge(&mut self, other: &SoftmaxState) {
        unimplemented!()
    }
    /// acc / l (zeros when empty).
    pub fn output(&self) -> Vec<f32> {
        unimplemented!()
    }
}

/// Attention of `G` query heads (`q`: `G x d`) over tokens with centred keys `keys[t]` and
/// values `values[t]`; logits are `scale * q_g . keys[t]`. Work is split into chunks of
/// ATTEND_SPLIT tokens in the given order and merged. Returns `G x d`.
pub fn attend_group(q: &[f32], head_dim: usize, scale: f32, keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
    unimplemented!()
}

/// The float64 dense softmax oracle, same arguments.
pub fn dense_attention_f64(q: &[f32], head_dim: usize, scale: f32, keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
    unimplemented!()
}
