//! Stage `attend` (+ `combine`): attention of the G query heads of one KV group over a token
//! set, split into chunks of `ATTEND_SPLIT` tokens with an online softmax per split and a
//! log-sum-exp merge of the splits (method §10.5 steps 6-7); and a float64 dense oracle.
//!
//! Arithmetic: logit = scale * (q_g . k) with the dot product summed in f32 in channel order;
//! per split an online softmax ([`SoftmaxState::push`]); the splits of one head are merged in
//! one pass ([`merge_splits`]): M = max m_j, w_j = exp(m_j - M), l = sum w_j l_j,
//! acc = sum w_j acc_j, out = acc / l. An empty token set gives zeros.

use crate::layout::ATTEND_SPLIT;

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
        SoftmaxState {
            m: f32::NEG_INFINITY,
            l: 0.0,
            acc: vec![0.0; head_dim],
        }
    }
    /// Adds one token with the given logit and value. A logit of -inf contributes nothing.
    pub fn push(&mut self, logit: f32, v: &[f32]) {
        if logit == f32::NEG_INFINITY {
            return;
        }
        if logit > self.m {
            // Rescale what is there (alpha = 0 when empty).
            let alpha = if self.m == f32::NEG_INFINITY {
                0.0
            } else {
                (self.m - logit).exp()
            };
            self.l = self.l * alpha + 1.0;
            for (a, x) in self.acc.iter_mut().zip(v) {
                *a = *a * alpha + *x;
            }
            self.m = logit;
        } else {
            let p = (logit - self.m).exp();
            self.l += p;
            for (a, x) in self.acc.iter_mut().zip(v) {
                *a += p * *x;
            }
        }
    }
    /// Merges another state into this one.
    pub fn merge(&mut self, other: &SoftmaxState) {
        if other.m == f32::NEG_INFINITY {
            return;
        }
        if self.m == f32::NEG_INFINITY {
            *self = other.clone();
            return;
        }
        let m = self.m.max(other.m);
        let ws = (self.m - m).exp();
        let wo = (other.m - m).exp();
        self.l = ws * self.l + wo * other.l;
        for (a, b) in self.acc.iter_mut().zip(&other.acc) {
            *a = ws * *a + wo * *b;
        }
        self.m = m;
    }
    /// acc / l (zeros when empty).
    pub fn output(&self) -> Vec<f32> {
        if self.l == 0.0 {
            return vec![0.0; self.acc.len()];
        }
        self.acc.iter().map(|a| a / self.l).collect()
    }
}

/// One-pass log-sum-exp merge of split states (the combine stage): M = max m_j,
/// w_j = exp(m_j - M), l = sum_j w_j l_j, acc = sum_j w_j acc_j (summed in split order).
pub fn merge_splits(states: &[SoftmaxState], head_dim: usize) -> SoftmaxState {
    let m = states.iter().fold(f32::NEG_INFINITY, |m, s| m.max(s.m));
    let mut out = SoftmaxState::new(head_dim);
    if m == f32::NEG_INFINITY {
        return out;
    }
    out.m = m;
    for s in states {
        if s.m == f32::NEG_INFINITY {
            continue;
        }
        let w = (s.m - m).exp();
        out.l += w * s.l;
        for (a, b) in out.acc.iter_mut().zip(&s.acc) {
            *a += w * *b;
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// Attention of `G` query heads (`q`: `G x d`) over tokens with centred keys `keys[t]` and
/// values `values[t]`; logits are `scale * q_g . keys[t]`. Work is split into chunks of
/// ATTEND_SPLIT tokens in the given order and merged. Returns `G x d`.
pub fn attend_group(q: &[f32], head_dim: usize, scale: f32, keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
    assert!(head_dim > 0 && q.len() % head_dim == 0, "attend_group: q is not G x d");
    assert_eq!(
        keys.len(),
        values.len(),
        "attend_group: keys and values differ in length"
    );
    let g = q.len() / head_dim;
    let mut out = Vec::with_capacity(g * head_dim);
    for qg in q.chunks(head_dim) {
        let splits: Vec<SoftmaxState> = keys
            .chunks(ATTEND_SPLIT)
            .zip(values.chunks(ATTEND_SPLIT))
            .map(|(ks, vs)| {
                let mut st = SoftmaxState::new(head_dim);
                for (k, v) in ks.iter().zip(vs) {
                    st.push(scale * dot(qg, k), v);
                }
                st
            })
            .collect();
        out.extend(merge_splits(&splits, head_dim).output());
    }
    out
}

/// The float64 dense softmax oracle, same arguments.
pub fn dense_attention_f64(q: &[f32], head_dim: usize, scale: f32, keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
    assert!(
        head_dim > 0 && q.len() % head_dim == 0,
        "dense_attention_f64: q is not G x d"
    );
    assert_eq!(
        keys.len(),
        values.len(),
        "dense_attention_f64: keys and values differ in length"
    );
    let mut out = Vec::with_capacity(q.len());
    for qg in q.chunks(head_dim) {
        let logits: Vec<f64> = keys
            .iter()
            .map(|k| scale as f64 * qg.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut acc = vec![0f64; head_dim];
        let mut l = 0f64;
        if m != f64::NEG_INFINITY {
            for (lg, v) in logits.iter().zip(values) {
                let p = (lg - m).exp();
                l += p;
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += p * *x as f64;
                }
            }
        }
        if l > 0.0 {
            acc.iter_mut().for_each(|a| *a /= l);
        }
        out.extend(acc);
    }
    out
}
