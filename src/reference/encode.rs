//! Stage `encode`: sign bit + k-bit key magnitude + v-bit value per token, fp16 scale/zero per
//! 32-channel group (method §10.3), and the inverse (dequantisation).
//!
//! Exact arithmetic (what a kernel must reproduce bit for bit):
//! - `k'_c = centred(k_c, m_c)` (`k_c - m_c`, saturated at `±f32::MAX`), `x_c = k'_c * r_c`
//!   (f32, no fma);
//! - per group: `lo`, `hi` = f32 min / max of `|x_c|` (keys) or `v_c` (values);
//!   `delta = fp16(min((hi - lo) / levels, 65504))` (f32 division, then round to nearest even
//!   fp16), `zero = fp16(clamp(lo, -65504, 65504))`: params saturate at the fp16 maximum
//!   instead of becoming inf (inf * 0 would decode to NaN);
//! - `code = delta > 0 ? clamp(floor((y - zero) / delta + 0.5), 0, levels) : 0` in f32 with the
//!   stored (rounded) delta and zero; a NaN code becomes 0.
//! - decode: `(code * delta + zero)` in f32 (a multiply then an add, no fma), times the sign,
//!   times `a_c` for keys;
//! - 16-bit stores of `k'` and `v` (16-bit planes; the dense set in `cpu::stages`) saturate at
//!   the storage type's largest finite value ([`half_max`]) instead of rounding to ±inf.
//!
//! The inputs are finite: `cpu::stages` (and the kernels) sanitise K/V as they read them
//! ([`saturate`] with the activation dtype's [`finite_max`]; docs/DESIGN.md, "Non-finite and
//! out-of-range inputs"). Every step here is the identity on values already in range, so
//! finite data encodes exactly as without the rule.

use crate::config::{Dtype, HalfKind, SignPredicate};
use crate::layout::{
    TokenFormat, QUANT_GROUP, SIKV_NUM_PLANES, SIKV_PLANE_KFULL, SIKV_PLANE_KMAG, SIKV_PLANE_KPAR, SIKV_PLANE_SIGN,
    SIKV_PLANE_VCODE, SIKV_PLANE_VFULL, SIKV_PLANE_VPAR,
};
use crate::numeric::{get_half, put_half, round_half};

/// Largest finite fp16; quantisation params saturate here.
pub const F16_MAX: f32 = 65504.0;

/// The non-finite rule (docs/DESIGN.md): NaN becomes 0, everything else is clamped to
/// `[-max, max]` (so ±inf becomes ±max). The identity on every value already in range, -0.0
/// included. The kernels' `clamp_finite` (kernels/common.cuh) is the same function.
pub fn saturate(x: f32, max: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-max, max)
    }
}

/// Largest finite value of an activation dtype: what ±inf in K, V and the calibration queries
/// is read as.
pub fn finite_max(dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F16 => F16_MAX,
        Dtype::Bf16 => half::bf16::MAX.to_f32(),
        Dtype::F32 => f32::MAX,
    }
}

/// Largest finite value of a 16-bit storage type: 16-bit stores of `k'` and `v` saturate here.
pub fn half_max(kind: HalfKind) -> f32 {
    match kind {
        HalfKind::F16 => F16_MAX,
        HalfKind::Bf16 => half::bf16::MAX.to_f32(),
    }
}

/// The centred key `k - m`, saturated at `±f32::MAX` (it can only overflow with bf16 or f32
/// activations near their maximum; an infinite k' would make the scale infinite and
/// `k' * (1/a)` a NaN whose sign differs between the CPU and the GPU).
pub fn centred(k: f32, m: f32) -> f32 {
    saturate(k - m, f32::MAX)
}

/// The sign bit of a normalised key element.
pub fn sign_bit(x: f32, pred: SignPredicate) -> bool {
    match pred {
        SignPredicate::NotSignbit => !x.is_sign_negative(),
        SignPredicate::Positive => x > 0.0,
    }
}

/// Highest code of a `bits`-bit magnitude (3 for 2 bits, 15 for 4 bits).
pub fn levels(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// The `bits`-bit code (2 or 4) of channel `c` in a KMAG / VCODE row.
pub fn mag_code(row: &[u8], c: usize, bits: u32) -> u32 {
    match bits {
        2 => ((row[c >> 2] >> (2 * (c & 3))) & 0x3) as u32,
        4 => ((row[c >> 1] >> (4 * (c & 1))) & 0xF) as u32,
        _ => panic!("mag_code: {bits}-bit codes are not packed"),
    }
}

fn put_mag_code(row: &mut [u8], c: usize, bits: u32, code: u32) {
    match bits {
        2 => row[c >> 2] |= ((code & 0x3) as u8) << (2 * (c & 3)),
        4 => row[c >> 1] |= ((code & 0xF) as u8) << (4 * (c & 1)),
        _ => panic!("put_mag_code: {bits}-bit codes are not packed"),
    }
}

/// `(delta, zero)` of group `g` in a KPAR / VPAR row (fp16 pairs).
pub fn group_params(par_row: &[u8], g: usize) -> (f32, f32) {
    let b = &par_row[4 * g..4 * g + 4];
    (get_half(HalfKind::F16, &b[0..2]), get_half(HalfKind::F16, &b[2..4]))
}

/// The code of one element from the stored (fp16-rounded) delta and zero.
pub fn quant_code(y: f32, delta: f32, zero: f32, levels: u32) -> u32 {
    if delta > 0.0 {
        let c = ((y - zero) / delta + 0.5).floor().clamp(0.0, levels as f32);
        // NaN -> 0 (saturating cast).
        c as u32
    } else {
        0
    }
}

/// Quantises `vals` (|x| for keys, v for values) group by group into packed codes and params.
fn quantise(vals: &[f32], bits: u32, codes: &mut [u8], par: &mut [u8]) {
    let lv = levels(bits);
    for (g, chunk) in vals.chunks(QUANT_GROUP).enumerate() {
        let mut lo = f32::INFINITY;
        let mut hi = f32::NEG_INFINITY;
        for &y in chunk {
            lo = lo.min(y);
            hi = hi.max(y);
        }
        let delta = round_half(HalfKind::F16, ((hi - lo) / lv as f32).min(F16_MAX));
        let zero = round_half(HalfKind::F16, lo.clamp(-F16_MAX, F16_MAX));
        put_half(HalfKind::F16, delta, &mut par[4 * g..4 * g + 2]);
        put_half(HalfKind::F16, zero, &mut par[4 * g + 2..4 * g + 4]);
        for (i, &y) in chunk.iter().enumerate() {
            put_mag_code(codes, g * QUANT_GROUP + i, bits, quant_code(y, delta, zero, lv));
        }
    }
}

/// Encodes one token of one KV head. `k` is the raw (post-RoPE, uncentred) key, `v` the value,
/// both `head_dim` long. `rows[p]` is the token's row in plane p (`format.row_bytes[p]` bytes;
/// empty for absent planes); every byte of every present row is written.
#[allow(clippy::too_many_arguments)] // one token's inputs and outputs, kept apart as the stage defines them
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
    let d = format.head_dim;
    assert!(k.len() >= d && v.len() >= d && centre.len() >= d && inv_scale.len() >= d);
    for (p, r) in rows.iter_mut().enumerate() {
        assert!(
            r.len() >= format.row_bytes[p],
            "encode_token: plane {p} row is too short"
        );
        r[..format.row_bytes[p]].fill(0);
    }
    let kp: Vec<f32> = (0..d).map(|c| centred(k[c], centre[c])).collect();
    let x: Vec<f32> = (0..d).map(|c| kp[c] * inv_scale[c]).collect();

    let sign = &mut rows[SIKV_PLANE_SIGN];
    for (c, &xc) in x.iter().enumerate() {
        if sign_bit(xc, pred) {
            sign[c >> 3] |= 1 << (c & 7);
        }
    }

    if format.key_bits == 16 {
        let row = &mut rows[SIKV_PLANE_KFULL];
        for (c, &y) in kp.iter().enumerate() {
            put_half(storage, saturate(y, half_max(storage)), &mut row[2 * c..2 * c + 2]);
        }
    } else {
        let ax: Vec<f32> = x.iter().map(|y| y.abs()).collect();
        let [_, kmag, _, kpar, ..] = rows;
        quantise(&ax, format.key_bits, kmag, kpar);
    }

    if format.value_bits == 16 {
        let row = &mut rows[SIKV_PLANE_VFULL];
        for (c, &y) in v[..d].iter().enumerate() {
            put_half(storage, saturate(y, half_max(storage)), &mut row[2 * c..2 * c + 2]);
        }
    } else {
        let [_, _, vcode, _, vpar, ..] = rows;
        quantise(&v[..d], format.value_bits, vcode, vpar);
    }
}

/// The 4-bit sign code of sub-vector `s` (bit i = channel 4s+i).
pub fn sub_code(sign_row: &[u8], s: usize) -> usize {
    ((sign_row[s >> 1] >> (4 * (s & 1))) & 0xF) as usize
}

/// Reconstructed centred key k'^ (`head_dim` floats): `(2 sigma - 1)(code * delta + zero) * a_c`
/// for quantised keys, the stored 16-bit k' for 16-bit keys.
pub fn decode_key(format: &TokenFormat, storage: HalfKind, rows: &[&[u8]; SIKV_NUM_PLANES], scale: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; format.head_dim];
    decode_key_into(format, storage, rows, scale, &mut out);
    out
}

/// `decode_key` into `out[..head_dim]`. The re-rank and attend loops decode thousands of keys
/// per call, so this form reads each group's parameters once and allocates nothing; the
/// arithmetic per channel is the same as `decode_key`'s.
pub fn decode_key_into(
    format: &TokenFormat,
    storage: HalfKind,
    rows: &[&[u8]; SIKV_NUM_PLANES],
    scale: &[f32],
    out: &mut [f32],
) {
    let d = format.head_dim;
    let out = &mut out[..d];
    if format.key_bits == 16 {
        let row = rows[SIKV_PLANE_KFULL];
        for (c, o) in out.iter_mut().enumerate() {
            *o = get_half(storage, &row[2 * c..2 * c + 2]);
        }
        return;
    }
    let (sign, kmag, kpar) = (rows[SIKV_PLANE_SIGN], rows[SIKV_PLANE_KMAG], rows[SIKV_PLANE_KPAR]);
    for (g, chunk) in out.chunks_mut(QUANT_GROUP).enumerate() {
        let (delta, zero) = group_params(kpar, g);
        for (i, o) in chunk.iter_mut().enumerate() {
            let c = g * QUANT_GROUP + i;
            let mag = mag_code(kmag, c, format.key_bits) as f32 * delta + zero;
            let xh = if (sign[c >> 3] >> (c & 7)) & 1 == 1 { mag } else { -mag };
            *o = xh * scale[c];
        }
    }
}

/// Reconstructed value (`head_dim` floats).
pub fn decode_value(format: &TokenFormat, storage: HalfKind, rows: &[&[u8]; SIKV_NUM_PLANES]) -> Vec<f32> {
    let mut out = vec![0f32; format.head_dim];
    decode_value_into(format, storage, rows, &mut out);
    out
}

/// `decode_value` into `out[..head_dim]`, without allocating (see `decode_key_into`).
pub fn decode_value_into(format: &TokenFormat, storage: HalfKind, rows: &[&[u8]; SIKV_NUM_PLANES], out: &mut [f32]) {
    let d = format.head_dim;
    let out = &mut out[..d];
    if format.value_bits == 16 {
        let row = rows[SIKV_PLANE_VFULL];
        for (c, o) in out.iter_mut().enumerate() {
            *o = get_half(storage, &row[2 * c..2 * c + 2]);
        }
        return;
    }
    let (vcode, vpar) = (rows[SIKV_PLANE_VCODE], rows[SIKV_PLANE_VPAR]);
    for (g, chunk) in out.chunks_mut(QUANT_GROUP).enumerate() {
        let (delta, zero) = group_params(vpar, g);
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = mag_code(vcode, g * QUANT_GROUP + i, format.value_bits) as f32 * delta + zero;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_packing_round_trips() {
        for bits in [2u32, 4] {
            let d = 64;
            let mut row = vec![0u8; d * bits as usize / 8];
            for c in 0..d {
                put_mag_code(&mut row, c, bits, (c as u32 * 7) % (levels(bits) + 1));
            }
            for c in 0..d {
                assert_eq!(mag_code(&row, c, bits), (c as u32 * 7) % (levels(bits) + 1));
            }
        }
    }

    #[test]
    fn quant_code_rounds_half_up_and_clamps() {
        assert_eq!(quant_code(0.5, 1.0, 0.0, 3), 1);
        assert_eq!(quant_code(0.49, 1.0, 0.0, 3), 0);
        assert_eq!(quant_code(9.0, 1.0, 0.0, 3), 3);
        assert_eq!(quant_code(-9.0, 1.0, 0.0, 3), 0);
        assert_eq!(quant_code(5.0, 0.0, 0.0, 3), 0);
        assert_eq!(quant_code(f32::NAN, 1.0, 0.0, 3), 0);
    }
}
