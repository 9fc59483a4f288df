//! The argument block every kernel takes by value: `SikvParams` of `kernels/common.cuh`,
//! mirrored field for field (64-bit fields first, then 32-bit ones, so C and Rust agree without
//! padding). `sikv_params_layout` (encode.cu) reports the C layout; a test compares it with
//! [`layout_probe`].

use crate::config::{CacheConfig, Centre, Selector, SignPredicate};
use crate::layout::{Layout, SIKV_NUM_PLANES};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SikvParams {
    pub plane: [u64; SIKV_NUM_PLANES],
    pub state: u64,
    pub indptr: u64,
    pub page_indices: u64,
    pub last_page_len: u64,
    pub seq_slot: u64,
    pub position: u64,
    pub slot_mapping: u64,
    pub k: u64,
    pub v: u64,
    pub q: u64,
    pub out: u64,
    pub indices: u64,
    pub counts: u64,
    pub ws_keys: u64,
    pub ws_list: u64,
    pub ws_list_n: u64,
    pub ws_keys2: u64,
    pub ws_part_acc: u64,
    pub ws_part_ml: u64,
    pub ws_qbar: u64,
    pub ws_rank: u64,
    pub ws_hist: u64,
    pub ws_cand: u64,

    pub row_bytes: [i32; SIKV_NUM_PLANES],
    pub num_kv_heads: i32,
    pub group: i32,
    pub head_dim: i32,
    pub page_size: i32,
    pub num_pages: i32,
    pub key_bits: i32,
    pub value_bits: i32,
    pub state_bytes: i32,
    pub off_centre: i32,
    pub off_scale: i32,
    pub off_inv_scale: i32,
    pub off_qmed: i32,
    pub off_codebook: i32,
    pub off_meta: i32,
    pub off_dense_pos: i32,
    pub off_dense_k: i32,
    pub off_dense_v: i32,
    pub dense_cap: i32,
    pub n_sink: i32,
    pub n_heavy: i32,
    pub n_window: i32,
    pub max_seqs: i32,
    pub max_seq_len: i32,
    pub batch: i32,
    pub n_tokens: i32,
    pub nq: i32,
    pub calib_slot: i32,
    pub mode: i32,
    pub budget_min: i32,
    pub budget_max: i32,
    pub budget_ratio: f32,
    pub rerank_factor: i32,
    pub stage1_max: i32,
    pub key_stride: i32,
    pub selector: i32,
    pub sign_positive: i32,
    pub force_generated: i32,
    pub centre_mean: i32,
    pub softmax_scale: f32,
    pub num_splits: i32,
    pub dense_splits: i32,
    pub dense_chunk: i32,
    pub cand_cap: i32,
    pub topk_multi: i32,
    pub pad_: i32,
}

/// `[sizeof, offsetof(ws_rank), offsetof(row_bytes), offsetof(off_dense_v),
/// offsetof(budget_ratio), offsetof(softmax_scale), offsetof(dense_chunk)]` of the Rust struct,
/// in the order `sikv_params_layout` writes them for the C one.
pub fn layout_probe() -> [i32; 7] {
    let p = SikvParams::default();
    let base = &p as *const SikvParams as usize;
    let off = |f: usize| (f - base) as i32;
    [
        std::mem::size_of::<SikvParams>() as i32,
        off(&p.ws_rank as *const u64 as usize),
        off(&p.row_bytes as *const i32 as usize),
        off(&p.off_dense_v as *const i32 as usize),
        off(&p.budget_ratio as *const f32 as usize),
        off(&p.softmax_scale as *const f32 as usize),
        off(&p.dense_chunk as *const i32 as usize),
    ]
}

impl SikvParams {
    /// Everything that follows from the configuration and layout alone.
    pub fn from_config(cfg: &CacheConfig, layout: &Layout) -> SikvParams {
        let st = &layout.state;
        let mut p = SikvParams::default();
        for (i, r) in layout.format.row_bytes.iter().enumerate() {
            p.row_bytes[i] = *r as i32;
        }
        p.num_kv_heads = cfg.num_kv_heads as i32;
        p.group = cfg.group_size() as i32;
        p.head_dim = cfg.head_dim as i32;
        p.page_size = cfg.page_size as i32;
        p.num_pages = layout.num_pages as i32;
        p.key_bits = cfg.key_bits as i32;
        p.value_bits = cfg.value_bits as i32;
        p.state_bytes = st.bytes as i32;
        p.off_centre = st.centre as i32;
        p.off_scale = st.scale as i32;
        p.off_inv_scale = st.inv_scale as i32;
        p.off_qmed = st.qmed as i32;
        p.off_codebook = st.codebook as i32;
        p.off_meta = st.meta as i32;
        p.off_dense_pos = st.dense_pos as i32;
        p.off_dense_k = st.dense_k as i32;
        p.off_dense_v = st.dense_v as i32;
        p.dense_cap = st.dense_capacity as i32;
        p.n_sink = cfg.n_sink as i32;
        p.n_heavy = cfg.n_heavy as i32;
        p.n_window = cfg.n_window as i32;
        p.max_seqs = cfg.max_seqs as i32;
        p.max_seq_len = cfg.max_seq_len as i32;
        p.budget_min = cfg.budget.min as i32;
        p.budget_max = cfg.budget.max as i32;
        p.budget_ratio = cfg.budget.ratio;
        p.rerank_factor = cfg.rerank_factor as i32;
        p.stage1_max = cfg.stage1_max() as i32;
        p.selector = match cfg.selector {
            Selector::Lut => 0,
            Selector::SignSign => 1,
        };
        p.sign_positive = (cfg.sign_predicate == SignPredicate::Positive) as i32;
        p.force_generated = cfg.force_generated as i32;
        p.centre_mean = (cfg.centre == Centre::Mean) as i32;
        p.softmax_scale = cfg.softmax_scale;
        p
    }
}
