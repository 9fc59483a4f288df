//! Conversions between the activation dtypes and f32, shared by the CPU backend and tests.

use crate::config::{Dtype, HalfKind};
use half::{bf16, f16};

/// Reads `n` values of `dtype` from raw little-endian bytes into f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    let n = out.len();
    match dtype {
        Dtype::F32 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
            }
        }
        Dtype::F16 => {
            for i in 0..n {
                out[i] = f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32();
            }
        }
        Dtype::Bf16 => {
            for i in 0..n {
                out[i] = bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32();
            }
        }
    }
}

/// Writes f32 values as `dtype` into raw little-endian bytes.
pub fn from_f32(dtype: Dtype, vals: &[f32], bytes: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (i, v) in vals.iter().enumerate() {
                bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (i, v) in vals.iter().enumerate() {
                bytes[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for (i, v) in vals.iter().enumerate() {
                bytes[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

/// Rounds through a 16-bit storage format and back.
pub fn round_half(kind: HalfKind, x: f32) -> f32 {
    match kind {
        HalfKind::F16 => f16::from_f32(x).to_f32(),
        HalfKind::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// Stores one 16-bit float (little-endian) of the given kind.
pub fn put_half(kind: HalfKind, x: f32, out: &mut [u8]) {
    let b = match kind {
        HalfKind::F16 => f16::from_f32(x).to_le_bytes(),
        HalfKind::Bf16 => bf16::from_f32(x).to_le_bytes(),
    };
    out[..2].copy_from_slice(&b);
}

/// Loads one 16-bit float (little-endian) of the given kind.
pub fn get_half(kind: HalfKind, b: &[u8]) -> f32 {
    match kind {
        HalfKind::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        HalfKind::Bf16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
    }
}

/// Reads a little-endian f32 / i32 array out of a byte slice.
pub fn read_f32s(bytes: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    }
}
pub fn write_f32s(vals: &[f32], bytes: &mut [u8]) {
    for (i, v) in vals.iter().enumerate() {
        bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
}
pub fn read_i32(bytes: &[u8], i: usize) -> i32 {
    i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
}
pub fn write_i32(bytes: &mut [u8], i: usize, v: i32) {
    bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
}
