//! The kernel table of one configuration: every entry point of `kernels/*.cu` that the
//! configuration's head dim and dtype need, looked up (and force-loaded) once at create time.
//! Entry point names are `sikv_<stage>[_d<D>][_<dtype>]`, stamped out by the dispatch macros
//! of common.cuh.

use super::driver::{self, CUfunction, CUmodule};
use super::geometry::FINAL_CLUSTER_SIZES;
use crate::status::Result;

#[derive(Clone, Copy)]
pub struct Kernel {
    pub f: CUfunction,
    pub name: &'static str,
}

pub struct Kernels {
    pub encode: Kernel,
    pub calib_init: Kernel,
    pub calib_median: Kernel,
    pub calib_mean: Kernel,
    pub calib_qbar: Kernel,
    pub calib_qmed: Kernel,
    pub calib_heavy_score: Kernel,
    pub calib_heavy_select: Kernel,
    pub calib_scale: Kernel,
    pub calib_codebook: Kernel,
    pub prologue: Kernel,
    /// Zeroes the rows' histograms and candidate counters ahead of the score kernel.
    pub hist_zero: Kernel,
    pub score: Kernel,
    /// score for calls with several query rows per sequence (p.row_offsets set).
    pub score_rows: Kernel,
    /// score with each thread's rows all in flight, for grids of one wave at
    /// SCORE_WIDE_BLOCKS_PER_SM blocks a SM (workspace::score_wide).
    pub score_wide: Kernel,
    pub topk_stage1: Kernel,
    pub topk_compact: Kernel,
    pub topk_final: Kernel,
    /// topk_final for a row shared by a cluster of 2 or 4 CTAs (launch.rs final_cluster).
    pub topk_final_c2: Kernel,
    pub topk_final_c4: Kernel,
    /// score + stage-1 top-k in one launch of thread block clusters (sm_90; small batches).
    pub score_topk: Kernel,
    pub rerank_score: Kernel,
    /// rerank_score from the mean of each sequence's rows' queries (p.mean_offsets).
    pub rerank_score_mean: Kernel,
    pub topk_stage2: Kernel,
    pub attend: Kernel,
    /// attend of a selection made per sequence from its rows' mean query (p.rows_mean).
    pub attend_mean: Kernel,
    pub attend_dense: Kernel,
    /// attend and attend_dense for planes of 4-bit key magnitudes and values (4+1): their
    /// tensor-core tiles hold twice the code words, so they are kernels of their own and the
    /// 2-bit kernels keep their registers.
    pub attend_b4: Kernel,
    pub attend_dense_b4: Kernel,
    /// attend of several query rows per sequence selected per row (p.row_offsets), 2-bit and
    /// 4-bit planes: the one-row kernels decline rows, whose lookup beside the tiles made them
    /// spill.
    pub attend_rows: Kernel,
    pub attend_rows_b4: Kernel,
    pub combine: Kernel,
    pub params_layout: Kernel,
}

fn leak(s: String) -> &'static str {
    // A handful of short names per context; kept for error messages.
    Box::leak(s.into_boxed_str())
}

impl Kernels {
    /// The stage-1 final select for rows shared by clusters of `c` CTAs: 1, 2 or 4, the sizes
    /// launch.rs final_cluster chooses from (FINAL_CLUSTER_SIZES).
    pub fn topk_final_for(&self, c: u32) -> &Kernel {
        debug_assert!(FINAL_CLUSTER_SIZES.contains(&c), "no final select for clusters of {c}");
        match c {
            4 => &self.topk_final_c4,
            2 => &self.topk_final_c2,
            _ => &self.topk_final,
        }
    }

    /// `dtype` is "f16" or "bf16"; `d` is 64, 128 or 256.
    pub fn load(m: CUmodule, d: u32, dtype: &str) -> Result<Kernels> {
        let dt = |stage: &str| leak(format!("sikv_{stage}_d{d}_{dtype}"));
        let t = |stage: &str| leak(format!("sikv_{stage}_{dtype}"));
        let plain = |stage: &str| leak(format!("sikv_{stage}"));
        let get = |name: &'static str| -> Result<Kernel> {
            Ok(Kernel {
                f: driver::get_function(m, name)?,
                name,
            })
        };
        Ok(Kernels {
            encode: get(dt("encode"))?,
            calib_init: get(plain("calib_init"))?,
            calib_median: get(t("calib_median"))?,
            calib_mean: get(t("calib_mean"))?,
            calib_qbar: get(t("calib_qbar"))?,
            calib_qmed: get(t("calib_qmed"))?,
            calib_heavy_score: get(dt("calib_heavy_score"))?,
            calib_heavy_select: get(plain("calib_heavy_select"))?,
            calib_scale: get(t("calib_scale"))?,
            calib_codebook: get(t("calib_codebook"))?,
            prologue: get(plain("prologue"))?,
            hist_zero: get(plain("hist_zero"))?,
            score: get(dt("score"))?,
            score_rows: get(dt("score_rows"))?,
            score_wide: get(dt("score_wide"))?,
            topk_stage1: get(plain("topk_stage1"))?,
            topk_compact: get(plain("topk_compact"))?,
            topk_final: get(plain("topk_final"))?,
            topk_final_c2: get(plain("topk_final_c2"))?,
            topk_final_c4: get(plain("topk_final_c4"))?,
            score_topk: get(dt("score_topk"))?,
            rerank_score: get(dt("rerank_score"))?,
            rerank_score_mean: get(dt("rerank_score_mean"))?,
            topk_stage2: get(plain("topk_stage2"))?,
            attend: get(dt("attend"))?,
            attend_mean: get(dt("attend_mean"))?,
            attend_dense: get(dt("attend_dense"))?,
            attend_b4: get(dt("attend_b4"))?,
            attend_dense_b4: get(dt("attend_dense_b4"))?,
            attend_rows: get(dt("attend_rows"))?,
            attend_rows_b4: get(dt("attend_rows_b4"))?,
            combine: get(dt("combine"))?,
            params_layout: get(plain("params_layout"))?,
        })
    }
}
