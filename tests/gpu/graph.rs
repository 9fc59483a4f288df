//! A decode step captured in a CUDA graph: replays are bit-identical to eager launches.

use selfindexkv::config::SIKV_DTYPE_BF16;
use selfindexkv::gpu::{DevBatch, DevPageTable, DevRows, DevSelection, DevTokens, DeviceBuffer, GpuContext};

use crate::common::Rng;
use crate::fixture::*;

gpu_test!(cuda_graph_replay, case_graph);
gpu_test!(cuda_graph_replay_rows, case_graph_rows);
gpu_test!(cuda_graph_replay_routed, case_graph_routed);

/// A whole decode step (append + select + attend for several layers) captured once into a
/// CUDA graph and replayed with new device-side inputs each step, against eager launches of
/// the same steps on a copy of the same state: outputs, indices and final pools bit-identical.
fn case_graph(rng: &mut Rng) -> R {
    run_graph(rng, 1)
}

/// The same with three new tokens per sequence and step, attended as three query rows each
/// (speculative verification: per-row selection, causal among the new tokens).
fn case_graph_rows(rng: &mut Rng) -> R {
    run_graph(rng, 3)
}

/// The step through the routed decode (the crossover decided on the device), under a long
/// max_seq_len, with the dense bound at the live tokens of the middle step: the first half of
/// the replays takes the dense decode, the second the sparse path. Under the capture the two
/// paths are parallel branches (launch.rs decode_routed), so the graph must hold one fork per
/// layer; eager launches keep stream order.
fn case_graph_routed(rng: &mut Rng) -> R {
    run_graph_as(rng, 1, true)
}

/// `per` new tokens per sequence and step; more than one goes through the rows calls.
fn run_graph(rng: &mut Rng, per: usize) -> R {
    run_graph_as(rng, per, false)
}

fn run_graph_as(rng: &mut Rng, per: usize, routed: bool) -> R {
    let layers = 3;
    let steps = if quick() { 10 } else { 100 };
    let lens = [200usize, 37, 513];
    let b = lens.len();
    let n_rows = b * per;
    let mut s = base_shape(SIKV_DTYPE_BF16, 128, 2, 4);
    s.max_batch = n_rows as u32;
    s.page = 16;
    // Routed: a maximum long enough that the select takes its chain of launches (the routed
    // decode forks only then).
    s.max_seq_len = if routed { 131_072 } else { 2048 };
    let dense_max = (lens.iter().sum::<usize>() + b * per * steps / 2) as u64;
    let cfg = make_cfg(s, |c| c.rerank_factor = 2);
    let mut fx = Fx::new(cfg, rng)?;
    for (i, &len) in lens.iter().enumerate() {
        let sidx = fx.add_seq(i as i32, len + steps * per + 1)?;
        fx.calibrate_cpu(rng, sidx, len, 2)?;
    }
    let which: Vec<usize> = (0..b).collect();
    // Per-layer pools: eager (A) and graph (B) copies of the same calibrated state.
    let mut a_pools = Vec::new();
    let mut b_pools = Vec::new();
    for _ in 0..layers {
        let a = DevPools::new(&fx.ctx, &fx.layout)?;
        let bp = DevPools::new(&fx.ctx, &fx.layout)?;
        a.upload(&fx.ctx, &fx.host)?;
        bp.upload(&fx.ctx, &fx.host)?;
        a_pools.push(a);
        b_pools.push(bp);
    }
    let cfg = fx.cfg.clone();
    let layout = fx.layout.clone();
    let ctx = &fx.ctx;
    let (hkv, hq, d, kmax) = (
        cfg.num_kv_heads as usize,
        cfg.num_q_heads as usize,
        cfg.head_dim as usize,
        cfg.budget.max as usize,
    );
    let es = cfg.dtype.size();
    // Fixed-address step inputs (capacity for the largest page table).
    let max_pages: usize = fx.seqs.iter().map(|s| s.pages.len()).sum();
    let mk = |bytes: usize| ctx.alloc(bytes.max(16)).map_err(e2s);
    let (ik, iv, iq) = (
        mk(n_rows * hkv * d * es)?,
        mk(n_rows * hkv * d * es)?,
        mk(n_rows * hq * d * es)?,
    );
    let (ism, itslot, ipos) = (mk(8 * n_rows)?, mk(4 * n_rows)?, mk(4 * n_rows)?);
    let islot = mk(4 * b)?;
    let (iptr, iidx, ilast) = (mk(4 * (b + 1))?, mk(4 * max_pages)?, mk(4 * b)?);
    // Row offsets [b + 1]: `per` rows per sequence, the same every step.
    let ioff = mk(4 * (b + 1))?;
    let offsets: Vec<i32> = (0..=b).map(|i| (i * per) as i32).collect();
    let ws = mk(GpuContext::workspace_bytes(&cfg, &layout, n_rows as u32))?;
    let out_bytes = n_rows * hq * d * es;
    let mut outs_a = Vec::new();
    let mut outs_b = Vec::new();
    let mut idx_a = Vec::new();
    let mut idx_b = Vec::new();
    for _ in 0..layers {
        outs_a.push(mk(out_bytes)?);
        outs_b.push(mk(out_bytes)?);
        idx_a.push((mk(4 * n_rows * hkv * kmax)?, mk(4 * n_rows * hkv)?));
        idx_b.push((mk(4 * n_rows * hkv * kmax)?, mk(4 * n_rows * hkv)?));
    }
    let stream = ctx.create_stream().map_err(e2s)?;
    let st = stream.raw;
    let dt = DevPageTable {
        indptr: iptr.ptr(),
        indices: iidx.ptr(),
        last_page_len: ilast.ptr(),
        batch: b as u32,
    };
    let batch = DevBatch {
        table: dt,
        seq_slot: islot.ptr(),
        q: iq.ptr(),
        rows: (per > 1).then_some(DevRows {
            offsets: ioff.ptr(),
            n: n_rows as u32,
            mean: false,
        }),
    };
    let tokens = DevTokens {
        n: n_rows as u32,
        k: ik.ptr(),
        v: iv.ptr(),
        slot_mapping: ism.ptr(),
        seq_slot: itslot.ptr(),
        position: ipos.ptr(),
    };
    let seq_slots: Vec<i32> = (0..b).map(|s| fx.seqs[s].slot).collect();
    let step =
        |pools: &[DevPools], outs: &[DeviceBuffer], idx: &[(DeviceBuffer, DeviceBuffer)]| -> selfindexkv::Result<()> {
            for l in 0..layers {
                let layer = pools[l].layer();
                let sel = DevSelection {
                    indices: idx[l].0.ptr(),
                    counts: idx[l].1.ptr(),
                };
                ctx.append(&cfg, &layout, &layer, &tokens, st)?;
                if routed {
                    let out = outs[l].ptr();
                    ctx.decode_routed(
                        &cfg,
                        &layout,
                        &layer,
                        &batch,
                        sel,
                        out,
                        ws.as_workspace(),
                        dense_max,
                        st,
                    )?;
                } else {
                    ctx.select(&cfg, &layout, &layer, &batch, sel, ws.as_workspace(), st)?;
                    ctx.attend(&cfg, &layout, &layer, &batch, sel, outs[l].ptr(), ws.as_workspace(), st)?;
                }
            }
            Ok(())
        };
    // The dense steps leave the selections as they were: both copies start from zeros.
    for (a, g) in idx_a.iter().zip(&idx_b) {
        let zeros = vec![0u8; 4 * n_rows * hkv * kmax];
        for buf in [&a.0, &g.0] {
            ctx.copy_htod_async(buf.ptr(), &zeros, st).map_err(e2s)?;
        }
    }
    let graph = ctx.capture(st, || step(&b_pools, &outs_b, &idx_b)).map_err(e2s)?;
    if routed {
        // SIKV_FUSED=on forces the fused select, with which the routed decode keeps stream
        // order (a chain: one edge fewer than nodes).
        let fused = std::env::var("SIKV_FUSED").is_ok_and(|v| v.trim() == "on");
        let forks = if fused { 0 } else { layers };
        let (nodes, edges) = graph.shape().ok_or("the driver gave no node and edge counts")?;
        if edges + 1 != nodes + forks {
            return Err(format!(
                "routed capture: {nodes} nodes, {edges} edges; {forks} forks (one per layer unless the \
                 select is fused) need {}",
                nodes - 1 + forks
            ));
        }
        println!("  routed capture: {nodes} nodes, {edges} edges ({forks} forks)");
    }
    let mut routes = [0usize; 2];
    for _ in 0..steps {
        // `per` new tokens per sequence: slot mapping, positions, page table, k/v, and a query
        // row per new token (rows grouped by sequence).
        let (sm, slots, pos) = fx.append_rows(&which, per);
        for &sq in &which {
            fx.seqs[sq].len += per;
        }
        let t = fx.table(&which);
        let ((kb, _), (vb, _)) = fx.kv(rng, n_rows);
        let (qb, _) = fx.q(rng, n_rows);
        let upload = |dst: &DeviceBuffer, bytes: &[u8]| ctx.copy_htod_async(dst.ptr(), bytes, st).map_err(e2s);
        let upload_all = || -> R {
            upload(&ik, &kb)?;
            upload(&iv, &vb)?;
            upload(&iq, &qb)?;
            upload(&ism, &i64_bytes(&sm))?;
            upload(&itslot, &i32_bytes(&slots))?;
            upload(&islot, &i32_bytes(&seq_slots))?;
            upload(&ioff, &i32_bytes(&offsets))?;
            upload(&ipos, &i32_bytes(&pos))?;
            upload(&iptr, &i32_bytes(&t.0))?;
            upload(&iidx, &i32_bytes(&t.1))?;
            upload(&ilast, &i32_bytes(&t.2))
        };
        upload_all()?;
        routes[(fx.seqs.iter().take(b).map(|q| q.len as u64).sum::<u64>() <= dense_max) as usize] += 1;
        step(&a_pools, &outs_a, &idx_a).map_err(e2s)?;
        ctx.synchronize(st).map_err(e2s)?;
        upload_all()?;
        graph.launch(st).map_err(e2s)?;
        ctx.synchronize(st).map_err(e2s)?;
        for l in 0..layers {
            let mut oa = vec![0u8; out_bytes];
            let mut ob = vec![0u8; out_bytes];
            ctx.copy_dtoh(&mut oa, outs_a[l].ptr()).map_err(e2s)?;
            ctx.copy_dtoh(&mut ob, outs_b[l].ptr()).map_err(e2s)?;
            cmp_bytes(&format!("layer {l} output"), &ob, &oa)?;
            let mut ia = vec![0u8; 4 * n_rows * hkv * kmax];
            let mut ib = vec![0u8; 4 * n_rows * hkv * kmax];
            ctx.copy_dtoh(&mut ia, idx_a[l].0.ptr()).map_err(e2s)?;
            ctx.copy_dtoh(&mut ib, idx_b[l].0.ptr()).map_err(e2s)?;
            cmp_bytes(&format!("layer {l} indices"), &ib, &ia)?;
            if out_f32(&fx, &oa).iter().any(|x| !x.is_finite()) {
                return Err(format!("layer {l}: non-finite output"));
            }
        }
    }
    if routed {
        println!("  routed steps: {} dense, {} sparse", routes[1], routes[0]);
        if routes.contains(&0) {
            return Err(format!("routed steps took one path only: {routes:?} (sparse, dense)"));
        }
    }
    for l in 0..layers {
        let ga = a_pools[l].download(ctx, &layout)?;
        let gb = b_pools[l].download(ctx, &layout)?;
        cmp_layers(&fx, &gb, &ga).map_err(|e| format!("layer {l} pools after {steps} steps: {e}"))?;
    }
    Ok(())
}
