//! Stage `encode`: sign bit + k-bit key magnitude + v-bit value per token, fp16 scale/zero per
//! 32-channel group (method §10.3), and the inverse (dequantisation).

use crate::config::{HalfKind, SignPredicate};
use crate::layout::{TokenFormat, SIKV_NUM_PLANES};

/// The sign bit of a normalised key element.
pub fn sign_bit(x: f32, pred: SignPredicate) -> bool {
    unimplemented!()
}

/// Encodes one token of one KV head. `k` is the raw (post-RoPE, uncentred) key, `v` the value,
/// both `head_dim` long. `rows[p]` is the token's row in plane p (`format.row_bytes[p]` bytes;
/// empty for absent planes); every byte of every present row is written.
pub fn encode_token(
    format: &TokenFormat,
    storage: HalfKind,
    pred: SignPredicate,
    k: &[f32],
    v: &[f32],
    centre: &[f32],
    inv_scale: &[f32],
    rows: &mut [&mut [u8]; SIKV_NUM_PLANES],
) {
    unimplemented!()
}

/// The 4-bit sign code of sub-vector `s` (bit i = channel 4s+i).
pub fn sub_code(sign_row: &[u8], s: usize) -> usize {
    unimplemented!()
}

/// Reconstructed centred key k'^ (`head_dim` floats): `(2 sigma - 1)(code * delta + zero) * a_c`
/// for quantised keys, the stored 16-bit k' for 16-bit keys.
pub fn decode_key(format: &TokenFormat, storage: HalfKind, rows: &[&[u8]; SIKV_NUM_PLANES], scale: &[f32]) -> Vec<f32> {
    unimplemented!()
}

/// Reconstructed value (`head_dim` floats).
pub fn decode_value(format: &TokenFormat, storage: HalfKind, rows: &[&[u8]; SIKV_NUM_PLANES]) -> Vec<f32> {
    unimplemented!()
}
