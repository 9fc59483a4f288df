//! The CSR page table of a batch (FlashInfer's form) as host slices: sequence lengths, the
//! page and slot of a position, and the validation every stage that reads a table runs first
//! (shapes, page ids and lengths within the layout's bounds), so the stages index it freely.

use crate::config::CacheConfig;
use crate::ensure;
use crate::layout::Layout;
use crate::status::Result;

/// FlashInfer-style CSR page table of a batch.
#[derive(Clone, Copy)]
pub struct PageTable<'a> {
    /// `batch + 1` offsets into `indices`.
    pub indptr: &'a [i32],
    /// Page ids.
    pub indices: &'a [i32],
    /// Valid tokens in each sequence's last page (1..=page_size; 0 only for an empty sequence).
    pub last_page_len: &'a [i32],
}

impl PageTable<'_> {
    pub fn batch(&self) -> usize {
        self.last_page_len.len()
    }
    /// Length of sequence `b` in tokens.
    pub fn seq_len(&self, b: usize, page_size: usize) -> usize {
        let npages = (self.indptr[b + 1] - self.indptr[b]) as usize;
        if npages == 0 {
            0
        } else {
            (npages - 1) * page_size + self.last_page_len[b] as usize
        }
    }
    /// (page id, slot) of position `pos` of sequence `b`.
    pub fn locate(&self, b: usize, pos: usize, page_size: usize) -> (usize, usize) {
        let page = self.indices[self.indptr[b] as usize + pos / page_size];
        (page as usize, pos % page_size)
    }
    /// Checks shapes and that every page id and length is within the layout's bounds.
    pub fn validate(&self, layout: &Layout, cfg: &CacheConfig) -> Result<()> {
        let batch = self.batch();
        let p = layout.page_size;
        ensure!(
            batch <= cfg.max_batch as usize,
            SIKV_ERR_OUT_OF_BOUNDS,
            "page_table batch = {batch} exceeds max_batch ({})",
            cfg.max_batch
        );
        ensure!(
            self.indptr.len() == batch + 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "page_table.indptr has {} entries, expected batch + 1 = {}",
            self.indptr.len(),
            batch + 1
        );
        ensure!(
            self.indptr[0] == 0,
            SIKV_ERR_INVALID_ARGUMENT,
            "page_table.indptr[0] = {} must be 0",
            self.indptr[0]
        );
        for b in 0..batch {
            ensure!(
                self.indptr[b + 1] >= self.indptr[b],
                SIKV_ERR_INVALID_ARGUMENT,
                "page_table.indptr[{}] = {} is smaller than indptr[{b}] = {}",
                b + 1,
                self.indptr[b + 1],
                self.indptr[b]
            );
        }
        let used = self.indptr[batch] as usize;
        ensure!(
            used <= self.indices.len(),
            SIKV_ERR_INVALID_ARGUMENT,
            "page_table.indptr[{batch}] = {used} exceeds the length of page_table.indices ({})",
            self.indices.len()
        );
        for (j, &id) in self.indices[..used].iter().enumerate() {
            ensure!(
                id >= 0 && (id as usize) < layout.num_pages,
                SIKV_ERR_OUT_OF_BOUNDS,
                "page_table.indices[{j}] = {id} is outside 0..num_pages ({})",
                layout.num_pages
            );
        }
        for b in 0..batch {
            let npages = (self.indptr[b + 1] - self.indptr[b]) as usize;
            let last = self.last_page_len[b];
            if npages == 0 {
                ensure!(
                    last == 0,
                    SIKV_ERR_INVALID_ARGUMENT,
                    "page_table.last_page_len[{b}] = {last} must be 0 for a sequence without pages"
                );
            } else {
                ensure!(
                    last >= 1 && last as usize <= p,
                    SIKV_ERR_INVALID_ARGUMENT,
                    "page_table.last_page_len[{b}] = {last} is outside 1..=page_size ({p})"
                );
                let len = self.seq_len(b, p);
                ensure!(
                    len <= cfg.max_seq_len as usize,
                    SIKV_ERR_OUT_OF_BOUNDS,
                    "sequence {b} of the page table has {len} tokens, more than max_seq_len ({})",
                    cfg.max_seq_len
                );
            }
        }
        Ok(())
    }
}
