//! The managed cache: pools (owned or borrowed), page allocator and sequence slots.
//!
//! Bookkeeping only: sequence ids, slots, page lists and per-layer lengths, the same for every
//! device. Each call turns its sequences into a page table and slot mappings, [`store`] places
//! them where the executor reads them (host slices, or one upload to the device), and the
//! stage [`Executor`] runs the stage, the same one the stateless calls use. Every call
//! validates its whole request before it changes anything, so a failed call leaves the cache
//! as it was.

pub mod allocator;
pub mod device;
pub mod store;

use std::collections::HashMap;

pub use allocator::PageAllocator;
pub use store::{Activations, HostBytes, Output, Pools, Selection, Store};

use crate::config::CacheConfig;
use crate::ensure;
use crate::exec::{Executor, Mem, MemMut};
use crate::layout::Layout;
use crate::status::{Error, Result, SikvStatus};

/// One sequence of the managed cache.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seq {
    slot: u32,
    pages: Vec<u32>,
    /// Tokens stored per layer.
    len: Vec<u32>,
    calibrated: Vec<bool>,
}

pub use crate::exec::Stream;

/// The managed cache (llama.cpp style): sequences by id, pages handed out on demand.
pub struct Cache {
    pub cfg: CacheConfig,
    pub layout: Layout,
    exec: Executor,
    store: Store,
    pages: PageAllocator,
    seqs: HashMap<i64, Seq>,
    free_slots: Vec<u32>,
    /// The last call's page table and seq slots, refilled by the next one ([`Cache::with_table`]):
    /// once grown, a decode call allocates nothing for them.
    table_scratch: (OwnedPageTable, Vec<i32>),
}

/// What a `sikv_cache_info` call reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    pub on_gpu: bool,
    pub num_seqs: u32,
    pub free_pages: u32,
    pub num_pages: u32,
}

impl Cache {
    /// Creates a cache whose pools the library allocates (host memory on the CPU, device
    /// memory on the GPU; allocation happens here only).
    pub fn new(cfg: CacheConfig) -> Result<Cache> {
        Self::on(Executor::create(&cfg, None)?, None)
    }

    /// Creates a cache over pools the engine owns (described by `pools`; where they live
    /// decides where an AUTO cache runs).
    pub fn with_pools(cfg: CacheConfig, pools: Pools) -> Result<Cache> {
        Self::on(Executor::create(&cfg, Some(pools.placement()))?, Some(pools))
    }

    /// Creates a cache on an executor already opened (the C ABI opens it first to learn where
    /// engine-owned pools must live), over `pools` or pools the library allocates.
    pub fn on(exec: Executor, pools: Option<Pools>) -> Result<Cache> {
        let store = Store::create(&exec, pools)?;
        let cfg = exec.cfg().clone();
        Ok(Cache {
            pages: PageAllocator::new(cfg.num_pages),
            free_slots: (0..cfg.max_seqs).rev().collect(),
            seqs: HashMap::new(),
            layout: exec.layout().clone(),
            cfg,
            exec,
            store,
            table_scratch: Default::default(),
        })
    }

    /// Whether the cache runs on a CUDA device.
    pub fn is_gpu(&self) -> bool {
        self.exec.is_gpu()
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            on_gpu: self.exec.is_gpu(),
            num_seqs: self.seqs.len() as u32,
            free_pages: self.pages.free_pages() as u32,
            num_pages: self.pages.num_pages() as u32,
        }
    }

    fn seq(&self, id: i64) -> Result<&Seq> {
        self.seqs.get(&id).ok_or_else(|| {
            Error::new(
                SikvStatus::SIKV_ERR_UNKNOWN_SEQUENCE,
                format!("sequence {id} is not in the cache"),
            )
        })
    }

    fn check_layer(&self, layer: u32) -> Result<()> {
        ensure!(
            layer < self.cfg.num_layers,
            SIKV_ERR_OUT_OF_BOUNDS,
            "layer = {layer} is outside 0..num_layers ({})",
            self.cfg.num_layers
        );
        Ok(())
    }

    /// Tokens stored for `id` at `layer`.
    pub fn seq_len(&self, id: i64, layer: u32) -> Result<u32> {
        self.check_layer(layer)?;
        Ok(self.seq(id)?.len[layer as usize])
    }

    pub fn add_seq(&mut self, id: i64) -> Result<()> {
        ensure!(
            !self.seqs.contains_key(&id),
            SIKV_ERR_SEQUENCE_EXISTS,
            "sequence {id} already exists"
        );
        ensure!(
            !self.free_slots.is_empty(),
            SIKV_ERR_OUT_OF_BOUNDS,
            "all max_seqs = {} sequence slots are in use",
            self.cfg.max_seqs
        );
        let slot = *self.free_slots.last().unwrap();
        self.store.reset_slot(&self.exec, slot)?;
        self.free_slots.pop();
        let layers = self.cfg.num_layers as usize;
        self.seqs.insert(
            id,
            Seq {
                slot,
                pages: Vec::new(),
                len: vec![0; layers],
                calibrated: vec![false; layers],
            },
        );
        Ok(())
    }

    pub fn remove_seq(&mut self, id: i64) -> Result<()> {
        let seq = self.seq(id)?.clone();
        self.pages.release(&seq.pages);
        self.free_slots.push(seq.slot);
        self.seqs.remove(&id);
        Ok(())
    }

    /// Forks `src` into a new sequence `dst`: pages full at every layer are shared, the rest
    /// are copied, and the per-sequence state (centre, codebook, dense set) is copied.
    pub fn fork_seq(&mut self, src: i64, dst: i64) -> Result<()> {
        let s = self.seq(src)?.clone();
        ensure!(
            !self.seqs.contains_key(&dst),
            SIKV_ERR_SEQUENCE_EXISTS,
            "sequence {dst} already exists"
        );
        ensure!(
            !self.free_slots.is_empty(),
            SIKV_ERR_OUT_OF_BOUNDS,
            "all max_seqs = {} sequence slots are in use",
            self.cfg.max_seqs
        );
        let p = self.cfg.page_size;
        let min_len = s.len.iter().copied().min().unwrap_or(0);
        let shared = (min_len / p) as usize;
        let copied = s.pages.len() - shared.min(s.pages.len());
        let fresh = self.pages.alloc(copied)?;
        let slot = *self.free_slots.last().unwrap();
        let copies: Vec<(u32, u32)> = s.pages[shared..].iter().copied().zip(fresh.iter().copied()).collect();
        if let Err(e) = self.store.copy_seq(&self.layout, s.slot, slot, &copies) {
            self.pages.release(&fresh);
            return Err(e);
        }
        self.free_slots.pop();
        for &pg in &s.pages[..shared] {
            self.pages.share(pg);
        }
        let mut pages = s.pages[..shared].to_vec();
        pages.extend(fresh);
        self.seqs.insert(
            dst,
            Seq {
                slot,
                pages,
                len: s.len.clone(),
                calibrated: s.calibrated.clone(),
            },
        );
        Ok(())
    }

    /// Pages `id` needs to hold `len` tokens, beyond those it has.
    fn pages_needed(&self, seq: &Seq, len: u32) -> usize {
        (len.div_ceil(self.cfg.page_size) as usize).saturating_sub(seq.pages.len())
    }

    fn slot_of(&self, seq: &Seq, pos: u32) -> i64 {
        let p = self.cfg.page_size;
        seq.pages[(pos / p) as usize] as i64 * p as i64 + (pos % p) as i64
    }

    /// Calibrates `id` at `layer` from its prompt (`n` tokens of post-RoPE `k` and `v`,
    /// `[n][H_kv][d]`, and the last `nq` prompt queries `[nq][H_q][d]`) and stores the prompt.
    #[allow(clippy::too_many_arguments)] // the prompt's arrays and sizes, as the C export passes them
    pub fn calibrate(
        &mut self,
        layer: u32,
        id: i64,
        n: u32,
        k: Activations,
        v: Activations,
        nq: u32,
        q_tail: Activations,
        stream: Stream,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let seq = self.seq(id)?.clone();
        let l = layer as usize;
        ensure!(
            !seq.calibrated[l],
            SIKV_ERR_ALREADY_CALIBRATED,
            "sequence {id} is already calibrated at layer {layer}"
        );
        ensure!(
            seq.len[l] == 0,
            SIKV_ERR_INVALID_ARGUMENT,
            "sequence {id} already holds {} tokens at layer {layer}; calibrate first",
            seq.len[l]
        );
        ensure!(n >= 1, SIKV_ERR_INVALID_ARGUMENT, "n_tokens must be >= 1");
        ensure!(
            n <= self.cfg.max_seq_len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_tokens = {n} exceeds max_seq_len = {}",
            self.cfg.max_seq_len
        );
        ensure!(
            nq >= 1 && nq <= n,
            SIKV_ERR_INVALID_ARGUMENT,
            "n_query = {nq} must be in 1..=n_tokens ({n})"
        );
        let fresh = self.pages.alloc(self.pages_needed(&seq, n))?;
        let mut grown = seq.clone();
        grown.pages.extend(&fresh);
        let slots: Vec<i64> = (0..n).map(|t| self.slot_of(&grown, t)).collect();
        let res = self
            .store
            .calibrate(&self.exec, layer, grown.slot, n, k, v, nq, q_tail, &slots, stream);
        if let Err(e) = res {
            self.pages.release(&fresh);
            return Err(e);
        }
        grown.len[l] = n;
        grown.calibrated[l] = true;
        self.seqs.insert(id, grown);
        Ok(())
    }

    /// Appends `counts[i]` tokens to sequence `ids[i]` at `layer`; `k`, `v` hold the tokens of
    /// all sequences in order, `[sum(counts)][H_kv][d]`.
    pub fn append(
        &mut self,
        layer: u32,
        ids: &[i64],
        counts: &[u32],
        k: Activations,
        v: Activations,
        stream: Stream,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let l = layer as usize;
        ensure!(
            ids.len() == counts.len(),
            SIKV_ERR_INVALID_ARGUMENT,
            "seq_ids and token counts differ in length"
        );
        ensure!(!ids.is_empty(), SIKV_ERR_INVALID_ARGUMENT, "n_seqs must be >= 1");
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        ensure!(
            total <= self.cfg.max_append_tokens as u64,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_tokens add up to {total} tokens, over max_append_tokens = {}",
            self.cfg.max_append_tokens
        );
        ensure!(total >= 1, SIKV_ERR_INVALID_ARGUMENT, "no tokens to append");
        let mut need = 0usize;
        let mut seqs = Vec::with_capacity(ids.len());
        for (i, (&id, &c)) in ids.iter().zip(counts).enumerate() {
            ensure!(
                !ids[..i].contains(&id),
                SIKV_ERR_INVALID_ARGUMENT,
                "sequence {id} appears twice in seq_ids"
            );
            let s = self.seq(id)?;
            ensure!(
                s.calibrated[l],
                SIKV_ERR_NOT_CALIBRATED,
                "sequence {id} is not calibrated at layer {layer}"
            );
            let new_len = s.len[l] as u64 + c as u64;
            ensure!(
                new_len <= self.cfg.max_seq_len as u64,
                SIKV_ERR_OUT_OF_BOUNDS,
                "sequence {id} would hold {new_len} tokens, over max_seq_len = {}",
                self.cfg.max_seq_len
            );
            need += self.pages_needed(s, new_len as u32);
            seqs.push(s.clone());
        }
        ensure!(
            need <= self.pages.free_pages(),
            SIKV_ERR_OUT_OF_PAGES,
            "page pool exhausted: {need} pages needed, {} free of {}",
            self.pages.free_pages(),
            self.pages.num_pages()
        );
        let mut fresh_all = Vec::new();
        let mut slots = Vec::with_capacity(total as usize);
        let mut seq_slot = Vec::with_capacity(total as usize);
        let mut position = Vec::with_capacity(total as usize);
        for (s, &c) in seqs.iter_mut().zip(counts) {
            let new_len = s.len[l] + c;
            let fresh = self.pages.alloc(self.pages_needed(s, new_len))?;
            s.pages.extend(&fresh);
            fresh_all.extend(fresh);
            for pos in s.len[l]..new_len {
                slots.push(self.slot_of(s, pos));
                seq_slot.push(s.slot as i32);
                position.push(pos as i32);
            }
            s.len[l] = new_len;
        }
        if let Err(e) = self
            .store
            .append(&self.exec, layer, k, v, &slots, &seq_slot, &position, stream)
        {
            self.pages.release(&fresh_all);
            return Err(e);
        }
        for (&id, s) in ids.iter().zip(seqs) {
            self.seqs.insert(id, s);
        }
        Ok(())
    }

    /// Sparse decode attention at `layer` for one query token per sequence:
    /// `q` `[n_seqs][H_q][d]` → `out` `[n_seqs][H_q][d]`.
    pub fn attend(&mut self, layer: u32, ids: &[i64], q: Activations, out: Output, stream: Stream) -> Result<()> {
        self.with_table(layer, ids, |c, table, slots| {
            let sel = if c.below_crossover(layer, ids) {
                Selection::All
            } else {
                Selection::Select
            };
            c.store.attend(&c.exec, layer, table, slots, q, out, sel, stream)
        })
    }

    /// Select + attend for several new tokens per sequence (`rows[i]` for `ids[i]`, 1..=16,
    /// appended before the call), causal among them: `q`, `out` `[sum rows][H_q][d]`. Always
    /// selects (the dense crossover does not apply). A CUDA cache's workspace holds max_batch
    /// query rows: a larger call runs as consecutive groups of whole sequences on the stream
    /// (the same outputs, since every selection is made per row or per sequence), and a
    /// sequence alone may bring at most max_batch rows.
    pub fn attend_rows(
        &mut self,
        layer: u32,
        ids: &[i64],
        rows: &[u32],
        q: Activations,
        out: Output,
        stream: Stream,
    ) -> Result<()> {
        self.with_table(layer, ids, |c, table, slots| {
            let mut out = out;
            let total = crate::cpu::rows_total(rows, slots.len())?;
            let cap = c.cfg.max_batch as usize;
            if !c.is_gpu() || total <= cap {
                return c.store.attend_rows(&c.exec, layer, table, slots, q, rows, out, stream);
            }
            let groups = row_groups(rows, cap)?;
            let row_bytes = (c.cfg.num_q_heads * c.cfg.head_dim) as usize * c.cfg.dtype.size();
            let bytes = total * row_bytes;
            let q_len = match q {
                Mem::Host(h) => Some(h.len()),
                Mem::Device(_) => None,
            };
            let out_len = match &out {
                MemMut::Host(h) => Some(h.len()),
                MemMut::Device(_) => None,
            };
            for (what, len) in [("q", q_len), ("out", out_len)] {
                ensure!(
                    !matches!(len, Some(n) if n < bytes),
                    SIKV_ERR_BUFFER_TOO_SMALL,
                    "`{what}` holds {} bytes, {bytes} needed",
                    len.unwrap_or(0)
                );
            }
            let mut at = 0usize;
            for g in groups {
                let n: usize = rows[g.clone()].iter().map(|&r| r as usize).sum();
                let span = at * row_bytes..(at + n) * row_bytes;
                let qg = match q {
                    Mem::Host(h) => Mem::Host(&h[span.clone()]),
                    Mem::Device(p) => Mem::Device(p + span.start as u64),
                };
                let og = match &mut out {
                    MemMut::Host(h) => MemMut::Host(&mut h[span.clone()]),
                    MemMut::Device(p) => MemMut::Device(*p + span.start as u64),
                };
                let part = table.sequences(g.clone());
                c.store
                    .attend_rows(&c.exec, layer, &part, &slots[g.clone()], qg, &rows[g], og, stream)?;
                at += n;
            }
            Ok(())
        })
    }

    /// Sparse decode attention over a selection the caller made instead of the library's:
    /// `indices` `[n_seqs][H_kv][budget_max]` (the first `counts[..]` of each row, ascending
    /// candidate positions), `counts` `[n_seqs][H_kv]`, host memory. The dense set is attended
    /// as always, and the crossover does not apply: the caller asked for this selection.
    #[allow(clippy::too_many_arguments)] // the caller's selection and the call's arrays, as the C export passes them
    pub fn attend_selected(
        &mut self,
        layer: u32,
        ids: &[i64],
        q: Activations,
        indices: &[i32],
        counts: &[i32],
        out: Output,
        stream: Stream,
    ) -> Result<()> {
        self.with_table(layer, ids, |c, table, slots| {
            let rows = ids.len() * c.cfg.num_kv_heads as usize;
            let kmax = c.cfg.budget.max as usize;
            ensure!(
                indices.len() >= rows * kmax,
                SIKV_ERR_BUFFER_TOO_SMALL,
                "indices has {} entries, n_seqs x num_kv_heads x budget_max = {} needed",
                indices.len(),
                rows * kmax
            );
            ensure!(
                counts.len() >= rows,
                SIKV_ERR_BUFFER_TOO_SMALL,
                "counts has {} entries, n_seqs x num_kv_heads = {rows} needed",
                counts.len()
            );
            let (indices, counts) = (&indices[..rows * kmax], &counts[..rows]);
            c.check_selection(layer, ids, indices, counts, stream)?;
            let sel = Selection::Given { indices, counts };
            c.store.attend(&c.exec, layer, table, slots, q, out, sel, stream)
        })
    }

    /// Every row of a caller's selection holds `0..=budget_max` strictly ascending candidate
    /// positions of its (sequence, KV head): below the length, and neither sink, heavy nor
    /// window (the geometry of `cpu::expected_candidates`).
    fn check_selection(&self, layer: u32, ids: &[i64], indices: &[i32], counts: &[i32], stream: Stream) -> Result<()> {
        let hk = self.cfg.num_kv_heads as usize;
        let kmax = self.cfg.budget.max as usize;
        let (s, nh, w) = (
            self.cfg.n_sink as i64,
            self.cfg.n_heavy as usize,
            self.cfg.n_window as i64,
        );
        let st = &self.layout.state;
        // Heavy positions are written by calibrate, which may still be queued on the stream.
        self.store.synchronize(stream)?;
        for (b, &id) in ids.iter().enumerate() {
            let seq = self.seq(id)?;
            let len = seq.len[layer as usize] as i64;
            let win_lo = s.max(len - w);
            for head in 0..hk {
                let r = b * hk + head;
                let c = counts[r];
                ensure!(
                    c >= 0 && c as usize <= kmax,
                    SIKV_ERR_OUT_OF_BOUNDS,
                    "counts[{r}] = {c} (sequence {id}, KV head {head}) is outside 0..=budget_max ({kmax})"
                );
                if c == 0 {
                    continue;
                }
                let mut heavy: Vec<i64> = Vec::with_capacity(nh);
                if nh > 0 {
                    let rec = self.store.read_state(&self.layout, layer, seq.slot, head as u32)?;
                    heavy.extend(
                        (s as usize..s as usize + nh)
                            .map(|e| crate::numeric::read_i32(&rec[st.dense_pos..], e) as i64)
                            .filter(|&p| p >= 0),
                    );
                    heavy.sort_unstable();
                }
                let mut prev = -1i64;
                for (j, &p) in indices[r * kmax..r * kmax + c as usize].iter().enumerate() {
                    let (at, p) = (r * kmax + j, p as i64);
                    let which = || format!("indices[{at}] = {p} (sequence {id}, KV head {head})");
                    ensure!(
                        (0..len).contains(&p),
                        SIKV_ERR_OUT_OF_BOUNDS,
                        "{} is outside 0..len ({len})",
                        which()
                    );
                    ensure!(
                        j == 0 || p != prev,
                        SIKV_ERR_INVALID_ARGUMENT,
                        "{} repeats the previous index; a row must be strictly ascending",
                        which()
                    );
                    ensure!(
                        j == 0 || p > prev,
                        SIKV_ERR_INVALID_ARGUMENT,
                        "{} is below the previous index {prev}; a row must be strictly ascending",
                        which()
                    );
                    ensure!(
                        p >= s,
                        SIKV_ERR_INVALID_ARGUMENT,
                        "{} is a sink (0..{s}), attended anyway; select candidates only",
                        which()
                    );
                    ensure!(
                        p < win_lo,
                        SIKV_ERR_INVALID_ARGUMENT,
                        "{} is in the recent window ({win_lo}..{len}), attended anyway; select candidates only",
                        which()
                    );
                    ensure!(
                        heavy.binary_search(&p).is_err(),
                        SIKV_ERR_INVALID_ARGUMENT,
                        "{} is a heavy token, attended anyway; select candidates only",
                        which()
                    );
                    prev = p;
                }
            }
        }
        Ok(())
    }

    /// Whether the call's sequences hold few enough tokens together for the dense decode
    /// (`dense_crossover`: its time follows the tokens read, the sparse step's hardly does).
    fn below_crossover(&self, layer: u32, ids: &[i64]) -> bool {
        let mut total = 0u64;
        for id in ids {
            match self.seqs.get(id) {
                Some(s) => total += s.len[layer as usize] as u64,
                None => return false,
            }
        }
        self.cfg.dense_crossover.dense(ids.len() as u32, total)
    }

    /// Dense decode attention over every stored token (dequantised), no selection.
    pub fn attend_dense(&mut self, layer: u32, ids: &[i64], q: Activations, out: Output, stream: Stream) -> Result<()> {
        self.with_table(layer, ids, |c, table, slots| {
            c.store
                .attend(&c.exec, layer, table, slots, q, out, Selection::All, stream)
        })
    }

    /// The selection the sparse path would make: `indices` `[n_seqs][H_kv][budget_max]`
    /// (ascending positions, -1 after the count), `counts` `[n_seqs][H_kv]`. Host memory.
    pub fn select(
        &mut self,
        layer: u32,
        ids: &[i64],
        q: Activations,
        indices: &mut [i32],
        counts: &mut [i32],
        stream: Stream,
    ) -> Result<()> {
        self.with_table(layer, ids, |c, table, slots| {
            c.store.select(&c.exec, layer, table, slots, q, indices, counts, stream)
        })
    }

    /// Positions each (sequence, KV head) attends for query `q`: the valid dense entries
    /// (sinks, heavy, window) and the selected tokens, ascending. `[seq][kv head][..]`.
    /// Telemetry: on a GPU this reads back and synchronises.
    pub fn attended_positions(
        &mut self,
        layer: u32,
        ids: &[i64],
        q: Activations,
        stream: Stream,
    ) -> Result<Vec<Vec<Vec<u32>>>> {
        let h = self.cfg.num_kv_heads as usize;
        let kmax = self.cfg.budget.max as usize;
        let mut idx = vec![-1i32; ids.len() * h * kmax];
        let mut cnt = vec![0i32; ids.len() * h];
        self.select(layer, ids, q, &mut idx, &mut cnt, stream)?;
        let (s, w) = (self.cfg.n_sink as i64, self.cfg.n_window as i64);
        let mut all = Vec::with_capacity(ids.len());
        for (b, &id) in ids.iter().enumerate() {
            let seq = self.seq(id)?.clone();
            let len = seq.len[layer as usize] as i64;
            let win_lo = s.max(len - w);
            let mut per_head = Vec::with_capacity(h);
            for head in 0..h {
                let rec = self.store.read_state(&self.layout, layer, seq.slot, head as u32)?;
                let st = &self.layout.state;
                let mut set: Vec<u32> = Vec::new();
                for e in 0..st.dense_capacity {
                    let p = crate::numeric::read_i32(&rec[st.dense_pos..], e) as i64;
                    if p < 0 || p >= len {
                        continue;
                    }
                    let is_sink = (e as i64) < s;
                    let is_heavy = !is_sink && (e as i64) < s + self.cfg.n_heavy as i64;
                    if is_sink || is_heavy || p >= win_lo {
                        set.push(p as u32);
                    }
                }
                let row = (b * h + head) * kmax;
                set.extend(idx[row..row + cnt[b * h + head] as usize].iter().map(|&x| x as u32));
                set.sort_unstable();
                set.dedup();
                per_head.push(set);
            }
            all.push(per_head);
        }
        Ok(all)
    }

    /// Runs `f` with the page table and seq slots of `ids` at `layer`, built in the buffers the
    /// cache keeps between calls (`table_scratch`), which it gets back whatever `f` returns.
    fn with_table<R>(
        &mut self,
        layer: u32,
        ids: &[i64],
        f: impl FnOnce(&mut Self, &OwnedPageTable, &[i32]) -> Result<R>,
    ) -> Result<R> {
        let (mut t, mut slots) = std::mem::take(&mut self.table_scratch);
        let r = self
            .fill_table(layer, ids, &mut t, &mut slots)
            .and_then(|()| f(self, &t, &slots));
        self.table_scratch = (t, slots);
        r
    }

    /// The page table and seq slots of `ids` at `layer` into `t` and `slots` (cleared first),
    /// after checking the call's sequences.
    fn fill_table(&self, layer: u32, ids: &[i64], t: &mut OwnedPageTable, slots: &mut Vec<i32>) -> Result<()> {
        self.check_layer(layer)?;
        let l = layer as usize;
        ensure!(!ids.is_empty(), SIKV_ERR_INVALID_ARGUMENT, "n_seqs must be >= 1");
        ensure!(
            ids.len() <= self.cfg.max_batch as usize,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_seqs = {} exceeds max_batch = {}",
            ids.len(),
            self.cfg.max_batch
        );
        let p = self.cfg.page_size;
        t.indptr.clear();
        t.indices.clear();
        t.last_page_len.clear();
        slots.clear();
        t.indptr.push(0);
        for (i, &id) in ids.iter().enumerate() {
            ensure!(
                !ids[..i].contains(&id),
                SIKV_ERR_INVALID_ARGUMENT,
                "sequence {id} appears twice in seq_ids"
            );
            let s = self.seq(id)?;
            ensure!(
                s.calibrated[l],
                SIKV_ERR_NOT_CALIBRATED,
                "sequence {id} is not calibrated at layer {layer}"
            );
            let len = s.len[l];
            let np = len.div_ceil(p) as usize;
            t.indices.extend(s.pages[..np].iter().map(|&x| x as i32));
            t.indptr.push(t.indices.len() as i32);
            t.last_page_len.push(if len == 0 {
                0
            } else {
                (len - (np as u32 - 1) * p) as i32
            });
            slots.push(s.slot as i32);
        }
        Ok(())
    }

    /// A 64-bit FNV-1a digest of every pool byte and of the bookkeeping: equal digests before
    /// and after a failed call show the call changed nothing.
    pub fn checksum(&self) -> Result<u64> {
        let mut h = Fnv::new();
        self.store.hash_pools(&self.layout, &mut h)?;
        let mut ids: Vec<&i64> = self.seqs.keys().collect();
        ids.sort();
        for id in ids {
            let s = &self.seqs[id];
            h.write(&id.to_le_bytes());
            h.write(&s.slot.to_le_bytes());
            for &p in &s.pages {
                h.write(&p.to_le_bytes());
            }
            for &n in &s.len {
                h.write(&n.to_le_bytes());
            }
            for &c in &s.calibrated {
                h.write(&[c as u8]);
            }
        }
        h.write(&(self.pages.free_pages() as u64).to_le_bytes());
        Ok(h.finish())
    }
}

/// Consecutive groups of whole sequences whose query rows fit `cap` each (greedy, in call
/// order); an error when one sequence alone brings more.
fn row_groups(rows: &[u32], cap: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let mut groups = Vec::new();
    let (mut start, mut n) = (0usize, 0usize);
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        ensure!(
            r <= cap,
            SIKV_ERR_OUT_OF_BOUNDS,
            "rows[{i}] = {r} exceeds max_batch ({cap}): a CUDA cache's workspace and selection hold max_batch query rows"
        );
        if n + r > cap {
            groups.push(start..i);
            (start, n) = (i, 0);
        }
        n += r;
    }
    groups.push(start..rows.len());
    Ok(groups)
}

/// A page table built on the host for one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedPageTable {
    pub indptr: Vec<i32>,
    pub indices: Vec<i32>,
    pub last_page_len: Vec<i32>,
}

impl OwnedPageTable {
    /// The table as the stages read it.
    pub fn view(&self) -> crate::cpu::PageTable<'_> {
        crate::cpu::PageTable {
            indptr: &self.indptr,
            indices: &self.indices,
            last_page_len: &self.last_page_len,
        }
    }

    /// The longest sequence's length in tokens (0 for an empty table).
    pub fn longest(&self, page_size: u32) -> u32 {
        let t = self.view();
        (0..t.batch())
            .map(|b| t.seq_len(b, page_size as usize))
            .max()
            .unwrap_or(0) as u32
    }

    /// The table of sequences `seqs` alone (their pages, indptr from 0).
    pub fn sequences(&self, seqs: std::ops::Range<usize>) -> OwnedPageTable {
        let (a, b) = (self.indptr[seqs.start], self.indptr[seqs.end]);
        OwnedPageTable {
            indptr: self.indptr[seqs.start..=seqs.end].iter().map(|&x| x - a).collect(),
            indices: self.indices[a as usize..b as usize].to_vec(),
            last_page_len: self.last_page_len[seqs].to_vec(),
        }
    }
}

/// 64-bit FNV-1a.
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

/// Oracle-mass recall per KV head of the selection `cache` makes for `q` (host f32
/// `[H_q][d]`), given the sequence's exact keys (host f32 `[len][H_kv][d]`).
pub fn telemetry_recall(cache: &mut Cache, layer: u32, id: i64, q: &[f32], k_exact: &[f32]) -> Result<Vec<f32>> {
    let (hq, hk, d) = (
        cache.cfg.num_q_heads as usize,
        cache.cfg.num_kv_heads as usize,
        cache.cfg.head_dim as usize,
    );
    let g = hq / hk;
    let len = k_exact.len() / (hk * d);
    let mut qbytes = vec![0u8; q.len() * cache.cfg.dtype.size()];
    crate::numeric::from_f32(cache.cfg.dtype, q, &mut qbytes);
    // Host bytes are staged to the device by a GPU backend.
    let q_act = Activations::Host(&qbytes);
    let sets = cache.attended_positions(layer, &[id], q_act, std::ptr::null_mut())?;
    let mut out = Vec::with_capacity(hk);
    for h in 0..hk {
        let keys: Vec<f32> = (0..len)
            .flat_map(|t| k_exact[(t * hk + h) * d..(t * hk + h + 1) * d].iter().copied())
            .collect();
        let mut acc = 0.0f64;
        for i in 0..g {
            let qg = &q[(h * g + i) * d..(h * g + i + 1) * d];
            let w = crate::telemetry::exact_weights(qg, &keys, d, cache.cfg.softmax_scale);
            acc += crate::telemetry::mass_recall(&w, &sets[0][h]);
        }
        out.push((acc / g as f64) as f32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{row_groups, Activations, Cache, Output, OwnedPageTable};
    use crate::config::*;

    /// Decode calls refill the page table the cache keeps (no new buffers once grown), also
    /// after a call that failed on its sequences, and give the same outputs as before.
    #[test]
    fn decode_calls_reuse_the_page_table_buffers() {
        let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
        c.device = SIKV_DEVICE_CPU;
        c.dtype = SIKV_DTYPE_F32;
        (c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) = (1, 4, 2, 64);
        (c.page_size, c.max_seqs, c.max_batch, c.max_seq_len, c.max_append_tokens) = (16, 2, 2, 1024, 1024);
        (c.n_sink, c.n_heavy, c.n_window, c.budget_min, c.budget_max) = (2, 4, 8, 8, 16);
        let mut cache = Cache::new(CacheConfig::from_c(&c).unwrap()).unwrap();
        let bytes = |n: usize, salt: u32| -> Vec<u8> {
            (0..n)
                .flat_map(|i| {
                    ((((i as u32).wrapping_mul(2654435761) ^ salt) % 2000) as f32 / 1000.0 - 1.0).to_le_bytes()
                })
                .collect()
        };
        let null = std::ptr::null_mut();
        for (id, n) in [(1i64, 70usize), (2, 45)] {
            cache.add_seq(id).unwrap();
            let (k, v, q) = (bytes(n * 2 * 64, 1), bytes(n * 2 * 64, 2), bytes(4 * 64, 3));
            let (k, v, q) = (Activations::Host(&k), Activations::Host(&v), Activations::Host(&q));
            cache.calibrate(0, id, n as u32, k, v, 1, q, null).unwrap();
        }
        let q = bytes(2 * 4 * 64, 4);
        let run = |cache: &mut Cache| {
            let mut out = vec![0u8; 2 * 4 * 64 * 4];
            cache
                .attend(0, &[1, 2], Activations::Host(&q), Output::Host(&mut out), null)
                .unwrap();
            out
        };
        let first = run(&mut cache);
        let buf = |c: &Cache| (c.table_scratch.0.indices.as_ptr(), c.table_scratch.1.as_ptr());
        let kept = buf(&cache);
        assert_eq!(cache.table_scratch.0.indptr, [0, 5, 8]);
        assert_eq!(cache.table_scratch.1.len(), 2);
        // Blocks of the buffers' sizes held meanwhile: a call that dropped its buffers and made
        // new ones would not get the same addresses back.
        let hold = (
            Vec::<i32>::with_capacity(cache.table_scratch.0.indices.capacity()),
            Vec::<i32>::with_capacity(cache.table_scratch.1.capacity()),
        );
        assert_eq!(run(&mut cache), first);
        assert_eq!(buf(&cache), kept, "the second call made new buffers");
        let mut out = vec![0u8; 2 * 4 * 64 * 4];
        assert!(cache
            .attend(0, &[1, 7], Activations::Host(&q), Output::Host(&mut out), null)
            .is_err());
        assert_eq!(buf(&cache), kept, "a failed call lost the buffers");
        assert_eq!(run(&mut cache), first);
        drop(hold);
    }

    #[test]
    fn longest_sequence_of_a_table() {
        // Pages of 16: 2 pages with 5 in the last (21), 1 full page (16), 3 pages with 1 (33),
        // and an empty sequence.
        let t = OwnedPageTable {
            indptr: vec![0, 2, 3, 6, 6],
            indices: vec![7, 4, 9, 1, 2, 3],
            last_page_len: vec![5, 16, 1, 0],
        };
        assert_eq!(t.longest(16), 33);
        assert_eq!(t.sequences(0..2).longest(16), 21);
        assert_eq!(t.sequences(3..4).longest(16), 0);
    }

    #[test]
    fn a_table_of_some_sequences_is_theirs_alone() {
        // Three sequences of 2, 1 and 3 pages (page_table concatenates them in call order).
        let t = OwnedPageTable {
            indptr: vec![0, 2, 3, 6],
            indices: vec![7, 4, 9, 1, 2, 3],
            last_page_len: vec![5, 16, 1],
        };
        let mid = OwnedPageTable {
            indptr: vec![0, 1, 4],
            indices: vec![9, 1, 2, 3],
            last_page_len: vec![16, 1],
        };
        assert_eq!(t.sequences(1..3), mid);
        let first = OwnedPageTable {
            indptr: vec![0, 2],
            indices: vec![7, 4],
            last_page_len: vec![5],
        };
        assert_eq!(t.sequences(0..1), first);
        assert_eq!(t.sequences(0..3), t);
    }

    #[test]
    fn row_groups_fill_the_workspace_in_call_order() {
        assert_eq!(row_groups(&[2, 3, 2], 3).unwrap(), vec![0..1, 1..2, 2..3]);
        assert_eq!(row_groups(&[1, 1, 1, 1], 3).unwrap(), vec![0..3, 3..4]);
        assert_eq!(row_groups(&[4, 4, 4], 4).unwrap(), vec![0..1, 1..2, 2..3]);
        assert_eq!(row_groups(&[1, 2, 1], 4).unwrap(), vec![0..3]);
        let e = row_groups(&[1, 5], 4).unwrap_err();
        assert!(e.message.contains("rows[1] = 5 exceeds max_batch (4)"), "{e}");
    }
}
