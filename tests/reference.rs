//! Tests of the per-head CPU reference (method §10.7 items 1-7).
//!
//! Random inputs come from a splitmix64 generator seeded from the clock (override with
//! SIKV_TEST_SEED=<hex or decimal>); every test prints its seed, which cargo shows on failure.

use half::f16;
use selfindexkv::config::{Centre, HalfKind, SignPredicate};
use selfindexkv::layout::{
    TokenFormat, ATTEND_SPLIT, CENTROIDS, QUANT_GROUP, SIKV_NUM_PLANES, SIKV_PLANE_KFULL, SIKV_PLANE_KMAG,
    SIKV_PLANE_KPAR, SIKV_PLANE_SIGN, SIKV_PLANE_VCODE, SIKV_PLANE_VFULL, SIKV_PLANE_VPAR, SUBVEC,
};
use selfindexkv::numeric::round_half;
use selfindexkv::reference::attend::{attend_group, dense_attention_f64, SoftmaxState};
use selfindexkv::reference::calibrate::{calibrate_head, lower_median, CalibrateParams};
use selfindexkv::reference::encode::{
    decode_key, decode_value, encode_token, group_params, mag_code, sign_bit, sub_code,
};
use selfindexkv::reference::rerank::{rerank, RerankQuery};
use selfindexkv::reference::score::{build_lut, group_mean_query, lut_score, sign_sign_score};
use selfindexkv::reference::topk::topk;

mod common;
use common::Rng;

// ---------------------------------------------------------------------------------------------
// Helpers.

struct Rows {
    bufs: Vec<Vec<u8>>,
}

impl Rows {
    fn new(f: &TokenFormat) -> Rows {
        // Pre-filled with garbage: encode_token must write every byte.
        Rows {
            bufs: (0..SIKV_NUM_PLANES).map(|p| vec![0xA5u8; f.row_bytes[p]]).collect(),
        }
    }
    // The arguments of the encode stage it wraps, one for one.
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &mut self,
        f: &TokenFormat,
        storage: HalfKind,
        pred: SignPredicate,
        k: &[f32],
        v: &[f32],
        m: &[f32],
        r: &[f32],
    ) {
        let mut it = self.bufs.iter_mut();
        let mut rows: [&mut [u8]; SIKV_NUM_PLANES] = std::array::from_fn(|_| it.next().unwrap().as_mut_slice());
        encode_token(f, storage, pred, k, v, m, r, &mut rows);
    }
    fn refs(&self) -> [&[u8]; SIKV_NUM_PLANES] {
        std::array::from_fn(|p| self.bufs[p].as_slice())
    }
    fn plane(&self, p: usize) -> &[u8] {
        &self.bufs[p]
    }
}

fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

fn fp16_ulp(x: f32) -> f32 {
    let x = x.abs().max(f32::MIN_POSITIVE);
    let e = x.log2().floor().max(-14.0);
    (2f32).powf(e - 10.0)
}

fn sign_of(row: &[u8], c: usize) -> bool {
    (row[c >> 3] >> (c & 7)) & 1 == 1
}

fn levels(bits: u32) -> u32 {
    (1 << bits) - 1
}

/// The spec's quantiser, written independently: (delta, zero, codes) of one group.
fn spec_quantise(vals: &[f32], bits: u32) -> (f32, f32, Vec<u32>) {
    let lo = vals.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let l = levels(bits) as f32;
    let delta = f16::from_f32((hi - lo) / l).to_f32();
    let zero = f16::from_f32(lo).to_f32();
    let codes = vals
        .iter()
        .map(|&y| {
            if delta > 0.0 {
                ((y - zero) / delta + 0.5).floor().clamp(0.0, l) as u32
            } else {
                0
            }
        })
        .collect();
    (delta, zero, codes)
}

/// Packs codes the spec's way: 2 bits at byte c>>2 shift 2(c&3); 4 bits at byte c>>1 shift 4(c&1).
fn spec_pack(codes: &[u32], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; codes.len() * bits as usize / 8];
    for (c, &code) in codes.iter().enumerate() {
        if bits == 2 {
            out[c / 4] |= (code as u8) << (2 * (c % 4));
        } else {
            out[c / 2] |= (code as u8) << (4 * (c % 2));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Pack / unpack.

#[test]
fn sign_bit_predicates() {
    let cases = [
        (0.5f32, true, true),
        (-0.5, false, false),
        (0.0, true, false),
        (-0.0, false, false),
        (1e-40, true, true),
        (-1e-40, false, false),
    ];
    for (x, not_signbit, positive) in cases {
        assert_eq!(sign_bit(x, SignPredicate::NotSignbit), not_signbit, "!signbit({x:e})");
        assert_eq!(sign_bit(x, SignPredicate::Positive), positive, "{x:e} > 0");
    }
}

#[test]
fn worked_example_of_section_11() {
    let mut rng = Rng::new("worked_example_of_section_11");
    let d = 128;
    let f = TokenFormat::new(d, 2, 2);
    let mut k = vec![0f32; d];
    let head = [0.9f32, -0.1, 0.0, -0.5, 0.3, 0.2, -0.7, 0.4];
    k[..8].copy_from_slice(&head);
    for (c, kc) in k.iter_mut().enumerate().skip(8) {
        // Group 0 keeps |x| inside [0, 0.9]; the other groups are arbitrary.
        *kc = if c < 32 { rng.range(-0.85, 0.85) } else { rng.normal() };
    }
    let v = rng.normals(d);
    let m = vec![0f32; d];
    let r = vec![1f32; d];
    let mut rows = Rows::new(&f);
    rows.encode(&f, HalfKind::F16, SignPredicate::NotSignbit, &k, &v, &m, &r);
    let sign = rows.plane(SIKV_PLANE_SIGN);
    assert_eq!(sign[0], 0xB5, "SIGN byte 0 with !signbit");
    assert_eq!(sub_code(sign, 0), 0x5);
    assert_eq!(sub_code(sign, 1), 0xB);
    let kmag = rows.plane(SIKV_PLANE_KMAG);
    assert_eq!(kmag[0], 0x83, "KMAG byte 0 = codes [3, 0, 0, 2]");
    assert_eq!(kmag[1], 0x65, "KMAG byte 1 = codes [1, 1, 2, 1]");
    let (delta, zero) = group_params(rows.plane(SIKV_PLANE_KPAR), 0);
    assert_eq!(f16_bits(delta), f16_bits(0.3));
    assert_eq!(zero, 0.0);
    let kpar = rows.plane(SIKV_PLANE_KPAR);
    assert_eq!(u16::from_le_bytes([kpar[0], kpar[1]]), f16::from_f32(0.3).to_bits());
    assert_eq!(u16::from_le_bytes([kpar[2], kpar[3]]), 0);
    let kh = decode_key(&f, HalfKind::F16, &rows.refs(), &vec![1f32; d]);
    assert_eq!(kh[3], -2.0 * delta, "-0.5 decodes to -0.6");
    assert!((kh[3] + 0.6).abs() < 1e-3);
    assert_eq!(kh[0], 3.0 * delta, "+0.9 decodes to +0.9");
    assert!((kh[0] - 0.9).abs() < 1e-3);
    assert_eq!(
        kh[1].to_bits(),
        (-0.0f32).to_bits(),
        "-0.1 has code 0 and decodes to -0"
    );

    // LUT contribution of sub-vectors 0 and 1 = T[0][0x5] + T[1][0xB].
    let mut lut = vec![0f32; d / 4 * CENTROIDS];
    for u in 0..CENTROIDS {
        lut[u] = u as f32;
        lut[CENTROIDS + u] = 100.0 + u as f32;
    }
    assert_eq!(lut_score(&lut, sign), 5.0 + 111.0);

    let mut rows = Rows::new(&f);
    rows.encode(&f, HalfKind::F16, SignPredicate::Positive, &k, &v, &m, &r);
    assert_eq!(rows.plane(SIKV_PLANE_SIGN)[0], 0xB1, "SIGN byte 0 with x > 0");
    assert_eq!(rows.plane(SIKV_PLANE_KMAG)[0], 0x83);
}

/// Hand-made vectors with exactly representable params: codes, bytes and the decoded values
/// are all known exactly.
#[test]
fn pack_unpack_round_trip_is_bit_exact() {
    for d in [64usize, 128, 256] {
        for (kb, vb) in [(2u32, 2u32), (4, 4), (2, 4), (4, 2)] {
            let f = TokenFormat::new(d, kb, vb);
            let groups = d / QUANT_GROUP;
            let (kl, vl) = (levels(kb), levels(vb));
            let mut x = vec![0f32; d];
            let mut kcodes = vec![0u32; d];
            let mut ksigns = vec![false; d];
            let mut v = vec![0f32; d];
            let mut vcodes = vec![0u32; d];
            let mut kpar = vec![(0f32, 0f32); groups];
            let mut vpar = vec![(0f32, 0f32); groups];
            for g in 0..groups {
                let all_equal = g == 1;
                let kdelta = if all_equal { 0.0 } else { 2f32.powi(-(g as i32) - 3) };
                let kzero = if g == 0 { 0.0 } else { 0.125 * g as f32 };
                let vdelta = if all_equal { 0.0 } else { 2f32.powi(-(g as i32) - 2) };
                let vzero = -0.5 - 0.25 * g as f32;
                kpar[g] = (kdelta, kzero);
                vpar[g] = (vdelta, vzero);
                for i in 0..QUANT_GROUP {
                    let c = g * QUANT_GROUP + i;
                    // Every group holds the lowest and the highest code, so lo / hi hit them.
                    let kc = if all_equal {
                        0
                    } else {
                        match i {
                            0 => 0,
                            1 => kl,
                            _ => ((i * 7 + g * 3) as u32) % (kl + 1),
                        }
                    };
                    let vc = if all_equal {
                        0
                    } else {
                        match i {
                            0 => vl,
                            1 => 0,
                            _ => ((i * 5 + g) as u32) % (vl + 1),
                        }
                    };
                    let mag = kzero + kc as f32 * kdelta;
                    let neg = (i * 3 + g) % 4 == 1 || (all_equal && i % 2 == 0);
                    // Group 0, channel 2: -0.0 (code 0, sign bit 0 under !signbit).
                    let val = if g == 0 && i == 2 {
                        -0.0
                    } else if neg {
                        -mag
                    } else {
                        mag
                    };
                    x[c] = val;
                    kcodes[c] = if g == 0 && i == 2 { 0 } else { kc };
                    ksigns[c] = !val.is_sign_negative();
                    v[c] = vzero + vc as f32 * vdelta;
                    vcodes[c] = vc;
                }
            }
            // k = a * x + m with a power-of-two scale and m = 0 keeps x exact.
            let a: Vec<f32> = (0..d).map(|c| 2f32.powi((c % 3) as i32 - 1)).collect();
            let r: Vec<f32> = a.iter().map(|a| 1.0 / a).collect();
            let m = vec![0f32; d];
            let k: Vec<f32> = (0..d).map(|c| x[c] * a[c]).collect();
            let mut rows = Rows::new(&f);
            rows.encode(&f, HalfKind::F16, SignPredicate::NotSignbit, &k, &v, &m, &r);

            let ctx = format!("d={d} key_bits={kb} value_bits={vb}");
            let mut want_sign = vec![0u8; d / 8];
            for c in 0..d {
                if ksigns[c] {
                    want_sign[c / 8] |= 1 << (c % 8);
                }
            }
            assert_eq!(rows.plane(SIKV_PLANE_SIGN), &want_sign[..], "SIGN {ctx}");
            assert_eq!(rows.plane(SIKV_PLANE_KMAG), &spec_pack(&kcodes, kb)[..], "KMAG {ctx}");
            assert_eq!(rows.plane(SIKV_PLANE_VCODE), &spec_pack(&vcodes, vb)[..], "VCODE {ctx}");
            for g in 0..groups {
                let kp = &rows.plane(SIKV_PLANE_KPAR)[4 * g..4 * g + 4];
                assert_eq!(
                    u16::from_le_bytes([kp[0], kp[1]]),
                    f16_bits(kpar[g].0),
                    "KPAR delta g={g} {ctx}"
                );
                assert_eq!(
                    u16::from_le_bytes([kp[2], kp[3]]),
                    f16_bits(kpar[g].1),
                    "KPAR zero g={g} {ctx}"
                );
                let vp = &rows.plane(SIKV_PLANE_VPAR)[4 * g..4 * g + 4];
                assert_eq!(
                    u16::from_le_bytes([vp[0], vp[1]]),
                    f16_bits(vpar[g].0),
                    "VPAR delta g={g} {ctx}"
                );
                assert_eq!(
                    u16::from_le_bytes([vp[2], vp[3]]),
                    f16_bits(vpar[g].1),
                    "VPAR zero g={g} {ctx}"
                );
            }
            for c in 0..d {
                assert_eq!(mag_code(rows.plane(SIKV_PLANE_KMAG), c, kb), kcodes[c]);
                assert_eq!(mag_code(rows.plane(SIKV_PLANE_VCODE), c, vb), vcodes[c]);
            }
            // Absent planes stay empty.
            assert!(rows.plane(SIKV_PLANE_KFULL).is_empty() && rows.plane(SIKV_PLANE_VFULL).is_empty());

            let kh = decode_key(&f, HalfKind::F16, &rows.refs(), &a);
            let vh = decode_value(&f, HalfKind::F16, &rows.refs());
            for c in 0..d {
                assert_eq!(
                    kh[c].to_bits(),
                    k[c].to_bits(),
                    "decoded key c={c} {ctx}: {} vs {}",
                    kh[c],
                    k[c]
                );
                assert_eq!(vh[c].to_bits(), v[c].to_bits(), "decoded value c={c} {ctx}");
            }
            // The all-equal group decodes to +-zero.
            for i in 0..QUANT_GROUP {
                let c = QUANT_GROUP + i;
                assert_eq!(kcodes[c], 0);
                assert_eq!(kh[c].abs(), kpar[1].1 * a[c], "all-equal group decodes to +-z");
                assert_eq!(vh[c], vpar[1].1);
            }
        }
    }
    // A literal: codes [0, 3, 1, 2] in channels 0..3 pack to 0b10_01_11_00.
    assert_eq!(spec_pack(&[0, 3, 1, 2], 2), vec![0x9C]);
    assert_eq!(spec_pack(&[0xA, 0x5], 4), vec![0x5A]);
}

/// §10.2: reference int32 word w = KMAG bytes 2w, 2w+1 then VCODE bytes 2w, 2w+1; reference
/// params of group g = [dk, zk, dv, zv] = KPAR[g] then VPAR[g].
#[test]
fn reference_layout_mapping() {
    let mut rng = Rng::new("reference_layout_mapping");
    let d = 128;
    let f = TokenFormat::new(d, 2, 2);
    for _ in 0..20 {
        let k = rng.normals(d);
        let v = rng.normals(d);
        let m: Vec<f32> = (0..d).map(|_| 0.1 * rng.normal()).collect();
        let r: Vec<f32> = (0..d).map(|_| rng.range(0.3, 2.0)).collect();
        let mut rows = Rows::new(&f);
        rows.encode(&f, HalfKind::F16, SignPredicate::Positive, &k, &v, &m, &r);
        let x: Vec<f32> = (0..d).map(|c| (k[c] - m[c]) * r[c]).collect();
        // The reference kernel's tensors, built from the spec formulas.
        let mut key_1bit = [0u8; 16];
        let mut key_value_quant = [0u32; 16];
        let mut params = [0u16; 16];
        for g in 0..4 {
            let ax: Vec<f32> = x[32 * g..32 * g + 32].iter().map(|y| y.abs()).collect();
            let (dk, zk, kc) = spec_quantise(&ax, 2);
            let (dv, zv, vc) = spec_quantise(&v[32 * g..32 * g + 32], 2);
            params[4 * g..4 * g + 4].copy_from_slice(&[f16_bits(dk), f16_bits(zk), f16_bits(dv), f16_bits(zv)]);
            for i in 0..32 {
                let c = 32 * g + i;
                if x[c] > 0.0 {
                    key_1bit[c / 8] |= 1 << (c % 8);
                }
                let w = c / 8;
                key_value_quant[w] |= kc[i] << (2 * (c % 8));
                key_value_quant[w] |= vc[i] << (16 + 2 * (c % 8));
            }
        }
        assert_eq!(rows.plane(SIKV_PLANE_SIGN), &key_1bit[..]);
        let (kmag, vcode) = (rows.plane(SIKV_PLANE_KMAG), rows.plane(SIKV_PLANE_VCODE));
        for w in 0..16 {
            let word = u32::from_le_bytes([kmag[2 * w], kmag[2 * w + 1], vcode[2 * w], vcode[2 * w + 1]]);
            assert_eq!(word, key_value_quant[w], "int32 word {w}");
        }
        for g in 0..4 {
            let (kp, vp) = (rows.plane(SIKV_PLANE_KPAR), rows.plane(SIKV_PLANE_VPAR));
            let got = [
                u16::from_le_bytes([kp[4 * g], kp[4 * g + 1]]),
                u16::from_le_bytes([kp[4 * g + 2], kp[4 * g + 3]]),
                u16::from_le_bytes([vp[4 * g], vp[4 * g + 1]]),
                u16::from_le_bytes([vp[4 * g + 2], vp[4 * g + 3]]),
            ];
            assert_eq!(got, params[4 * g..4 * g + 4], "params of group {g}");
        }
    }
}

#[test]
fn sixteen_bit_planes_store_rounded_centred_keys_and_values() {
    let mut rng = Rng::new("sixteen_bit_planes_store_rounded_centred_keys_and_values");
    for storage in [HalfKind::F16, HalfKind::Bf16] {
        for (kb, vb) in [(16u32, 16u32), (16, 2), (4, 16)] {
            let d = 64;
            let f = TokenFormat::new(d, kb, vb);
            let k = rng.normals(d);
            let v = rng.normals(d);
            let m: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
            let r: Vec<f32> = (0..d).map(|_| rng.range(0.5, 2.0)).collect();
            let mut rows = Rows::new(&f);
            rows.encode(&f, storage, SignPredicate::NotSignbit, &k, &v, &m, &r);
            for c in 0..d {
                let kp = k[c] - m[c];
                assert_eq!(sign_of(rows.plane(SIKV_PLANE_SIGN), c), !(kp * r[c]).is_sign_negative());
            }
            let kh = decode_key(&f, storage, &rows.refs(), &vec![1.0; d]);
            let vh = decode_value(&f, storage, &rows.refs());
            for c in 0..d {
                if kb == 16 {
                    assert_eq!(kh[c], round_half(storage, k[c] - m[c]), "KFULL c={c}");
                }
                if vb == 16 {
                    assert_eq!(vh[c], round_half(storage, v[c]), "VFULL c={c}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Error bound.

fn check_error_bound(rng: &mut Rng, name: &str, outliers: bool) {
    let mut worst = 0f32;
    for d in [64usize, 128, 256] {
        for bits in [2u32, 4] {
            let f = TokenFormat::new(d, bits, bits);
            for trial in 0..40 {
                let mut k = rng.normals(d);
                let mut v = rng.normals(d);
                if outliers {
                    for c in 0..d {
                        if rng.below(50) == 0 {
                            k[c] *= rng.range(20.0, 100.0);
                        }
                        if rng.below(50) == 0 {
                            v[c] *= rng.range(20.0, 500.0);
                        }
                    }
                    if trial % 5 == 0 {
                        // A token far outside the calibration range (|x| >> 1, < fp16 max).
                        k.iter_mut().for_each(|y| *y *= 20.0);
                    }
                }
                let m: Vec<f32> = (0..d).map(|_| 0.2 * rng.normal()).collect();
                let a: Vec<f32> = (0..d)
                    .map(|c| {
                        if outliers && c % 17 == 0 {
                            40.0
                        } else {
                            rng.range(0.5, 3.0)
                        }
                    })
                    .collect();
                let r: Vec<f32> = a.iter().map(|a| 1.0 / a).collect();
                let mut rows = Rows::new(&f);
                rows.encode(&f, HalfKind::F16, SignPredicate::NotSignbit, &k, &v, &m, &r);
                let kh = decode_key(&f, HalfKind::F16, &rows.refs(), &a);
                let vh = decode_value(&f, HalfKind::F16, &rows.refs());
                for g in 0..d / QUANT_GROUP {
                    let cs = g * QUANT_GROUP..(g + 1) * QUANT_GROUP;
                    let (dk, _) = group_params(rows.plane(SIKV_PLANE_KPAR), g);
                    let (dv, _) = group_params(rows.plane(SIKV_PLANE_VPAR), g);
                    let x: Vec<f32> = cs.clone().map(|c| (k[c] - m[c]) * r[c]).collect();
                    let hi = x.iter().fold(0f32, |h, y| h.max(y.abs()));
                    let vhi = v[cs.clone()].iter().fold(0f32, |h, y| h.max(y.abs()));
                    for (i, c) in cs.enumerate() {
                        // x^ straight from the row.
                        let (delta, zero) = group_params(rows.plane(SIKV_PLANE_KPAR), g);
                        let mag = mag_code(rows.plane(SIKV_PLANE_KMAG), c, bits) as f32 * delta + zero;
                        let xh = if sign_of(rows.plane(SIKV_PLANE_SIGN), c) {
                            mag
                        } else {
                            -mag
                        };
                        assert_eq!(kh[c], xh * a[c], "decode_key = x^ * a");
                        let tol = dk / 2.0 + 4.0 * fp16_ulp(hi);
                        let err = (xh - x[i]).abs();
                        worst = worst.max(err / tol);
                        assert!(
                            err <= tol,
                            "{name}: d={d} bits={bits} c={c}: |x^ - x| = {err:e} > {tol:e} (x={}, x^={xh})",
                            x[i]
                        );
                        let vtol = dv / 2.0 + 4.0 * fp16_ulp(vhi);
                        let verr = (vh[c] - v[c]).abs();
                        assert!(
                            verr <= vtol,
                            "{name}: d={d} bits={bits} c={c}: |v^ - v| = {verr:e} > {vtol:e}"
                        );
                        // The sign of x^ is the sign of x (or x^ is zero).
                        if xh != 0.0 {
                            assert_eq!(xh.is_sign_negative(), x[i].is_sign_negative());
                        }
                    }
                }
            }
        }
    }
    // The bound is not vacuous: some element comes close to it.
    assert!(worst > 0.3, "{name}: worst error / bound = {worst}");
}

#[test]
fn quantisation_params_saturate_instead_of_overflowing() {
    let d = 64;
    let f = TokenFormat::new(d, 2, 2);
    let mut k = vec![0f32; d];
    let mut v = vec![0f32; d];
    for c in 0..d {
        k[c] = if c % 2 == 0 { 1e6 } else { -3e5 };
        v[c] = if c % 3 == 0 { 2e5 } else { -1e5 };
    }
    k[40] = 0.5;
    let mut rows = Rows::new(&f);
    rows.encode(
        &f,
        HalfKind::F16,
        SignPredicate::NotSignbit,
        &k,
        &v,
        &vec![0.0; d],
        &vec![1.0; d],
    );
    let kh = decode_key(&f, HalfKind::F16, &rows.refs(), &vec![1.0; d]);
    let vh = decode_value(&f, HalfKind::F16, &rows.refs());
    assert!(
        kh.iter().chain(&vh).all(|x| x.is_finite()),
        "decoded values must stay finite: {kh:?} {vh:?}"
    );
    assert_eq!(group_params(rows.plane(SIKV_PLANE_KPAR), 0), (65504.0, 65504.0));
    assert_eq!(group_params(rows.plane(SIKV_PLANE_VPAR), 0).1, -65504.0);
    assert!(kh[0] > 6e4 && kh[1] < -6e4, "signs survive: {} {}", kh[0], kh[1]);
}

#[test]
fn quantisation_error_bound_random() {
    let mut rng = Rng::new("quantisation_error_bound_random");
    check_error_bound(&mut rng, "random", false);
}

#[test]
fn quantisation_error_bound_outliers() {
    let mut rng = Rng::new("quantisation_error_bound_outliers");
    check_error_bound(&mut rng, "outliers", true);
}

// ---------------------------------------------------------------------------------------------
// 3. Calibration and the codebook.

#[test]
fn lower_median_follows_torch_median() {
    assert_eq!(lower_median(&mut [4.0, 1.0, 3.0, 2.0]), 2.0);
    assert_eq!(lower_median(&mut [5.0, 1.0, 3.0]), 3.0);
    assert_eq!(lower_median(&mut [7.5]), 7.5);
    assert_eq!(lower_median(&mut [2.0, 2.0, -1.0, 9.0, 9.0, 9.0]), 2.0);
    let mut rng = Rng::new("lower_median_follows_torch_median");
    for n in 1..40 {
        let mut v: Vec<f32> = rng.normals(n);
        let mut s = v.clone();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(lower_median(&mut v), s[(n - 1) / 2]);
    }
}

fn brute_heavy(kp: &[f32], d: usize, ql: &[f32], lo: usize, hi: usize, nh: usize) -> Vec<u32> {
    let mut sc: Vec<(f32, u32)> = (lo..hi)
        .map(|t| {
            let mut s = 0f32;
            for c in 0..d {
                s += kp[t * d + c] * ql[c];
            }
            (s, t as u32)
        })
        .collect();
    sc.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    let mut h: Vec<u32> = sc.iter().take(nh).map(|x| x.1).collect();
    h.sort();
    h
}

#[test]
fn calibrate_centre_scale_heavy_and_qmed() {
    let mut rng = Rng::new("calibrate_centre_scale_heavy_and_qmed");
    let d = 64;
    for (centre, n, ns, nh, nw, nq) in [
        (Centre::Median, 57usize, 3u32, 6u32, 5u32, 4usize),
        (Centre::Mean, 40, 0, 10, 0, 1),
        (Centre::Median, 8, 4, 8, 8, 2), // n - W <= S: no heavy
        (Centre::Mean, 3, 4, 2, 0, 3),   // every token a sink: T = all tokens
    ] {
        let mut keys: Vec<f32> = (0..n * d).map(|_| rng.normal() + 0.5).collect();
        // Exact ties of the heavy score: token 20 is a copy of token 12.
        if n > 20 {
            let row: Vec<f32> = keys[12 * d..13 * d].to_vec();
            keys[20 * d..21 * d].copy_from_slice(&row);
        }
        // A constant channel: scale clamps to 1e-6.
        for t in 0..n {
            keys[t * d + 5] = 1.25;
        }
        let qbar = rng.normals(nq * d);
        let p = CalibrateParams {
            centre,
            n_sink: ns,
            n_heavy: nh,
            n_window: nw,
        };
        let cal = calibrate_head(&p, d, &keys, &qbar);
        for c in 0..d {
            let mut col: Vec<f32> = (0..n).map(|t| keys[t * d + c]).collect();
            let want = match centre {
                Centre::Median => {
                    col.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    col[(n - 1) / 2]
                }
                Centre::Mean => (col.iter().map(|x| *x as f64).sum::<f64>() / n as f64) as f32,
            };
            assert_eq!(cal.centre[c], want, "centre c={c}");
        }
        let kp: Vec<f32> = keys.iter().enumerate().map(|(i, k)| k - cal.centre[i % d]).collect();
        let lo = ns as usize;
        let hi = n.saturating_sub(nw as usize);
        let want_heavy = if hi > lo {
            brute_heavy(&kp, d, &qbar[(nq - 1) * d..], lo, hi, nh as usize)
        } else {
            vec![]
        };
        assert_eq!(cal.heavy, want_heavy, "heavy set (n={n})");
        if n > 20 && want_heavy.contains(&20) {
            assert!(want_heavy.contains(&12), "tie goes to the smaller position");
        }
        let mut tset: Vec<usize> = (0..n)
            .filter(|&t| t >= lo && !cal.heavy.contains(&(t as u32)))
            .collect();
        if tset.is_empty() {
            tset = (0..n).collect();
        }
        for c in 0..d {
            let a = tset.iter().fold(0f32, |a, &t| a.max(kp[t * d + c].abs())).max(1e-6);
            assert_eq!(cal.scale[c], a, "scale c={c}");
            assert_eq!(cal.inv_scale[c], 1.0 / a);
        }
        assert_eq!(cal.scale[5], 1e-6, "constant channel");
        for c in 0..d {
            let want = if nq >= 2 {
                let mut col: Vec<f32> = (0..nq).map(|j| qbar[j * d + c]).collect();
                col.sort_by(|a, b| a.partial_cmp(b).unwrap());
                col[(nq - 1) / 2]
            } else {
                0.0
            };
            assert_eq!(cal.qmed[c], want, "qmed c={c}");
        }
    }
}

#[test]
fn codebook_is_the_conditional_mean_and_fallback_has_no_nan() {
    let mut rng = Rng::new("codebook_is_the_conditional_mean_and_fallback_has_no_nan");
    let d = 64;
    for n in [12usize, 300] {
        let mut keys = rng.normals(n * d);
        // Sub-vector 3 has four identical channels: only sign patterns 0000 and 1111 occur,
        // so at least 14 of its cells are empty.
        for t in 0..n {
            let x = rng.normal();
            for i in 0..4 {
                keys[t * d + 12 + i] = x;
            }
        }
        let p = CalibrateParams {
            centre: Centre::Median,
            n_sink: 2,
            n_heavy: 3,
            n_window: 1,
        };
        let qbar = rng.normals(d);
        let cal = calibrate_head(&p, d, &keys, &qbar);
        assert_eq!(cal.codebook.len(), d / 4 * 16 * 4);
        assert!(cal.codebook.iter().all(|x| x.is_finite()), "codebook has a NaN / inf");
        let kp: Vec<f32> = keys.iter().enumerate().map(|(i, k)| k - cal.centre[i % d]).collect();
        let tset: Vec<usize> = (2..n).filter(|t| !cal.heavy.contains(&(*t as u32))).collect();
        let mut empty = 0;
        for s in 0..d / 4 {
            for u in 0..16 {
                let members: Vec<usize> = tset
                    .iter()
                    .copied()
                    .filter(|&t| (0..4).all(|i| kp[t * d + 4 * s + i].is_sign_negative() != ((u >> i) & 1 == 1)))
                    .collect();
                for i in 0..4 {
                    let got = cal.codebook[(s * 16 + u) * 4 + i];
                    let want = if members.is_empty() {
                        let mean_abs =
                            tset.iter().map(|&t| kp[t * d + 4 * s + i].abs() as f64).sum::<f64>() / tset.len() as f64;
                        (if (u >> i) & 1 == 1 { mean_abs } else { -mean_abs }) as f32
                    } else {
                        (members.iter().map(|&t| kp[t * d + 4 * s + i] as f64).sum::<f64>() / members.len() as f64)
                            as f32
                    };
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "n={n} s={s} u={u} i={i}: {got} vs {want} (members {})",
                        members.len()
                    );
                }
                if members.is_empty() {
                    empty += 1;
                }
            }
        }
        assert!(empty >= 14, "the test must exercise the fallback ({empty} empty cells)");
    }
}

#[test]
fn codebook_uses_not_signbit_for_zero() {
    // Keys exactly equal to the median centre give k' = +0.0: the codebook counts +0 as positive.
    let d = 64;
    let n = 5;
    let keys: Vec<f32> = (0..n * d).map(|i| ((i / d) as f32) - 2.0).collect(); // token t: t - 2
    let p = CalibrateParams {
        centre: Centre::Median,
        n_sink: 0,
        n_heavy: 0,
        n_window: 0,
    };
    let cal = calibrate_head(&p, d, &keys, &vec![0.0; d]);
    assert!(cal.centre.iter().all(|&m| m == 0.0));
    // Token 2 (k' = +0 everywhere) falls in cell 15 with tokens 3, 4: mean = (0 + 1 + 2) / 3.
    for s in 0..d / 4 {
        for i in 0..4 {
            assert_eq!(cal.codebook[(s * 16 + 15) * 4 + i], 1.0);
            assert_eq!(cal.codebook[(s * 16) * 4 + i], -1.5);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Scores.

#[test]
fn group_mean_and_sub_code() {
    let q = [1.0f32, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0];
    assert_eq!(group_mean_query(&q, 4), vec![2.0, 2.0, 2.0, 2.0]);
    assert_eq!(group_mean_query(&q[..4], 4), vec![1.0, 2.0, 3.0, 4.0]);
    let row = [0xB5u8, 0x0F, 0xF0];
    assert_eq!(
        [
            sub_code(&row, 0),
            sub_code(&row, 1),
            sub_code(&row, 2),
            sub_code(&row, 3)
        ],
        [0x5, 0xB, 0xF, 0x0]
    );
    assert_eq!(sub_code(&row, 5), 0xF);
}

#[test]
fn lut_score_equals_qbar_dot_reconstruction() {
    let mut rng = Rng::new("lut_score_equals_qbar_dot_reconstruction");
    for d in [64usize, 128, 256] {
        let n = 200;
        let keys = rng.normals(n * d);
        let qbar_rows = rng.normals(3 * d);
        let cal = calibrate_head(
            &CalibrateParams {
                centre: Centre::Median,
                n_sink: 4,
                n_heavy: 8,
                n_window: 4,
            },
            d,
            &keys,
            &qbar_rows,
        );
        let q = rng.normals(4 * d);
        let qbar = group_mean_query(&q, d);
        let lut = build_lut(&cal.codebook, &qbar);
        assert_eq!(lut.len(), d / 4 * 16);
        for s in 0..d / 4 {
            for u in 0..16 {
                let want: f64 = (0..4)
                    .map(|i| cal.codebook[(s * 16 + u) * 4 + i] as f64 * qbar[4 * s + i] as f64)
                    .sum();
                let l1: f64 = (0..4)
                    .map(|i| (cal.codebook[(s * 16 + u) * 4 + i] as f64 * qbar[4 * s + i] as f64).abs())
                    .sum();
                assert!((lut[s * 16 + u] as f64 - want).abs() <= 1e-5 * l1.max(1e-6));
            }
        }
        for _ in 0..100 {
            let row: Vec<u8> = (0..d / 8).map(|_| rng.next_u64() as u8).collect();
            let mut recon = vec![0f32; d];
            for s in 0..d / 4 {
                let u = sub_code(&row, s);
                recon[4 * s..4 * s + 4].copy_from_slice(&cal.codebook[(s * 16 + u) * 4..(s * 16 + u) * 4 + 4]);
            }
            let want: f64 = (0..d).map(|c| qbar[c] as f64 * recon[c] as f64).sum();
            let l1: f64 = (0..d).map(|c| (qbar[c] as f64 * recon[c] as f64).abs()).sum();
            let got = lut_score(&lut, &row) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * l1.max(want.abs()),
                "d={d}: {got} vs {want}"
            );
        }
    }
}

/// The stage-2 score of a stored key (RerankQuery: subset-sum lookups for 2-bit keys, a
/// channel-order sum otherwise) equals qbar . decode_key up to f32 rounding, for every width,
/// head_dim and sign of the query.
#[test]
fn rerank_query_equals_qbar_dot_decoded_key() {
    let mut rng = Rng::new("rerank_query_equals_qbar_dot_decoded_key");
    for d in [64usize, 128, 256] {
        for kb in [2u32, 4, 16] {
            let f = TokenFormat::new(d, kb, 2);
            let m: Vec<f32> = rng.normals(d).iter().map(|x| 0.1 * x).collect();
            let r: Vec<f32> = (0..d).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
            let scale: Vec<f32> = r.iter().map(|x| 1.0 / x).collect();
            let qbar = rng.normals(d);
            let rq = RerankQuery::new(&f, &qbar, &scale);
            let mut rows = Rows::new(&f);
            let mut key = vec![0f32; d];
            for t in 0..200 {
                let mut k = rng.normals(d);
                if t % 5 == 0 {
                    k[t % d] *= 40.0; // an outlier channel widens its group's range
                }
                let v = rng.normals(d);
                rows.encode(&f, HalfKind::F16, SignPredicate::NotSignbit, &k, &v, &m, &r);
                let dec = decode_key(&f, HalfKind::F16, &rows.refs(), &scale);
                let want: f64 = (0..d).map(|c| qbar[c] as f64 * dec[c] as f64).sum();
                let l1: f64 = (0..d).map(|c| (qbar[c] as f64 * dec[c] as f64).abs()).sum();
                let got = rq.score(HalfKind::F16, &rows.refs(), &mut key) as f64;
                assert!(
                    (got - want).abs() <= 2e-6 * l1.max(1e-6),
                    "d={d} bits={kb} token {t}: {got} vs {want} (l1 {l1})"
                );
            }
        }
    }
}

#[test]
fn sign_sign_score_is_a_signed_hamming_count() {
    let mut rng = Rng::new("sign_sign_score_is_a_signed_hamming_count");
    let d = 128;
    for _ in 0..50 {
        let row: Vec<u8> = (0..d / 8).map(|_| rng.next_u64() as u8).collect();
        let qbar = rng.normals(d);
        let mut qmed = rng.normals(d);
        // Some exact ties: sgn(0) = 0.
        for c in (0..d).step_by(7) {
            qmed[c] = qbar[c];
        }
        let mut want = 0i32;
        for c in 0..d {
            let diff = qbar[c] - qmed[c];
            let sq = if diff > 0.0 {
                1
            } else if diff < 0.0 {
                -1
            } else {
                0
            };
            want += sq * if sign_of(&row, c) { 1 } else { -1 };
        }
        assert_eq!(sign_sign_score(&row, &qbar, &qmed), want as f32);
        // Without ties: d - 2 * Hamming(sign bits, query sign bits).
        let qmed0 = vec![f32::NEG_INFINITY; d];
        let hamming = (0..d).filter(|&c| !sign_of(&row, c)).count() as f32;
        assert_eq!(sign_sign_score(&row, &qbar, &qmed0), d as f32 - 2.0 * hamming);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Top-k and rerank.

#[test]
fn topk_ties_small_inputs_and_equal_scores() {
    let pos: Vec<u32> = vec![10, 3, 7, 5, 1];
    // Ties go to the smaller position; output ascending.
    assert_eq!(topk(&[1.0, 2.0, 2.0, 2.0, 0.5], &pos, 2), vec![3, 5]);
    assert_eq!(topk(&[1.0, 2.0, 2.0, 2.0, 0.5], &pos, 4), vec![3, 5, 7, 10]);
    // N < k: everything, ascending.
    assert_eq!(topk(&[0.1, 0.2, 0.3, 0.4, 0.5], &pos, 9), vec![1, 3, 5, 7, 10]);
    assert_eq!(topk(&[], &[], 3), Vec::<u32>::new());
    assert_eq!(topk(&[1.0], &[4], 0), Vec::<u32>::new());
    // All equal: the smallest positions.
    assert_eq!(topk(&[0.0; 5], &pos, 3), vec![1, 3, 5]);
    // -0.0 ties with +0.0.
    assert_eq!(topk(&[-0.0, 0.0, -0.0, 0.0, 0.0], &pos, 2), vec![1, 3]);
    // NaN below every number, +inf above.
    assert_eq!(
        topk(&[f32::NAN, f32::NEG_INFINITY, f32::NAN, f32::INFINITY, -1e30], &pos, 3),
        vec![1, 3, 5]
    );
    // NaNs tie among themselves: the smaller position first.
    assert_eq!(
        topk(&[f32::NAN, f32::NEG_INFINITY, f32::NAN, f32::INFINITY, -1e30], &pos, 4),
        vec![1, 3, 5, 7]
    );

    let mut rng = Rng::new("topk_ties_small_inputs_and_equal_scores");
    for _ in 0..50 {
        let n = 1 + rng.below(300);
        // Few distinct values: many ties.
        let scores: Vec<f32> = (0..n).map(|_| rng.below(6) as f32).collect();
        let mut positions: Vec<u32> = (0..n as u32).map(|p| p * 3 + 1).collect();
        // Shuffle.
        for i in (1..n).rev() {
            positions.swap(i, rng.below(i + 1));
        }
        let k = rng.below(n + 5);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            scores[b]
                .partial_cmp(&scores[a])
                .unwrap()
                .then(positions[a].cmp(&positions[b]))
        });
        let mut want: Vec<u32> = order.iter().take(k).map(|&i| positions[i]).collect();
        want.sort();
        assert_eq!(topk(&scores, &positions, k), want);
    }
}

#[test]
fn rerank_keeps_the_best_dot_products() {
    let mut rng = Rng::new("rerank_keeps_the_best_dot_products");
    let d = 64;
    let qbar = rng.normals(d);
    let positions: Vec<u32> = (0..50).map(|i| 1000 - 7 * i).collect();
    let mut keys: Vec<Vec<f32>> = (0..50).map(|_| rng.normals(d)).collect();
    keys[10] = keys[3].clone(); // a tie: position 930 beats 979
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| k.iter().zip(&qbar).map(|(a, b)| *a as f64 * *b as f64).sum())
        .collect();
    let mut order: Vec<usize> = (0..50).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap()
            .then(positions[a].cmp(&positions[b]))
    });
    for k in [0usize, 1, 5, 20, 50, 60] {
        let mut want: Vec<u32> = order.iter().take(k).map(|&i| positions[i]).collect();
        want.sort();
        assert_eq!(rerank(&qbar, &positions, &keys, k), want, "k={k}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Attention.

#[test]
fn softmax_state_push_merge_and_empty() {
    let mut rng = Rng::new("softmax_state_push_merge_and_empty");
    let d = 8;
    let empty = SoftmaxState::new(d);
    assert_eq!(empty.m, f32::NEG_INFINITY);
    assert_eq!(empty.output(), vec![0.0; d]);
    let logits: Vec<f32> = (0..100).map(|_| 4.0 * rng.normal()).collect();
    let vals: Vec<Vec<f32>> = (0..100).map(|_| rng.normals(d)).collect();
    let mut one = SoftmaxState::new(d);
    for (l, v) in logits.iter().zip(&vals) {
        one.push(*l, v);
    }
    one.push(f32::NEG_INFINITY, &vals[0]); // contributes nothing
    let mut a = SoftmaxState::new(d);
    let mut b = SoftmaxState::new(d);
    for i in 0..100 {
        if i % 3 == 0 {
            a.push(logits[i], &vals[i])
        } else {
            b.push(logits[i], &vals[i])
        }
    }
    let mut merged = a.clone();
    merged.merge(&b);
    merged.merge(&SoftmaxState::new(d));
    let mut from_empty = SoftmaxState::new(d);
    from_empty.merge(&merged);
    assert_eq!(from_empty, merged);
    // Exact softmax in f64.
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = logits.iter().map(|l| (*l as f64 - m).exp()).collect();
    let l: f64 = w.iter().sum();
    for c in 0..d {
        let want: f64 = w.iter().zip(&vals).map(|(w, v)| w * v[c] as f64).sum::<f64>() / l;
        assert!((one.output()[c] as f64 - want).abs() < 1e-5);
        assert!((merged.output()[c] as f64 - want).abs() < 1e-5);
    }
    assert_eq!(one.m, merged.m);
}

#[test]
fn attend_split_k_matches_dense_f64() {
    let mut rng = Rng::new("attend_split_k_matches_dense_f64");
    let d = 64;
    for g in [1usize, 2, 3, 4, 8] {
        for n in [1usize, 63, 64, 65, 1000] {
            let q = rng.normals(g * d);
            let temp = rng.range(0.05, 0.4); // peaky or flat
            let keys: Vec<Vec<f32>> = (0..n).map(|_| rng.normals(d)).collect();
            let values: Vec<Vec<f32>> = (0..n).map(|_| rng.normals(d)).collect();
            let got = attend_group(&q, d, temp, &keys, &values);
            let want = dense_attention_f64(&q, d, temp, &keys, &values);
            assert_eq!(got.len(), g * d);
            for i in 0..g * d {
                assert!(
                    (got[i] as f64 - want[i]).abs() < 1e-4,
                    "G={g} N={n} i={i}: {} vs {}",
                    got[i],
                    want[i]
                );
            }
            if n == 1 {
                // One token: the output is its value for every head.
                for h in 0..g {
                    assert_eq!(&got[h * d..(h + 1) * d], &values[0][..]);
                }
            }
        }
    }
    assert_eq!(ATTEND_SPLIT, 64, "the token counts above straddle one split");
    // No tokens: zeros.
    assert_eq!(attend_group(&rng.normals(2 * d), d, 0.1, &[], &[]), vec![0.0; 2 * d]);
    assert_eq!(dense_attention_f64(&rng.normals(d), d, 0.1, &[], &[]), vec![0.0; d]);
}

#[test]
fn attend_is_invariant_to_a_shared_centre() {
    // q . (k - m) shifts every logit of one query by the same constant.
    let mut rng = Rng::new("attend_is_invariant_to_a_shared_centre");
    let d = 128;
    let g = 4;
    let q = rng.normals(g * d);
    let keys: Vec<Vec<f32>> = (0..300).map(|_| rng.normals(d)).collect();
    let values: Vec<Vec<f32>> = (0..300).map(|_| rng.normals(d)).collect();
    let m = rng.normals(d);
    let centred: Vec<Vec<f32>> = keys
        .iter()
        .map(|k| k.iter().zip(&m).map(|(a, b)| a - b).collect())
        .collect();
    let a = attend_group(&q, d, 0.1, &keys, &values);
    let b = attend_group(&q, d, 0.1, &centred, &values);
    for i in 0..g * d {
        assert!((a[i] - b[i]).abs() < 1e-4);
    }
    let _ = SUBVEC;
}
