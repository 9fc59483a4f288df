//! The stage launchers: host-side validation of each stage's arguments (sizes against the
//! configuration bounds, null and misaligned pointers, workspace size) and the kernel launches
//! on the caller's stream, in the order the stage needs. The hot-path contract of the module
//! doc of `gpu` holds for every launcher here except `calibrate` (not a hot path).

use super::desc::{DevBatch, DevLayer, DevPageTable, DevPrompt, DevSelection, DevTokens, DevWorkspace};
use super::geometry::*;
use super::params::SikvParams;
use super::switches::FusedMode;
use super::workspace::Workspace;
use super::{
    cuda_stream, driver, CUstream, GpuContext, Predecessor, TopkPath, SELECT_ALL, SELECT_RERANK, SELECT_SCORE,
    SELECT_TOPK, SELECT_TOPK_FINAL,
};
use crate::config::CacheConfig;
use crate::layout::Layout;
use crate::status::{Error, Result, SikvStatus};

/// encode: one warp per (token, KV head).
fn encode_grid(n: u32, num_kv_heads: u32) -> (u32, u32, u32) {
    let warps = n as u64 * num_kv_heads as u64;
    (warps.div_ceil((ENCODE_THREADS / 32) as u64) as u32, 1, 1)
}

// The attend kernel keeps ATTEND_MAX_GROUP query heads per KV head in shared memory.
const _: () = assert!(crate::config::MAX_GQA_RATIO <= ATTEND_MAX_GROUP);
// Launch sizes the kernels assume: whole warps, and (top-k histogram scan) bins that split
// evenly over the threads.
const _: () = assert!(ENCODE_THREADS % 32 == 0 && ATTEND_THREADS % 32 == 0 && COMBINE_THREADS % 32 == 0);
const _: () = assert!(TOPK_HIST_BINS % TOPK_THREADS as usize == 0 && TOPK_HIST_BINS % COMPACT_THREADS as usize == 0);

fn need(ptr: u64, name: &str) -> Result<()> {
    if ptr == 0 {
        return Err(Error::null(name));
    }
    Ok(())
}

fn aligned(ptr: u64, align: u64, name: &str) -> Result<()> {
    if ptr % align != 0 {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_MISALIGNED,
            format!("`{name}` = {ptr:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

/// Required and aligned (device pointers read with vector loads are 16-byte aligned).
fn dev_ptr(ptr: u64, align: u64, name: &str) -> Result<()> {
    need(ptr, name)?;
    aligned(ptr, align, name)
}

impl GpuContext {
    /// The device twin of cpu::reset_sequence for one layer: zeroes the state records of
    /// `seq_slot` (all KV heads; not calibrated) and marks every dense entry empty. Two
    /// memsets per KV head, asynchronous on `stream`.
    pub fn reset_sequence(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        seq_slot: u32,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        crate::ensure!(
            seq_slot < cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            cfg.max_seqs
        );
        dev_ptr(layer.state, 16, "state")?;
        self.current()?;
        let st = &layout.state;
        for h in 0..layout.num_kv_heads {
            let rec = layer.state + layout.state_offset(seq_slot as usize, h) as u64;
            driver::memset_async(rec, 0, st.bytes, cuda_stream(stream))?;
            if st.dense_capacity > 0 {
                driver::memset32_async(
                    rec + st.dense_pos as u64,
                    u32::MAX,
                    st.dense_capacity,
                    cuda_stream(stream),
                )?;
            }
        }
        Ok(())
    }
    // ------------------------------------------------------------------------------------
    // Workspace.

    /// Bytes of workspace every call with a batch of up to `batch` sequences needs (from the
    /// declared maxima only). Calibrate needs `workspace_bytes(cfg, layout, 1)`.
    pub fn workspace_bytes(cfg: &CacheConfig, layout: &Layout, batch: u32) -> usize {
        Workspace::new(cfg, layout, batch).total
    }

    fn with_ws(p: &mut SikvParams, ws: u64, w: &Workspace) {
        p.ws_keys = ws + w.keys as u64;
        p.ws_list = ws + w.list as u64;
        p.ws_list_n = ws + w.list_n as u64;
        p.ws_keys2 = ws + w.keys2 as u64;
        p.ws_part_acc = ws + w.part_acc as u64;
        p.ws_part_ml = ws + w.part_ml as u64;
        p.ws_qbar = ws + w.qbar as u64;
        p.ws_rank = ws + w.rank as u64;
        p.ws_hist = ws + w.hist as u64;
        p.ws_cand = ws + w.cand as u64;
        p.ws_gtmap = ws + w.gtmap as u64;
        p.gtmap_stride = w.gtmap_stride as i32;
        p.key_stride = w.key_stride as i32;
        p.cand_cap = w.cand_cap as i32;
    }

    fn check_ws(ws: DevWorkspace, w: &Workspace) -> Result<()> {
        dev_ptr(ws.ptr, 16, "ws")?;
        if ws.bytes < w.total {
            return Err(Error::new(
                SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
                format!(
                    "ws_bytes = {} is smaller than the {} bytes the workspace needs",
                    ws.bytes, w.total
                ),
            ));
        }
        Ok(())
    }

    fn layer_params(cfg: &CacheConfig, layout: &Layout, layer: &DevLayer) -> Result<SikvParams> {
        let mut p = SikvParams::from_config(cfg, layout);
        for (i, base) in layer.planes.iter().enumerate() {
            if layout.format.has(i) {
                dev_ptr(*base, 16, crate::layout::PLANE_NAMES[i])?;
                p.plane[i] = *base;
            }
        }
        dev_ptr(layer.state, 16, "state")?;
        p.state = layer.state;
        Ok(p)
    }

    fn table_params(cfg: &CacheConfig, p: &mut SikvParams, table: &DevPageTable) -> Result<()> {
        if table.batch > cfg.max_batch {
            return Err(Error::bounds(format!(
                "page table batch = {} exceeds max_batch ({})",
                table.batch, cfg.max_batch
            )));
        }
        dev_ptr(table.indptr, 4, "page_table.indptr")?;
        dev_ptr(table.indices, 4, "page_table.indices")?;
        dev_ptr(table.last_page_len, 4, "page_table.last_page_len")?;
        p.indptr = table.indptr;
        p.page_indices = table.indices;
        p.last_page_len = table.last_page_len;
        p.batch = table.batch as i32;
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Stages.

    /// Stage `calibrate` for one sequence (cpu::calibrate) from its prompt (see
    /// [`DevPrompt`]); `ws` holds at least `workspace_bytes(cfg, layout, 1)`. Not a hot path
    /// (nine small launches), but asynchronous and without allocation all the same. Overwrites
    /// the state records of `prompt.seq_slot` (the caller tracks whether it was calibrated).
    pub fn calibrate(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        prompt: &DevPrompt,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        self.check_cfg(cfg)?;
        let DevPrompt {
            seq_slot,
            n_tokens: n,
            k,
            v,
            n_query: nq,
            q_tail,
            slot_mapping,
        } = *prompt;
        crate::ensure!(
            n >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "calibrate: n = 0 (the prompt needs >= 1 token)"
        );
        crate::ensure!(
            n <= cfg.max_seq_len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "calibrate: prompt length {n} exceeds max_seq_len ({})",
            cfg.max_seq_len
        );
        crate::ensure!(
            nq >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "calibrate: nq = 0 (q_tail needs >= 1 row)"
        );
        crate::ensure!(
            nq <= n,
            SIKV_ERR_INVALID_ARGUMENT,
            "calibrate: nq = {nq} exceeds the prompt length {n}"
        );
        crate::ensure!(
            seq_slot < cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            cfg.max_seqs
        );
        let mut p = Self::layer_params(cfg, layout, layer)?;
        dev_ptr(k, 16, "k")?;
        dev_ptr(v, 16, "v")?;
        dev_ptr(q_tail, 16, "q_tail")?;
        dev_ptr(slot_mapping, 8, "slot_mapping")?;
        let w = Workspace::new(cfg, layout, 1);
        Self::check_ws(ws, &w)?;
        Self::with_ws(&mut p, ws.ptr, &w);
        p.k = k;
        p.v = v;
        p.q = q_tail;
        p.slot_mapping = slot_mapping;
        p.n_tokens = n as i32;
        p.nq = nq as i32;
        p.calib_slot = seq_slot as i32;
        p.mode = 1;
        self.current()?;
        let kn = &self.inner.kernels;
        let h = cfg.num_kv_heads;
        let hd = h * cfg.head_dim;
        let chan = (hd.div_ceil(CALIB_CHANNEL_THREADS), 1, 1);
        self.launch(&kn.calib_init, (h, 1, 1), CALIB_INIT_THREADS, stream, &p)?;
        if p.centre_mean != 0 {
            self.launch(&kn.calib_mean, chan, CALIB_CHANNEL_THREADS, stream, &p)?;
        } else {
            self.launch(&kn.calib_median, (hd, 1, 1), CALIB_MEDIAN_THREADS, stream, &p)?;
        }
        self.launch(&kn.calib_qbar, chan, CALIB_CHANNEL_THREADS, stream, &p)?;
        if nq >= 2 {
            self.launch(&kn.calib_qmed, (hd, 1, 1), CALIB_MEDIAN_THREADS, stream, &p)?;
        }
        let range = (n as i64 - cfg.n_window as i64 - cfg.n_sink as i64).max(0) as u32;
        if range > 0 && cfg.n_heavy > 0 {
            let grid = (range.div_ceil(CALIB_HEAVY_SCORE_THREADS), h, 1);
            self.launch(&kn.calib_heavy_score, grid, CALIB_HEAVY_SCORE_THREADS, stream, &p)?;
        }
        self.launch(
            &kn.calib_heavy_select,
            (h, 1, 1),
            CALIB_HEAVY_SELECT_THREADS,
            stream,
            &p,
        )?;
        self.launch(&kn.calib_scale, chan, CALIB_CHANNEL_THREADS, stream, &p)?;
        // One thread per (sub-vector, sign pattern).
        let cells = hd / crate::layout::SUBVEC as u32 * crate::layout::CENTROIDS as u32;
        let grid = (cells.div_ceil(CALIB_CODEBOOK_THREADS), 1, 1);
        self.launch(&kn.calib_codebook, grid, CALIB_CODEBOOK_THREADS, stream, &p)?;
        self.launch(&kn.encode, encode_grid(n, h), ENCODE_THREADS, stream, &p)?;
        Ok(())
    }

    /// Stage `encode` (cpu::append) of `tokens` (see [`DevTokens`]). Hot path. Tokens whose
    /// seq_slot, position or slot_mapping is out of range are skipped on the device and
    /// reported by the next call (device faults, module doc).
    pub fn append(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        tokens: &DevTokens,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        self.check_cfg(cfg)?;
        let n = tokens.n;
        crate::ensure!(
            n <= cfg.max_append_tokens,
            SIKV_ERR_OUT_OF_BOUNDS,
            "append of {n} tokens exceeds max_append_tokens ({})",
            cfg.max_append_tokens
        );
        let mut p = Self::layer_params(cfg, layout, layer)?;
        if n == 0 {
            return Ok(());
        }
        dev_ptr(tokens.k, 16, "k")?;
        dev_ptr(tokens.v, 16, "v")?;
        dev_ptr(tokens.slot_mapping, 8, "slot_mapping")?;
        dev_ptr(tokens.seq_slot, 4, "seq_slot")?;
        dev_ptr(tokens.position, 4, "position")?;
        p.k = tokens.k;
        p.v = tokens.v;
        p.slot_mapping = tokens.slot_mapping;
        p.seq_slot = tokens.seq_slot;
        p.position = tokens.position;
        p.n_tokens = n as i32;
        p.mode = 0;
        self.current()?;
        let grid = encode_grid(n, cfg.num_kv_heads);
        self.launch(&self.inner.kernels.encode, grid, ENCODE_THREADS, stream, &p)
    }

    /// Selection (cpu::select): score, top-k (and rerank when two-stage) for `batch`; writes
    /// `sel` (see [`DevSelection`]). Hot path.
    #[allow(clippy::too_many_arguments)] // one typed descriptor per kind of memory the stage touches
    pub fn select(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.select_stages(SELECT_ALL, cfg, layout, layer, batch, sel, ws, stream)
    }

    /// The parameters every batch call (select, attend, attend_dense) shares: layer, batch
    /// (page table, seq_slot, q) and workspace, validated; None for an empty batch (nothing to
    /// launch).
    fn batch_params(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        ws: DevWorkspace,
    ) -> Result<Option<(SikvParams, Workspace)>> {
        self.check_cfg(cfg)?;
        let table = &batch.table;
        let mut p = Self::layer_params(cfg, layout, layer)?;
        Self::table_params(cfg, &mut p, table)?;
        if table.batch == 0 {
            return Ok(None);
        }
        dev_ptr(batch.seq_slot, 4, "seq_slot")?;
        dev_ptr(batch.q, 16, "q")?;
        let rows = Self::rows_params(&mut p, batch)?;
        let w = Workspace::new(cfg, layout, rows);
        Self::check_ws(ws, &w)?;
        crate::ensure!(
            w.max_splits() <= COMBINE_MAX_SPLITS,
            SIKV_ERR_UNSUPPORTED,
            "{} attention splits per query head exceed the combine kernel's {COMBINE_MAX_SPLITS}",
            w.max_splits()
        );
        Self::with_ws(&mut p, ws.ptr, &w);
        p.seq_slot = batch.seq_slot;
        p.q = batch.q;
        Ok(Some((p, w)))
    }

    /// The call's query rows (one per sequence, or `batch.rows`) into the kernels' parameters;
    /// returns their number, which sizes the grids and the workspace.
    fn rows_params(p: &mut SikvParams, batch: &DevBatch) -> Result<u32> {
        let b = batch.table.batch;
        let n = match batch.rows {
            None => b,
            Some(r) => {
                dev_ptr(r.offsets, 4, "row_offsets")?;
                let most = b as u64 * crate::cpu::SIKV_MAX_QUERY_ROWS as u64;
                crate::ensure!(
                    r.n >= b && r.n as u64 <= most,
                    SIKV_ERR_OUT_OF_BOUNDS,
                    "n_rows = {} must be in batch..=batch * {} ({b}..={most}): 1..={} query rows per sequence",
                    r.n,
                    crate::cpu::SIKV_MAX_QUERY_ROWS,
                    crate::cpu::SIKV_MAX_QUERY_ROWS
                );
                p.row_offsets = r.offsets;
                p.rows_mean = if r.mean { r.n as i32 } else { 0 };
                r.n
            }
        };
        p.rows = n as i32;
        Ok(n)
    }

    /// Refuses several query rows per sequence for `what` (its kernels take one).
    fn one_row_per_sequence(batch: &DevBatch, what: &str) -> Result<()> {
        crate::ensure!(
            batch.rows.is_none(),
            SIKV_ERR_UNSUPPORTED,
            "{what} takes one query row per sequence; several select and attend (decode_rows)"
        );
        Ok(())
    }

    /// Checks a selection's addresses and points the kernels' parameters at it.
    fn selection_params(p: &mut SikvParams, sel: DevSelection) -> Result<()> {
        dev_ptr(sel.indices, 4, "indices")?;
        dev_ptr(sel.counts, 4, "counts")?;
        p.indices = sel.indices;
        p.counts = sel.counts;
        Ok(())
    }

    /// The preamble of a call that attends into `out` over the selection `sel`: the pending
    /// fault, the batch's parameters (None for an empty batch), the selection and the output.
    #[allow(clippy::too_many_arguments)] // attend's descriptors
    fn attend_params(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        out: u64,
        ws: DevWorkspace,
    ) -> Result<Option<(SikvParams, Workspace)>> {
        self.take_fault()?;
        let Some((mut p, w)) = self.batch_params(cfg, layout, layer, batch, ws)? else {
            return Ok(None);
        };
        Self::selection_params(&mut p, sel)?;
        dev_ptr(out, 16, "out")?;
        p.out = out;
        Ok(Some((p, w)))
    }

    /// Benchmarking aid: launches only the parts of `select` named by `stages` (bits
    /// SELECT_SCORE, SELECT_TOPK, SELECT_RERANK; each part reads what the previous one left in
    /// the workspace, so time a part only after a full select on the same workspace).
    #[allow(clippy::too_many_arguments)] // select's arguments plus the stage bits
    pub fn select_stages(
        &self,
        stages: u32,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        // The final top-k kernel reads the histograms before its grid dependency, trusting the
        // launch two back (the score kernel, with the compaction between) to be complete; the
        // score kernel lets what follows it launch at once.
        crate::ensure!(
            stages & (SELECT_SCORE | SELECT_TOPK | SELECT_TOPK_FINAL) != SELECT_SCORE | SELECT_TOPK_FINAL,
            SIKV_ERR_INVALID_ARGUMENT,
            "select_stages: SELECT_TOPK_FINAL after SELECT_SCORE needs SELECT_TOPK between them"
        );
        let Some((mut p, _)) = self.batch_params(cfg, layout, layer, batch, ws)? else {
            return Ok(());
        };
        Self::selection_params(&mut p, sel)?;
        self.topk_params(&mut p);
        self.current()?;
        // A mean-query selection: one row per sequence, as a one-row call's select sees it,
        // with the rows' offsets for the query's mean (mean_offsets).
        if p.rows_mean != 0 {
            p.mean_offsets = p.row_offsets;
            p.row_offsets = 0;
            p.rows = p.batch;
        }
        let b = p.rows as u32;
        let fused = self.fused_cluster(stages, cfg, &p, b);
        if stages & SELECT_SCORE != 0 && p.topk_multi != 0 && fused.is_none() {
            // The score kernel adds into the per-row histograms (and the final top-k kernel
            // expects zero candidate counters): zero both on the stream, with hist_zero, so
            // that the score kernel (launched programmatically behind it) runs its prologue
            // and token loop meanwhile and waits only before it adds its histogram. A memset
            // ends the chain of programmatic launches there; the zeroing in the prologue
            // kernel, with the score kernel waiting first, made the select chain 3.6 µs slower
            // at 128K, batch 1 (RESULTS.md, fifth session). SIKV_HIST_ZERO=memset keeps the
            // memset (for A/B). The fused select keeps both in shared memory.
            let words = b as usize * cfg.num_kv_heads as usize * TOPK_HIST_STRIDE;
            if self.inner.switches.hist_zero_memset {
                driver::memset32_async(p.ws_hist, 0, words, cuda_stream(stream))?;
            } else {
                // One 16-byte word a thread (TOPK_HIST_STRIDE is a multiple of four words).
                let blocks = (words / 4).div_ceil(HIST_ZERO_THREADS as usize) as u32;
                self.launch(
                    &self.inner.kernels.hist_zero,
                    (blocks, 1, 1),
                    HIST_ZERO_THREADS,
                    stream,
                    &p,
                )?;
            }
        }
        self.launch_select(stages, cfg, &p, b, fused, stream)
    }

    /// The fused select (score + stage-1 top-k in one launch, kernels/topk.cu sikv_score_topk)
    /// for this call as (cluster size, positions per CTA tile), or None for the chain of
    /// launches. It needs a call that scores and selects (not one stage alone), one row per
    /// sequence, the multi-CTA top-k, and every row's cluster resident at once; the rows' CTAs
    /// then spread over the SMs, one per SM, each scoring its tiles in series. It is taken
    /// where it measured faster than the chain (H200, docs/PERF_NOTES.md v12): no CTA scores
    /// more than two tiles, and a CTA's positions are at most FUSED_SMALL_TILE or within 10 %
    /// of an SM's share in the chain. A CTA that scores more loses what the fused launch saves:
    /// the chain's score blocks overlap their prologues' loads across blocks, the CTA's tiles
    /// run one after the other. SIKV_FUSED=on takes it wherever it fits.
    fn fused_cluster(&self, stages: u32, cfg: &CacheConfig, p: &SikvParams, b: u32) -> Option<(u32, u32)> {
        let both = SELECT_SCORE | SELECT_TOPK;
        let rows = b * cfg.num_kv_heads;
        if stages & both != both || p.topk_multi == 0 || p.row_offsets != 0 || p.mean_offsets != 0 || rows == 0 {
            return None;
        }
        let sms = self.inner.dev.sms.max(1) as u32;
        let msl = cfg.max_seq_len.max(1);
        let most = (sms / rows).clamp(1, FUSED_MAX_CLUSTER).min(msl.div_ceil(TOPK_THREADS));
        let c = (1..=most)
            .rev()
            .find(|&c| self.inner.fused_clusters[c as usize] >= rows)?;
        let tile = msl.div_ceil(c).next_multiple_of(TOPK_THREADS).min(FUSED_TILE);
        let tiles = msl.div_ceil(tile);
        let c = c.min(tiles);
        if self.inner.switches.fused != FusedMode::Always {
            let per_cta = tiles.div_ceil(c) as u64 * tile as u64;
            let per_sm = rows as u64 * msl as u64 / sms as u64;
            let small = per_cta <= FUSED_SMALL_TILE as u64 || per_cta * 10 <= per_sm * 11;
            if tiles.div_ceil(c) > 2 || !small {
                return None;
            }
        }
        Some((c, tile))
    }

    /// The top-k path of this context: multi-CTA (with its candidate cap) or one CTA.
    fn topk_params(&self, p: &mut SikvParams) {
        p.topk_multi = match self.inner.switches.topk {
            TopkPath::Single => 0,
            TopkPath::Multi { cand_cap } => {
                if let Some(c) = cand_cap {
                    p.cand_cap = p.cand_cap.min(c.max(1) as i32);
                }
                1
            }
        };
    }

    /// Stage `prologue` of a routed decode (route.cu): writes the route word and zeroes the
    /// multi-CTA top-k histograms and counters the score kernel adds into (one node for both).
    fn launch_prologue(&self, cfg: &CacheConfig, p: &SikvParams, b: u32, stream: CUstream) -> Result<()> {
        let mut pp = *p;
        pp.route_as = ROUTE_EITHER as i32;
        let grid = (cfg.num_kv_heads, b, 1);
        self.launch(&self.inner.kernels.prologue, grid, PROLOGUE_THREADS, stream, &pp)
    }

    /// The score, top-k and re-rank launches of `select_stages` after the prologue; `fused`:
    /// score and stage-1 top-k as one launch (fused_cluster's cluster size and tile).
    fn launch_select(
        &self,
        stages: u32,
        cfg: &CacheConfig,
        p: &SikvParams,
        b: u32,
        fused: Option<(u32, u32)>,
        stream: CUstream,
    ) -> Result<()> {
        let kn = &self.inner.kernels;
        let h = cfg.num_kv_heads;
        if let Some((c, tile)) = fused {
            // Score and stage 1 (fused_cluster decided the call wants both).
            let mut pf = *p;
            pf.fused_tile = tile as i32;
            self.launch_clusters(&kn.score_topk, (c, h, b), TOPK_THREADS, c, stream, &pf)?;
        } else {
            self.launch_stage1(stages, cfg, p, b, stream)?;
        }
        if cfg.two_stage() && stages & SELECT_RERANK != 0 {
            let grid = (cfg.stage1_max().div_ceil(RERANK_THREADS), h, b);
            let rerank = if p.mean_offsets != 0 {
                &kn.rerank_score_mean
            } else {
                &kn.rerank_score
            };
            self.launch(rerank, grid, RERANK_THREADS, stream, p)?;
            self.launch(&kn.topk_stage2, (h, b, 1), TOPK_THREADS, stream, p)?;
        }
        Ok(())
    }

    /// The chain's score and stage-1 top-k launches of `select_stages` (launch_select).
    fn launch_stage1(&self, stages: u32, cfg: &CacheConfig, p: &SikvParams, b: u32, stream: CUstream) -> Result<()> {
        let kn = &self.inner.kernels;
        let h = cfg.num_kv_heads;
        let multi = p.topk_multi != 0;
        if stages & SELECT_SCORE != 0 {
            let tiles = cfg.max_seq_len.div_ceil(SCORE_TILE);
            let rows = p.row_offsets != 0 || p.mean_offsets != 0;
            let sms = self.inner.dev.sms.max(0) as u32;
            let wide = match self.inner.switches.score_wide {
                Some(w) => w,
                None => super::workspace::score_wide(tiles * h * b, sms, cfg.head_dim),
            };
            let score = match (rows, wide) {
                (true, _) => &kn.score_rows,
                (false, true) => &kn.score_wide,
                (false, false) => &kn.score,
            };
            self.launch(score, (tiles, h, b), SCORE_THREADS, stream, p)?;
        }
        // SELECT_TOPK_FINAL: the final kernel keeps the candidate counter (p.mode = 1).
        let mut pf = *p;
        pf.mode = (stages & SELECT_TOPK_FINAL != 0) as i32;
        if stages & SELECT_TOPK != 0 {
            if multi {
                let blocks = match self.inner.switches.compact_blocks {
                    Some(n) => n.clamp(1, super::workspace::compact_tiles(cfg)),
                    None => super::workspace::compact_blocks(cfg, self.inner.dev.sms.max(1) as u32, b),
                };
                self.launch(&kn.topk_compact, (blocks, h, b), COMPACT_THREADS, stream, p)?;
                self.launch_final(h, b, stream, &pf)?;
            } else {
                self.launch(&kn.topk_stage1, (h, b, 1), TOPK_THREADS, stream, p)?;
            }
        } else if multi && stages & SELECT_TOPK_FINAL != 0 {
            self.launch_final(h, b, stream, &pf)?;
        }
        Ok(())
    }

    /// The stage-1 final select of `b` sequences' rows of `h` KV heads, in clusters of
    /// final_cluster's size (kernels/topk.cu final_select).
    fn launch_final(&self, h: u32, b: u32, stream: CUstream, p: &SikvParams) -> Result<()> {
        let c = self.final_cluster(h * b, p.ws_route != 0);
        let k = self.inner.kernels.topk_final_for(c);
        self.launch_clusters(k, (c * h, b, 1), TOPK_THREADS, c, stream, p)
    }

    /// How many CTAs share a row of the final select (1, 2 or 4): workspace::final_cluster_size
    /// over this device's SMs and occupancy table and SIKV_FINAL_CLUSTER. A one-CTA select ran
    /// the row's bitmap windows (marks, scans, outputs) on one SM of a batch-1 step while the
    /// others idled. `routed`: a routed decode's sparse path.
    fn final_cluster(&self, rows: u32, routed: bool) -> u32 {
        let table = &self.inner.final_clusters;
        let fits = |c: u32| table[c as usize] >= rows.max(1);
        let sms = self.inner.dev.sms.max(1) as u32;
        let forced = self.inner.switches.final_cluster;
        super::workspace::final_cluster_size(rows, sms, forced, routed, fits)
    }

    /// Stage `attend` + `combine` (cpu::attend): attention over the dense set and the selected
    /// positions `sel`; `out`: `[batch][H_q][d]` in the model dtype (16-byte aligned). Hot path.
    #[allow(clippy::too_many_arguments)] // one typed descriptor per kind of memory the stage touches
    pub fn attend(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        out: u64,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.attend_after(cfg, layout, layer, batch, sel, out, ws, stream, Predecessor::Other)
    }

    /// [`attend`](Self::attend), told what the stream runs just before it. After this call's own
    /// [`select`](Self::select) (same stream and workspace, nothing queued between them) the
    /// splits of kept dense entries alone, which read nothing the selection writes, start while
    /// its last kernel runs; after anything else (an append into the same pools, say) they wait.
    #[allow(clippy::too_many_arguments)] // attend's arguments plus its predecessor
    pub fn attend_after(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        out: u64,
        ws: DevWorkspace,
        stream: CUstream,
        before: Predecessor,
    ) -> Result<()> {
        let Some((mut p, w)) = self.attend_params(cfg, layout, layer, batch, sel, out, ws)? else {
            return Ok(());
        };
        self.current()?;
        let b = p.rows as u32;
        self.launch_attend(cfg, &w, &mut p, b, before, stream)?;
        self.launch_combine(cfg, &p, b, stream)
    }

    /// Stage `combine`: merges the partials the attend or attend_dense launch before it wrote.
    fn launch_combine(&self, cfg: &CacheConfig, p: &SikvParams, b: u32, stream: CUstream) -> Result<()> {
        let grid = (cfg.num_q_heads, b, 1);
        self.launch(&self.inner.kernels.combine, grid, COMBINE_THREADS, stream, p)
    }

    /// The sparse attend's launch (its partials; combine follows). `before`: what the stream
    /// runs just before it (attend_after).
    #[allow(clippy::too_many_arguments)] // the launch's inputs and its predecessor
    fn launch_attend(
        &self,
        cfg: &CacheConfig,
        w: &Workspace,
        p: &mut SikvParams,
        b: u32,
        before: Predecessor,
        stream: CUstream,
    ) -> Result<()> {
        let dev = &self.inner.dev;
        let tc = super::workspace::tc_tiles(cfg, dev.major);
        let kept_len = self.kept_split_len(cfg, w, b);
        let kept = super::workspace::kept_splits_of(cfg, kept_len);
        let span = match self.inner.switches.attend_span {
            // A mean-query selection: attend_mean's CUDA-core splits, one ATTEND_SPLIT each.
            _ if p.rows_mean != 0 => 1,
            Some(n) if tc => n.clamp(1, ATTEND_MAX_SPAN),
            _ => super::workspace::attend_span(w, cfg, dev.sms.max(1) as u32, b, tc, kept),
        };
        let splits = w.attend_splits(span, kept);
        p.attend_span = span as i32;
        p.attend_early = (before == Predecessor::Select) as i32;
        p.dense_splits = kept as i32;
        p.kept_split = kept_len as i32;
        p.num_splits = splits as i32;
        let grid = (splits as u32, cfg.num_kv_heads, b);
        let kn = &self.inner.kernels;
        let b4 = super::workspace::code_width4(cfg);
        let attend = match (p.rows_mean != 0, p.row_offsets != 0, b4) {
            (true, _, _) => &kn.attend_mean,
            (false, true, false) => &kn.attend_rows,
            (false, true, true) => &kn.attend_rows_b4,
            (false, false, false) => &kn.attend,
            (false, false, true) => &kn.attend_b4,
        };
        self.launch(attend, grid, ATTEND_THREADS, stream, p)
    }

    /// Kept dense entries per kept split of the sparse attend for a call of `batch` sequences on
    /// this device (workspace::kept_split_len, or the SIKV_KEPT_SPLIT switch).
    fn kept_split_len(&self, cfg: &CacheConfig, w: &Workspace, batch: u32) -> usize {
        let sms = self.inner.dev.sms.max(1) as u32;
        super::workspace::kept_split_len(w, cfg, sms, batch, self.inner.switches.kept_split)
    }

    /// The dense decode's launch (its partials; combine follows). `live_max`: the longest live
    /// sequence where the host knows it; the grid's chunks are then sized from it. Not under a
    /// graph capture, whose replays must keep serving sequences as they grow.
    fn launch_dense(
        &self,
        cfg: &CacheConfig,
        p: &mut SikvParams,
        b: u32,
        live_max: Option<u32>,
        stream: CUstream,
    ) -> Result<()> {
        let live_max = match live_max {
            Some(m) if !driver::is_capturing(cuda_stream(stream))? => Some(m),
            _ => None,
        };
        let len = live_max.map_or(cfg.max_seq_len, |m| m.clamp(1, cfg.max_seq_len)) as usize;
        let sw = &self.inner.switches;
        let sms = self.inner.dev.sms.max(1) as u32;
        let sh = super::workspace::dense_shape(cfg, len, sms, b, sw.kept_split, sw.dense_min_chunk);
        p.num_splits = (sh.kept + sh.chunks) as i32;
        p.dense_splits = sh.kept as i32;
        p.kept_split = sh.kept_len as i32;
        p.dense_chunks = sh.chunks as i32;
        p.dense_min_chunk = sh.floor as i32;
        p.mode = 1;
        let grid = (p.num_splits as u32, cfg.num_kv_heads, b);
        let kn = &self.inner.kernels;
        let dense = if super::workspace::code_width4(cfg) {
            &kn.attend_dense_b4
        } else {
            &kn.attend_dense
        };
        self.launch(dense, grid, ATTEND_THREADS, stream, p)
    }

    /// Dense decode (cpu::attend_dense): every candidate dequantised plus the dense set, no
    /// selection; `out` as for [`attend`](Self::attend). Hot path (the crossover path and our
    /// own baseline). `live_max`: the batch's longest live sequence where the caller knows it
    /// (at most max_seq_len; a managed cache), else None: outside a graph capture the grid's
    /// chunks are then sized from it, so a short sequence under a long max_seq_len launches the
    /// blocks it needs. Every row must be at most `live_max` long.
    #[allow(clippy::too_many_arguments)] // one typed descriptor per kind of memory the stage touches
    pub fn attend_dense(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        out: u64,
        ws: DevWorkspace,
        live_max: Option<u32>,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        Self::one_row_per_sequence(batch, "the dense decode")?;
        let Some((mut p, _)) = self.batch_params(cfg, layout, layer, batch, ws)? else {
            return Ok(());
        };
        dev_ptr(out, 16, "out")?;
        p.out = out;
        self.current()?;
        let b = p.rows as u32;
        self.launch_dense(cfg, &mut p, b, live_max, stream)?;
        self.launch_combine(cfg, &p, b, stream)
    }

    /// Decode with the crossover decided on the device: select + attend, or the dense decode
    /// when the call's live tokens (summed over its sequences) are at most `dense_max_tokens`.
    /// For callers whose page table is on the device: the host cannot see the live lengths,
    /// and a captured graph must follow them as they grow. Every stage of both paths is
    /// launched; the prologue writes the route word and the launches of the other path return
    /// at once (under a graph capture the two paths are parallel branches, so the one that runs
    /// does not wait for the other's returns). `sel` receives the selection when the sparse path
    /// runs. Hot path.
    #[allow(clippy::too_many_arguments)] // attend's arguments plus the crossover
    pub fn decode_routed(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        out: u64,
        ws: DevWorkspace,
        dense_max_tokens: u64,
        stream: CUstream,
    ) -> Result<()> {
        Self::one_row_per_sequence(batch, "the routed decode")?;
        let Some((mut p, w)) = self.attend_params(cfg, layout, layer, batch, sel, out, ws)? else {
            return Ok(());
        };
        self.topk_params(&mut p);
        p.ws_route = ws.ptr + w.route as u64;
        p.route_max_tokens = dense_max_tokens;
        self.current()?;
        let b = p.rows as u32;
        let mut ps = p;
        ps.route_as = ROUTE_SPARSE as i32;
        let fused = self.fused_cluster(SELECT_ALL, cfg, &ps, b);
        // Under a CUDA graph capture the two paths become side-by-side branches, joined at
        // combine: the sparse one after the prologue, the dense one beside it (it sums the live
        // lengths itself). The path that runs then waits for neither the other's launches to
        // start and return one after the other nor, if dense, the prologue. Not with the fused
        // select: its clusters of whole-SM CTAs, started beside the dense decode's blocks only
        // to return, delayed it (8K, batch 1: 27.3 -> 31.4 µs). Outside a capture (or with
        // SIKV_ROUTE_FORK=off) everything stays in stream order.
        let fork = if self.inner.switches.route_fork && fused.is_none() {
            driver::capture_deps(cuda_stream(stream))?
        } else {
            None
        };
        self.launch_prologue(cfg, &p, b, stream)?;
        self.launch_select(SELECT_ALL, cfg, &ps, b, fused, stream)?;
        self.launch_attend(cfg, &w, &mut ps, b, Predecessor::Select, stream)?;
        // The dense branch hangs off what came before the call; combine then waits for both
        // branches. A sparse branch whose end the driver reports as too many nodes keeps stream
        // order.
        let sparse_tail = match fork {
            Some(before) => match driver::capture_deps(cuda_stream(stream))? {
                Some(tail) => {
                    driver::update_capture_deps(cuda_stream(stream), &before, false)?;
                    Some(tail)
                }
                None => None,
            },
            None => None,
        };
        let mut pd = p;
        pd.route_as = ROUTE_DENSE as i32;
        self.launch_dense(cfg, &mut pd, b, None, stream)?;
        if let Some(tail) = sparse_tail {
            driver::update_capture_deps(cuda_stream(stream), &tail, true)?;
        }
        // combine: num_splits is the sparse path's, route_dense_splits the dense one's.
        let mut pc = ps;
        pc.route_as = ROUTE_EITHER as i32;
        pc.route_dense_splits = pd.num_splits;
        self.launch_combine(cfg, &pc, b, stream)
    }
}
