//! Encode (append) and calibrate on the GPU against the CPU stages, bit for bit.

use selfindexkv::config::{SikvConfig, SIKV_CENTRE_MEAN, SIKV_DTYPE_BF16, SIKV_DTYPE_F16};
use selfindexkv::cpu;
use selfindexkv::gpu::{DevPrompt, DevTokens};

use crate::common::Rng;
use crate::fixture::*;

gpu_test!(encode_bit_exact, case_encode);
gpu_test!(calibrate_bit_exact, case_calibrate);

/// encode (append) bit-exact: after a CPU calibration copied to the device, both sides get the
/// same appended tokens (several sequences, sinks/window/ring wrap, padding rows); planes
/// poisoned on both sides first.
fn run_encode(rng: &mut Rng, shape: Shape, tweak: impl FnOnce(&mut SikvConfig)) -> R {
    let cfg = make_cfg(shape, tweak);
    let mut fx = Fx::new(cfg, rng)?;
    let nseq = 3;
    let prompt = [1usize, 37, 150];
    let extra = if quick() { 20 } else { 70 };
    for (s, &p) in prompt.iter().enumerate() {
        let i = fx.add_seq(s as i32, p + extra + 1)?;
        fx.calibrate_cpu(rng, i, p, 1)?;
    }
    for p in fx.host.planes.iter_mut() {
        p.fill(0xFF);
    }
    fx.dev.upload(&fx.ctx, &fx.host)?;
    let which: Vec<usize> = (0..nseq).collect();
    // Two appends: a multi-token chunk (ring collisions inside one call) and a decode step.
    for per in [extra - 1, 1] {
        let (mut sm, slots, pos) = fx.append_rows(&which, per);
        if sm.len() > 2 {
            sm[1] = -1; // a padding row: no page write, dense update still happens
        }
        let ((kb, k), (vb, v)) = fx.kv(rng, sm.len());
        cpu::append(&fx.layout, &fx.cfg, &mut fx.host.layer_mut(), &k, &v, &sm, &slots, &pos).map_err(e2s)?;
        let (dk, dv) = (upload_bytes(&fx.ctx, &kb)?, upload_bytes(&fx.ctx, &vb)?);
        let dsm = upload_bytes(&fx.ctx, &i64_bytes(&sm))?;
        let dsl = upload_bytes(&fx.ctx, &i32_bytes(&slots))?;
        let dpo = upload_bytes(&fx.ctx, &i32_bytes(&pos))?;
        fx.ctx
            .append(
                &fx.cfg,
                &fx.layout,
                &fx.dev.layer(),
                &DevTokens {
                    n: sm.len() as u32,
                    k: dk.ptr(),
                    v: dv.ptr(),
                    slot_mapping: dsm.ptr(),
                    seq_slot: dsl.ptr(),
                    position: dpo.ptr(),
                },
                null(),
            )
            .map_err(e2s)?;
        for &s in &which {
            fx.seqs[s].len += per;
        }
        let gpu = fx.dev.download(&fx.ctx, &fx.layout)?;
        cmp_layers(&fx, &gpu, &fx.host)?;
    }
    Ok(())
}

fn case_encode(rng: &mut Rng) -> R {
    let dims: &[u32] = if quick() { &[64, 128] } else { &[64, 128, 256] };
    let bits: &[(u32, u32)] = &[(2, 2), (4, 4), (16, 16), (2, 16), (4, 2)];
    for &dtype in &[SIKV_DTYPE_F16, SIKV_DTYPE_BF16] {
        for &d in dims {
            for &(kb, vb) in bits {
                let mut s = base_shape(dtype, d, 2, 2);
                s.kbits = kb;
                s.vbits = vb;
                s.page = 16;
                run_encode(rng, s, |_| {}).map_err(|e| format!("dtype {dtype} d {d} bits {kb}/{vb}: {e}"))?;
            }
        }
    }
    // Parity sign predicate (x > 0) and a config without window.
    let s = base_shape(SIKV_DTYPE_F16, 128, 1, 4);
    run_encode(rng, s, |c| {
        c.flags = selfindexkv::config::SIKV_FLAG_PARITY_SIGN;
        c.n_window = 0;
    })
    .map_err(|e| format!("parity sign: {e}"))
}

/// calibrate: GPU vs CPU from the same (poisoned) pools and inputs, bit-exact.
fn run_calibrate(rng: &mut Rng, shape: Shape, n: usize, nq: usize, tweak: impl FnOnce(&mut SikvConfig)) -> R {
    let cfg = make_cfg(shape, tweak);
    let mut fx = Fx::new(cfg, rng)?;
    let s = fx.add_seq(1, n)?;
    for p in fx.host.planes.iter_mut() {
        p.fill(0xFF);
    }
    fx.dev.upload(&fx.ctx, &fx.host)?;
    let ((kb, k), (vb, v)) = fx.kv(rng, n);
    let (qb, q) = fx.q(rng, nq);
    let mut sm: Vec<i64> = (0..n).map(|t| fx.slot_of(s, t)).collect();
    if n > 3 {
        sm[2] = -1; // skipped page write
    }
    cpu::calibrate(&fx.layout, &fx.cfg, &mut fx.host.layer_mut(), 1, &k, &v, &q, &sm).map_err(e2s)?;
    let ws = fx.ws(1)?;
    let (dk, dv, dq, dsm) = (
        upload_bytes(&fx.ctx, &kb)?,
        upload_bytes(&fx.ctx, &vb)?,
        upload_bytes(&fx.ctx, &qb)?,
        upload_bytes(&fx.ctx, &i64_bytes(&sm))?,
    );
    fx.ctx
        .calibrate(
            &fx.cfg,
            &fx.layout,
            &fx.dev.layer(),
            &DevPrompt {
                seq_slot: 1,
                n_tokens: n as u32,
                k: dk.ptr(),
                v: dv.ptr(),
                n_query: nq as u32,
                q_tail: dq.ptr(),
                slot_mapping: dsm.ptr(),
            },
            ws.as_workspace(),
            null(),
        )
        .map_err(e2s)?;
    let gpu = fx.dev.download(&fx.ctx, &fx.layout)?;
    cmp_layers(&fx, &gpu, &fx.host)
}

fn case_calibrate(rng: &mut Rng) -> R {
    let big = if quick() { 600 } else { 5000 };
    let runs: Vec<(u32, u32, usize, usize, bool)> = vec![
        (SIKV_DTYPE_F16, 128, 1, 1, false),
        (SIKV_DTYPE_F16, 128, 3, 2, false),
        (SIKV_DTYPE_F16, 64, 70, 5, false),
        (SIKV_DTYPE_BF16, 128, 300, 8, true),
        (SIKV_DTYPE_F16, 256, 1000, 16, false),
        (SIKV_DTYPE_BF16, 64, big, 32, false),
        (SIKV_DTYPE_F16, 128, big, 1, true),
    ];
    for (dtype, d, n, nq, mean) in runs {
        for (kb, vb) in [(2u32, 2u32), (4, 16)] {
            let mut s = base_shape(dtype, d, 2, 3);
            s.kbits = kb;
            s.vbits = vb;
            s.max_seq_len = 8192;
            s.page = 64;
            run_calibrate(rng, s, n, nq, |c| {
                if mean {
                    c.centre = SIKV_CENTRE_MEAN;
                }
            })
            .map_err(|e| format!("dtype {dtype} d {d} n {n} nq {nq} mean {mean} bits {kb}/{vb}: {e}"))?;
        }
    }
    // Parity profile: 64 heavy, no sinks / window.
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
    s.max_seq_len = 8192;
    run_calibrate(rng, s, 700, 1, |c| {
        c.n_sink = 0;
        c.n_heavy = 64;
        c.n_window = 0;
        c.flags = selfindexkv::config::SIKV_FLAG_PARITY_SIGN | selfindexkv::config::SIKV_FLAG_FORCE_GENERATED;
    })
    .map_err(|e| format!("parity: {e}"))
}
