//! Select, attend and attend_dense on the GPU against the CPU stages, on ragged batches.

use selfindexkv::config::{SikvConfig, SIKV_DTYPE_BF16, SIKV_DTYPE_F16};
use selfindexkv::cpu::{self, PageTable};
use selfindexkv::gpu::{DevBatch, DevSelection};

use crate::common::Rng;
use crate::fixture::*;
use crate::out_bound::{attend_bound, cmp_out_bound, Tokens};

gpu_test!(select_attend_matrix, case_decode_matrix);
gpu_test!(select_attend_parity, case_decode_parity);
gpu_test!(long_sequence, case_long);
gpu_test!(fused_select_clusters, case_fused_clusters);
gpu_test!(
    #[ignore = "a diagnosis (docs/RELIABILITY.md §13): scripts/gpu_check.sh STEPS=dense_groups runs it"]
    dense_decode_groups,
    case_dense_groups
);

/// select + attend + attend_dense on a ragged batch: state built on the CPU (calibrate +
/// appends), copied to the device; GPU select vs CPU select; GPU attend vs CPU attend on the
/// CPU's indices; GPU attend_dense vs CPU attend_dense.
pub fn run_decode(rng: &mut Rng, shape: Shape, lens: &[usize], tweak: impl FnOnce(&mut SikvConfig)) -> R {
    let (hfx, (qb, q)) = decode_inputs(rng, shape, lens, tweak)?;
    let fx = upload(hfx)?;
    let which: Vec<usize> = (0..lens.len()).collect();
    let b = which.len();
    let slots: Vec<i32> = which.iter().map(|&s| fx.seqs[s].slot).collect();
    let t = fx.table(&which);
    let table = PageTable {
        indptr: &t.0,
        indices: &t.1,
        last_page_len: &t.2,
    };
    let (hkv, kmax) = (fx.cfg.num_kv_heads as usize, fx.cfg.budget.max as usize);
    let mut ci = vec![0i32; b * hkv * kmax];
    let mut cc = vec![0i32; b * hkv];
    cpu::select(
        &fx.layout,
        &fx.cfg,
        &fx.host.layer_ref(),
        &table,
        &slots,
        &q,
        &mut ci,
        &mut cc,
    )
    .map_err(e2s)?;

    let (dt, _keep) = fx.dev_table(&t)?;
    let ws = fx.ws(b as u32)?;
    let dslots = upload_bytes(&fx.ctx, &i32_bytes(&slots))?;
    let dq = upload_bytes(&fx.ctx, &qb)?;
    let di = fx.ctx.alloc(4 * ci.len()).map_err(e2s)?;
    let dc = fx.ctx.alloc(4 * cc.len()).map_err(e2s)?;
    fx.ctx.memset_async(di.ptr(), 0xFF, di.bytes(), null()).map_err(e2s)?;
    fx.ctx.memset_async(dc.ptr(), 0xFF, dc.bytes(), null()).map_err(e2s)?;
    let layer = fx.dev.layer();
    let batch = DevBatch {
        table: dt,
        seq_slot: dslots.ptr(),
        q: dq.ptr(),
        rows: None,
    };
    let sel = DevSelection {
        indices: di.ptr(),
        counts: dc.ptr(),
    };
    fx.ctx
        .select(&fx.cfg, &fx.layout, &layer, &batch, sel, ws.as_workspace(), null())
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    let mut gib = vec![0u8; di.bytes()];
    let mut gcb = vec![0u8; dc.bytes()];
    fx.ctx.copy_dtoh(&mut gib, di.ptr()).map_err(e2s)?;
    fx.ctx.copy_dtoh(&mut gcb, dc.ptr()).map_err(e2s)?;
    let (gi, gc) = (bytes_i32(&gib), bytes_i32(&gcb));
    let seqs: Vec<usize> = (0..b).collect();
    cmp_select(&fx, &fx.host, &table, &slots, &seqs, &q, &gi, &gc, &ci, &cc)?;

    // attend on the CPU's indices.
    let ci_dev = upload_bytes(&fx.ctx, &i32_bytes(&ci))?;
    let cc_dev = upload_bytes(&fx.ctx, &i32_bytes(&cc))?;
    let out_n = b * (fx.cfg.num_q_heads * fx.cfg.head_dim) as usize;
    let dout = fx.ctx.alloc(out_n * fx.dtype().size()).map_err(e2s)?;
    let mut cout = vec![0f32; out_n];
    cpu::attend(
        &fx.layout,
        &fx.cfg,
        &fx.host.layer_ref(),
        &table,
        &slots,
        &q,
        &ci,
        &cc,
        &mut cout,
    )
    .map_err(e2s)?;
    fx.ctx
        .memset_async(dout.ptr(), 0xFF, dout.bytes(), null())
        .map_err(e2s)?;
    fx.ctx
        .attend(
            &fx.cfg,
            &fx.layout,
            &layer,
            &batch,
            DevSelection {
                indices: ci_dev.ptr(),
                counts: cc_dev.ptr(),
            },
            dout.ptr(),
            ws.as_workspace(),
            null(),
        )
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    let mut ob = vec![0u8; dout.bytes()];
    fx.ctx.copy_dtoh(&mut ob, dout.ptr()).map_err(e2s)?;
    let sel = Tokens::Selected {
        indices: &ci,
        counts: &cc,
    };
    let bound = attend_bound(&fx.layout, &fx.cfg, &fx.host, &table, &slots, &q, sel);
    cmp_out_budget(&fx, "attend", &out_f32(&fx, &ob), &cout, &bound)?;

    // attend_dense.
    cpu::attend_dense(&fx.layout, &fx.cfg, &fx.host.layer_ref(), &table, &slots, &q, &mut cout).map_err(e2s)?;
    fx.ctx
        .memset_async(dout.ptr(), 0xFF, dout.bytes(), null())
        .map_err(e2s)?;
    fx.ctx
        .attend_dense(
            &fx.cfg,
            &fx.layout,
            &layer,
            &batch,
            dout.ptr(),
            ws.as_workspace(),
            None,
            null(),
        )
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    fx.ctx.copy_dtoh(&mut ob, dout.ptr()).map_err(e2s)?;
    let bound = attend_bound(&fx.layout, &fx.cfg, &fx.host, &table, &slots, &q, Tokens::Candidates);
    cmp_out_budget(&fx, "attend_dense", &out_f32(&fx, &ob), &cout, &bound)?;
    Ok(())
}

/// An attend output against the CPU's within the rounding budget `bound`
/// ([`cmp_out_bound`]); prints the worst error as a fraction of what was allowed, and the
/// loosest allowance against the old fixed tolerance (1 % of the row's max |cpu|).
fn cmp_out_budget(fx: &Fx, what: &str, gpu: &[f32], cpu: &[f32], bound: &[f32]) -> R {
    let (worst, loosest) = cmp_out_bound(what, fx.cfg.head_dim as usize, gpu, cpu, bound)?;
    println!(
        "  {what}: worst err {:.2} of allowed, loosest allowed {:.2} x 1 % of the row ({:?})",
        worst, loosest, fx.cfg.dtype
    );
    Ok(())
}

/// What [`run_decode`] draws from `rng`, in its order: the sequences of [`ragged_host`], then
/// the batch's query row (one per sequence). Without a device, so a seed's inputs can be
/// regenerated on the CPU.
pub fn decode_inputs(
    rng: &mut Rng,
    shape: Shape,
    lens: &[usize],
    tweak: impl FnOnce(&mut SikvConfig),
) -> R<(HostFx, Acts)> {
    let fx = ragged_host(rng, shape, lens, tweak)?;
    let q = fx.q(rng, lens.len());
    Ok((fx, q))
}

/// Sequences of `lens` tokens, built on the CPU and copied to the device.
pub fn ragged_fixture(rng: &mut Rng, shape: Shape, lens: &[usize], tweak: impl FnOnce(&mut SikvConfig)) -> R<Fx> {
    upload(ragged_host(rng, shape, lens, tweak)?)
}

/// A host fixture with its device half, the host pools uploaded.
pub fn upload(hfx: HostFx) -> R<Fx> {
    let fx = hfx.on_device()?;
    fx.dev.upload(&fx.ctx, &fx.host)?;
    Ok(fx)
}

/// Sequences of `lens` tokens (calibrated on three quarters, the rest appended), on the CPU.
pub fn ragged_host(rng: &mut Rng, shape: Shape, lens: &[usize], tweak: impl FnOnce(&mut SikvConfig)) -> R<HostFx> {
    let cfg = make_cfg(shape, tweak);
    let mut fx = HostFx::host(cfg, rng)?;
    let which: Vec<usize> = (0..lens.len()).collect();
    for (i, &len) in lens.iter().enumerate() {
        let s = fx.add_seq(i as i32, len + 8)?;
        let prompt = (len * 3 / 4).max(1);
        fx.calibrate_cpu(rng, s, prompt, 4.min(prompt))?;
    }
    // Grow every sequence to its length with a few appends.
    loop {
        let grow: Vec<usize> = which.iter().copied().filter(|&s| fx.seqs[s].len < lens[s]).collect();
        if grow.is_empty() {
            break;
        }
        let per = grow.iter().map(|&s| lens[s] - fx.seqs[s].len).min().unwrap().min(97);
        fx.append_cpu(rng, &grow, per)?;
    }
    Ok(fx)
}

/// A decode-matrix configuration: 2 KV heads, max_seq_len 4096, one batch slot per sequence.
fn matrix_shape(dtype: u32, d: u32, group: u32, (kbits, vbits): (u32, u32), page: u32, seqs: usize) -> Shape {
    Shape {
        kbits,
        vbits,
        page,
        max_seq_len: 4096,
        max_batch: seqs as u32,
        ..base_shape(dtype, d, 2, group)
    }
}

/// One configuration of the decode matrix.
#[derive(Clone, Copy)]
pub struct MatrixCase {
    pub shape: Shape,
    pub two_stage: bool,
    pub sign_sign: bool,
}

impl MatrixCase {
    pub fn tweak(&self, c: &mut SikvConfig) {
        c.rerank_factor = if self.two_stage { 4 } else { 0 };
        if self.sign_sign {
            c.selector = selfindexkv::config::SIKV_SELECTOR_SIGN_SIGN;
        }
    }

    /// As a failure names it (docs/RELIABILITY.md quotes these).
    pub fn label(&self) -> String {
        let s = &self.shape;
        format!(
            "dtype {} d {} G {} page {} bits {}/{} two-stage {} signsign {}",
            s.dtype, s.d, s.group, s.page, s.kbits, s.vbits, self.two_stage, self.sign_sign
        )
    }
}

/// The decode matrix's sequence lengths.
pub fn matrix_lens(quick: bool) -> Vec<usize> {
    if quick {
        vec![70, 5, 301]
    } else {
        vec![70, 5, 1301, 777, 2049]
    }
}

/// The decode matrix's configurations, in the order it runs them (each draws its data from the
/// one generator in turn).
pub fn matrix_cases(quick: bool) -> Vec<MatrixCase> {
    let seqs = matrix_lens(quick).len();
    let mut cases = Vec::new();
    let mut runs = 0;
    for &dtype in &[SIKV_DTYPE_F16, SIKV_DTYPE_BF16] {
        for &d in &[64u32, 128, 256] {
            for &group in &[1u32, 2, 3, 4, 7, 8] {
                // Spread the other dimensions over the combinations instead of a full product.
                runs += 1;
                // Every page size meets every bit pair (blocks of four runs); 48 is not a power
                // of two (the kernels' page lookup has a division path for it).
                let page = [16u32, 48, 64, 256][(runs / 4) % 4];
                let (kb, vb) = [(2u32, 2u32), (4, 4), (16, 16), (2, 4)][runs % 4];
                if quick && runs % 3 != 0 {
                    continue;
                }
                cases.push(MatrixCase {
                    shape: matrix_shape(dtype, d, group, (kb, vb), page, seqs),
                    two_stage: runs % 2 == 0,
                    sign_sign: runs % 5 == 0,
                });
            }
        }
    }
    cases
}

fn case_decode_matrix(rng: &mut Rng) -> R {
    let lens = matrix_lens(quick());
    for c in matrix_cases(quick()) {
        run_decode(rng, c.shape, &lens, |cfg| c.tweak(cfg)).map_err(|e| format!("{}: {e}", c.label()))?;
    }
    Ok(())
}

/// The tensor-core tiles at every group size from 4 to 8 (the tile's 8 head columns filled in
/// part or whole), 2- and 4-bit planes, pages of 16 and 48, d 64 and 128, f16: the decode
/// matrix meets groups of 5-7 on these tiles only at d 64, G 7, page 48, 4/4 bits, whose dense
/// decode missed the tolerance at two seeds (docs/RELIABILITY.md §13). Every configuration runs;
/// the case fails with the list of those that missed, so one run tells whether the misses
/// follow the group size.
fn case_dense_groups(rng: &mut Rng) -> R {
    let lens = [70usize, 777, 2049];
    let mut missed = Vec::new();
    let mut runs = 0;
    for &d in &[64u32, 128] {
        for &(kb, vb) in &[(2u32, 2u32), (4, 4)] {
            for &page in &[16u32, 48] {
                for group in 4u32..=8 {
                    let s = matrix_shape(SIKV_DTYPE_F16, d, group, (kb, vb), page, lens.len());
                    runs += 1;
                    if let Err(e) = run_decode(rng, s, &lens, |c| c.rerank_factor = 0) {
                        missed.push(format!("d {d} G {group} page {page} bits {kb}/{vb}: {e}"));
                    }
                }
            }
        }
    }
    if missed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {runs} configurations missed:\n  {}",
            missed.len(),
            missed.join("\n  ")
        ))
    }
}

fn case_decode_parity(rng: &mut Rng) -> R {
    // The reference profile: forced generated tokens (+inf ties), fixed k = 100, no window.
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
    s.max_batch = 2;
    run_decode(rng, s, &[900, 333], reference_choices)
}

fn case_long(rng: &mut Rng) -> R {
    let n = if quick() { 20_000 } else { 139_000 };
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 1, 4);
    s.max_seq_len = 140_000;
    s.max_batch = 1;
    s.page = 64;
    run_decode(rng, s, &[n], |c| {
        c.budget_max = 2048;
        c.budget_min = 128;
        c.budget_ratio = 0.02;
        c.rerank_factor = 4;
        c.n_heavy = 64;
        c.n_window = 64;
        c.max_append_tokens = 140_000;
    })
}

/// The fused select (kernels/topk.cu sikv_score_topk) with a cluster size that is not a power
/// of two: 4 rows at max_seq_len 40000 on a 132-SM GPU take clusters of 14 CTAs and tiles of
/// 3072 positions; ragged lengths, one sequence's candidates ending inside a CTA's tile, and
/// CTAs with no tile of the shorter one. (The decode matrix takes clusters of 4 CTAs of 1024
/// positions; the long case takes the chain, and under SIKV_FUSED=on 16 CTAs with two tiles for
/// some.) scripts/gpu_check.sh runs the decode cases again with SIKV_FUSED=off and =on.
fn case_fused_clusters(rng: &mut Rng) -> R {
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
    s.max_seq_len = 40_000;
    s.max_batch = 2;
    s.page = 64;
    let lens = if quick() { [20_000, 3_000] } else { [39_990, 5_000] };
    run_decode(rng, s, &lens, |c| {
        c.budget_max = 512;
        c.budget_min = 64;
        c.budget_ratio = 0.05;
        c.rerank_factor = 4;
        c.n_heavy = 32;
        c.n_window = 16;
        c.max_append_tokens = 40_000;
    })
}
