//! Several query rows per sequence (`cpu::rows`) on the GPU against the CPU stages: select and
//! attend with the rows' offsets in device memory, and the kernels' check of the offsets.

use selfindexkv::config::{SikvConfig, SIKV_DTYPE_BF16, SIKV_DTYPE_F16};
use selfindexkv::cpu::{self, PageTable, RowSelection};
use selfindexkv::gpu::{DevBatch, DevRows, DevSelection};

use crate::common::Rng;
use crate::decode::ragged_fixture;
use crate::fixture::*;

gpu_test!(select_attend_rows, case_rows);
gpu_test!(bad_row_offsets_raise_a_fault, case_bad_offsets);

/// Offsets `[batch + 1]` of `rows` query rows per sequence.
fn offsets(rows: &[u32]) -> Vec<i32> {
    let mut o = vec![0i32];
    for &n in rows {
        o.push(o[o.len() - 1] + n as i32);
    }
    o
}

/// GPU select over `rows` query rows per sequence against cpu::select_rows, then GPU attend on
/// the CPU's selection against cpu::attend_rows. Under `RowSelection::MeanQuery` the GPU selects
/// once per sequence: its selection rows are the sequences', compared with the CPU's last row
/// of each (whose bound is the whole sequence), and the attend gets those, each row keeping
/// the positions below its bound as the CPU's rows do.
fn run_rows(
    rng: &mut Rng,
    shape: Shape,
    lens: &[usize],
    rows: &[u32],
    mode: RowSelection,
    tweak: impl FnOnce(&mut SikvConfig),
) -> R {
    let fx = ragged_fixture(rng, shape, lens, tweak)?;
    let which: Vec<usize> = (0..lens.len()).collect();
    let slots: Vec<i32> = which.iter().map(|&s| fx.seqs[s].slot).collect();
    let t = fx.table(&which);
    let table = PageTable {
        indptr: &t.0,
        indices: &t.1,
        last_page_len: &t.2,
    };
    let n_rows: usize = rows.iter().map(|&n| n as usize).sum();
    let seqs: Vec<usize> = rows
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| std::iter::repeat(b).take(n as usize))
        .collect();
    let (qb, q) = fx.q(rng, n_rows);
    let (hkv, kmax) = (fx.cfg.num_kv_heads as usize, fx.cfg.budget.max as usize);
    let mut ci = vec![0i32; n_rows * hkv * kmax];
    let mut cc = vec![0i32; n_rows * hkv];
    let host = fx.host.layer_ref();
    cpu::select_rows(
        &fx.layout, &fx.cfg, &host, &table, &slots, rows, &q, mode, &mut ci, &mut cc,
    )
    .map_err(e2s)?;
    let mean = mode == RowSelection::MeanQuery;
    // What the GPU's selection rows hold: the query rows' selections, or the sequences'.
    let (si, sc, sseqs, sq) = if mean {
        per_sequence(&fx, rows, &q, &ci, &cc)
    } else {
        (ci.clone(), cc.clone(), seqs.clone(), q.clone())
    };

    let (dt, _keep) = fx.dev_table(&t)?;
    let ws = fx.ws(n_rows as u32)?;
    let dslots = upload_bytes(&fx.ctx, &i32_bytes(&slots))?;
    let doff = upload_bytes(&fx.ctx, &i32_bytes(&offsets(rows)))?;
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
        rows: Some(DevRows {
            offsets: doff.ptr(),
            n: n_rows as u32,
            mean,
        }),
    };
    let sel = DevSelection {
        indices: di.ptr(),
        counts: dc.ptr(),
    };
    fx.ctx
        .select(&fx.cfg, &fx.layout, &layer, &batch, sel, ws.as_workspace(), null())
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    fx.ctx.take_fault().map_err(e2s)?;
    let mut gib = vec![0u8; di.bytes()];
    let mut gcb = vec![0u8; dc.bytes()];
    fx.ctx.copy_dtoh(&mut gib, di.ptr()).map_err(e2s)?;
    fx.ctx.copy_dtoh(&mut gcb, dc.ptr()).map_err(e2s)?;
    let (gi, gc) = (bytes_i32(&gib), bytes_i32(&gcb));
    if mean && gc[sc.len()..].iter().any(|&c| c != -1) {
        return Err("select (mean query) wrote counts past its sequences' rows".into());
    }
    cmp_select(&fx, &fx.host, &table, &slots, &sseqs, &sq, &gi, &gc, &si, &sc)?;

    // attend on the CPU's selection.
    let ci_dev = upload_bytes(&fx.ctx, &i32_bytes(&si))?;
    let cc_dev = upload_bytes(&fx.ctx, &i32_bytes(&sc))?;
    let out_n = n_rows * (fx.cfg.num_q_heads * fx.cfg.head_dim) as usize;
    let dout = fx.ctx.alloc(out_n * fx.dtype().size()).map_err(e2s)?;
    let mut cout = vec![0f32; out_n];
    cpu::attend_rows(
        &fx.layout, &fx.cfg, &host, &table, &slots, rows, &q, &ci, &cc, &mut cout,
    )
    .map_err(e2s)?;
    fx.ctx
        .memset_async(dout.ptr(), 0xFF, dout.bytes(), null())
        .map_err(e2s)?;
    let csel = DevSelection {
        indices: ci_dev.ptr(),
        counts: cc_dev.ptr(),
    };
    fx.ctx
        .attend(
            &fx.cfg,
            &fx.layout,
            &layer,
            &batch,
            csel,
            dout.ptr(),
            ws.as_workspace(),
            null(),
        )
        .map_err(e2s)?;
    fx.ctx.synchronize(null()).map_err(e2s)?;
    fx.ctx.take_fault().map_err(e2s)?;
    let mut ob = vec![0u8; dout.bytes()];
    fx.ctx.copy_dtoh(&mut ob, dout.ptr()).map_err(e2s)?;
    cmp_out(&fx, "attend (rows)", &out_f32(&fx, &ob), &cout)?;

    // The dense decode takes one query row per sequence: refused with a status, nothing run.
    let e = fx
        .ctx
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
        .err()
        .ok_or("attend_dense accepted several query rows per sequence")?;
    if e.status != selfindexkv::SikvStatus::SIKV_ERR_UNSUPPORTED {
        return Err(format!("attend_dense with rows: {e}"));
    }
    Ok(())
}

/// The CPU's mean-query selection as the GPU lays it out, one row per sequence: each
/// sequence's last query row (bound = its length, so the whole shared selection), its rows'
/// sequences (0..batch) and, for the tie rule's scores, a query whose group mean is the mean
/// of the sequence's rows (up to f32 rounding).
fn per_sequence(
    fx: &Fx,
    rows: &[u32],
    q: &[f32],
    ci: &[i32],
    cc: &[i32],
) -> (Vec<i32>, Vec<i32>, Vec<usize>, Vec<f32>) {
    let (hkv, kmax) = (fx.cfg.num_kv_heads as usize, fx.cfg.budget.max as usize);
    let row_q = (fx.cfg.num_q_heads * fx.cfg.head_dim) as usize;
    let (mut si, mut sc, mut sq) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = 0usize;
    for &n in rows {
        let n = n as usize;
        let last = first + n - 1;
        si.extend_from_slice(&ci[last * hkv * kmax..(last + 1) * hkv * kmax]);
        sc.extend_from_slice(&cc[last * hkv..(last + 1) * hkv]);
        let mut m = vec![0f32; row_q];
        for r in first..first + n {
            for (a, x) in m.iter_mut().zip(&q[r * row_q..(r + 1) * row_q]) {
                *a += x / n as f32;
            }
        }
        sq.extend(m);
        first += n;
    }
    (si, sc, (0..rows.len()).collect(), sq)
}

fn case_rows(rng: &mut Rng) -> R {
    // A 5-token sequence with 5 rows (its first row sees one position), one row, a full 16,
    // rows that cross a page boundary; the window (64) shorter and longer than the rows' reach.
    let (lens, rows): (Vec<usize>, Vec<u32>) = if quick() {
        (vec![70, 5, 301], vec![3, 5, 16])
    } else {
        (vec![70, 5, 1301, 777, 2049], vec![3, 5, 16, 1, 8])
    };
    let mut runs = 0;
    for &dtype in &[SIKV_DTYPE_F16, SIKV_DTYPE_BF16] {
        for &(d, group, page) in &[(128u32, 4u32, 64u32), (64, 2, 48), (256, 1, 16)] {
            for two in [true, false] {
                runs += 1;
                if quick() && runs % 2 == 0 {
                    continue;
                }
                let mut s = base_shape(dtype, d, 2, group);
                s.page = page;
                s.max_seq_len = 4096;
                s.max_batch = lens.len() as u32;
                let sign_sign = runs % 5 == 0;
                // Mean-query selection on every third configuration.
                let mode = if runs % 3 == 0 {
                    RowSelection::MeanQuery
                } else {
                    RowSelection::PerRow
                };
                run_rows(rng, s, &lens, &rows, mode, |c| {
                    c.rerank_factor = if two { 4 } else { 0 };
                    if sign_sign {
                        c.selector = selfindexkv::config::SIKV_SELECTOR_SIGN_SIGN;
                    }
                })
                .map_err(|e| {
                    format!(
                        "dtype {dtype} d {d} G {group} page {page} two-stage {two} signsign {sign_sign} {mode:?}: {e}"
                    )
                })?;
            }
        }
    }
    // The reference profile: forced generated tokens, no window, fixed k. Under the mean query
    // the sequences' selections hold their later rows' tokens, which earlier rows drop.
    for mode in [RowSelection::PerRow, RowSelection::MeanQuery] {
        let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
        s.max_batch = 2;
        run_rows(rng, s, &[900, 333], &[4, 2], mode, reference_choices)
            .map_err(|e| format!("reference profile, {mode:?}: {e}"))?;
    }
    Ok(())
}

/// Offsets the kernels cannot follow raise FAULT_QUERY_ROWS, reported by the next call; rows
/// that do not belong to a sequence attend nothing (zeros), and the good rows of the same call
/// are still right.
fn case_bad_offsets(rng: &mut Rng) -> R {
    let lens = [300usize, 40, 9];
    let mut s = base_shape(SIKV_DTYPE_F16, 128, 2, 4);
    s.max_seq_len = 1024;
    s.max_batch = 3;
    let fx = ragged_fixture(rng, s, &lens, |_| {})?;
    let which: Vec<usize> = (0..lens.len()).collect();
    let slots: Vec<i32> = which.iter().map(|&s| fx.seqs[s].slot).collect();
    let t = fx.table(&which);
    let (dt, _keep) = fx.dev_table(&t)?;
    let dslots = upload_bytes(&fx.ctx, &i32_bytes(&slots))?;
    let layer = fx.dev.layer();
    // (offsets, n_rows, what is wrong)
    let cases: [(Vec<i32>, u32, &str); 4] = [
        (vec![0, 2, 4, 6], 5, "offsets end past n_rows"),
        (vec![1, 2, 4, 6], 6, "offsets do not start at 0"),
        (vec![0, 17, 18, 19], 19, "17 rows for one sequence"),
        (vec![0, 1, 2, 12], 12, "10 rows for a 9-token sequence"),
    ];
    for (off, n, what, mean) in [false, true]
        .into_iter()
        .flat_map(|mean| cases.iter().map(move |(o, n, w)| (o, *n, *w, mean)))
    {
        fx.ctx.take_fault().map_err(e2s)?;
        let ws = fx.ws(n)?;
        let doff = upload_bytes(&fx.ctx, &i32_bytes(off))?;
        let (qb, _) = fx.q(rng, n as usize);
        let dq = upload_bytes(&fx.ctx, &qb)?;
        let out_bytes = n as usize * (fx.cfg.num_q_heads * fx.cfg.head_dim) as usize * fx.dtype().size();
        let dout = fx.ctx.alloc(out_bytes).map_err(e2s)?;
        let di = fx
            .ctx
            .alloc(4 * n as usize * 2 * fx.cfg.budget.max as usize)
            .map_err(e2s)?;
        let dc = fx.ctx.alloc(4 * n as usize * 2).map_err(e2s)?;
        let batch = DevBatch {
            table: dt,
            seq_slot: dslots.ptr(),
            q: dq.ptr(),
            rows: Some(DevRows {
                offsets: doff.ptr(),
                n,
                mean,
            }),
        };
        let what = format!("{what}{}", if mean { " (mean query)" } else { "" });
        let sel = DevSelection {
            indices: di.ptr(),
            counts: dc.ptr(),
        };
        // Each call's fault is reported by the next call (here take_fault itself).
        let expect_fault = |stage: &str| -> R {
            fx.ctx.synchronize(null()).map_err(e2s)?;
            match fx.ctx.take_fault() {
                Err(e) if e.message.contains("query-row offsets") => {
                    println!("  {what}, {stage}: {e}");
                    Ok(())
                }
                Err(e) => Err(format!("{what}, {stage}: other fault: {e}")),
                Ok(()) => Err(format!("{what}, {stage}: no fault raised")),
            }
        };
        fx.ctx
            .select(&fx.cfg, &fx.layout, &layer, &batch, sel, ws.as_workspace(), null())
            .map_err(|e| format!("{what}: select refused on the host: {e}"))?;
        // Under the mean query the select runs one row per sequence and does not read the
        // lengths against the rows; the attend, which runs every row, reports a sequence with
        // more rows than tokens.
        if mean && off.windows(2).zip(&lens).any(|(w, &len)| (w[1] - w[0]) as usize > len) {
            fx.ctx.synchronize(null()).map_err(e2s)?;
            fx.ctx
                .take_fault()
                .map_err(|e| format!("{what}, select: a fault the attend should raise: {e}"))?;
        } else {
            expect_fault("select")?;
        }
        fx.ctx
            .attend(
                &fx.cfg,
                &fx.layout,
                &layer,
                &batch,
                sel,
                dout.ptr(),
                ws.as_workspace(),
                null(),
            )
            .map_err(|e| format!("{what}: attend refused on the host: {e}"))?;
        expect_fault("attend")?;
        let mut ob = vec![0u8; out_bytes];
        fx.ctx.copy_dtoh(&mut ob, dout.ptr()).map_err(e2s)?;
        if out_f32(&fx, &ob).iter().any(|x| !x.is_finite()) {
            return Err(format!("{what}: a row was left unwritten (not finite)"));
        }
    }
    // n_rows outside batch..=16 batch is refused on the host.
    let ws = fx.ws(64)?;
    let doff = upload_bytes(&fx.ctx, &i32_bytes(&[0, 1, 2, 3]))?;
    for n in [2u32, 49] {
        let batch = DevBatch {
            table: dt,
            seq_slot: dslots.ptr(),
            q: dslots.ptr(),
            rows: Some(DevRows {
                offsets: doff.ptr(),
                n,
                mean: false,
            }),
        };
        let sel = DevSelection {
            indices: ws.ptr(),
            counts: ws.ptr(),
        };
        match fx
            .ctx
            .select(&fx.cfg, &fx.layout, &layer, &batch, sel, ws.as_workspace(), null())
        {
            Err(e) if e.status == selfindexkv::SikvStatus::SIKV_ERR_OUT_OF_BOUNDS => {}
            other => return Err(format!("n_rows = {n} for 3 sequences: {other:?}")),
        }
    }
    Ok(())
}
