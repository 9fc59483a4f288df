//! Configuration: the C-visible `SikvConfig` and its validated Rust form `CacheConfig`.
//!
//! Enum-like fields of the C struct are plain `u32` so that an unknown value coming from C is a
//! status code, never undefined behaviour.

use crate::ensure;
use crate::status::{Error, Result};

/// Run on the CUDA device when one is usable, else on the CPU.
pub const SIKV_DEVICE_AUTO: u32 = 0;
/// Run the CPU reference on host pointers.
pub const SIKV_DEVICE_CPU: u32 = 1;
/// Run the CUDA kernels on device pointers.
pub const SIKV_DEVICE_CUDA: u32 = 2;

/// IEEE half precision activations.
pub const SIKV_DTYPE_F16: u32 = 0;
/// bfloat16 activations.
pub const SIKV_DTYPE_BF16: u32 = 1;
/// float32 activations (the dense set and 16-bit planes are then stored as fp16).
pub const SIKV_DTYPE_F32: u32 = 2;

/// Score = sum of LUT entries (centroid . group-mean query) indexed by the sign nibbles.
pub const SIKV_SELECTOR_LUT: u32 = 0;
/// Score = sum_c sign(k'_c) * sign(qbar_c - qmed_c): the reference's 16+1 ablation.
pub const SIKV_SELECTOR_SIGN_SIGN: u32 = 1;

/// Per-channel lower median of the calibration keys (the reference).
pub const SIKV_CENTRE_MEDIAN: u32 = 0;
/// Per-channel mean of the calibration keys.
pub const SIKV_CENTRE_MEAN: u32 = 1;

/// Encoder sign predicate `x > 0` (the reference encoder) instead of `!signbit(x)`.
pub const SIKV_FLAG_PARITY_SIGN: u32 = 1 << 0;
/// Tokens generated after calibration are always selected and count against the budget
/// (the reference's 2+1 behaviour).
pub const SIKV_FLAG_FORCE_GENERATED: u32 = 1 << 1;
/// Calls with several query rows per sequence (`sikv_attend_rows`) select once per sequence
/// and KV head from the mean of the rows' queries, instead of once per row.
pub const SIKV_FLAG_ROWS_MEAN_QUERY: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = SIKV_FLAG_PARITY_SIGN | SIKV_FLAG_FORCE_GENERATED | SIKV_FLAG_ROWS_MEAN_QUERY;

/// How a call with several query rows per sequence selects (`cpu::rows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSelection {
    /// Each row from its own group-mean query.
    PerRow,
    /// Once per sequence and KV head, from the mean over the sequence's rows.
    MeanQuery,
}

/// `dense_crossover` value that lets the library choose (the default): the dense decode when
/// the call's tokens summed over its sequences are at most the measured break-even for its
/// number of sequences: 86016 for one, 118784 for 2-3, 147456 for 4-31, 348160 for 32-63,
/// 524288 from 64 (docs/DESIGN.md, dense-decode crossover).
pub const SIKV_DENSE_CROSSOVER_AUTO: u32 = 0xFFFF_FFFF;
/// AUTO's bound by the call's sequences: (the most sequences of a band, the most tokens summed
/// over them that run dense). The dense decode's time follows the tokens it reads; the sparse
/// step costs a fixed ~45-80 µs per call plus a part per sequence that grows faster than the
/// dense decode's above a few sequences, so the break-even moves with the batch. Measured on an
/// H100 in the thirty-third session (docs/RESULTS.md; d = 128, 32/8 heads, 2+1, default
/// budget; graph timings; each bound the break-even interpolated between the measured points
/// on either side, rounded down to a multiple of 4096): batch 1 even at ~84.5K tokens (86016
/// stays, the H200 fit of the seventh session: 0.7 µs slower there warm, 13.8 faster with a
/// cold L2); batch 2 at ~138K-140K (two runs); batch 4 at ~151K; batch 8 at ~151K-160K; batch
/// 16 at ~154K; batch 32 at ~350K; batch 64 dense faster at every measured point up to 524288
/// (the bound of batch 64 holds for every larger batch). Batches between measured ones take
/// the lower one's band. Batch 2 refitted in the fortieth session, after the sparse attend's
/// short kept splits made its step about 6 µs shorter: even at ~118.2K (graph), the bound that
/// multiple of 4096 just above it, so that each measured point of the sweep takes the faster
/// path (with a cold L2 dense stays faster up to ~131K, interpolated). The H200's break-even
/// has not been refitted since the seventh session.
pub const DENSE_AUTO_TOKENS: [(u32, u64); 5] =
    [(1, 86016), (3, 118784), (31, 147456), (63, 348160), (u32::MAX, 524288)];

/// AUTO's bound on the tokens (summed over its sequences) of a call over `seqs` sequences
/// (DENSE_AUTO_TOKENS); `seqs` is at least 1.
pub fn dense_auto_tokens(seqs: u32) -> u64 {
    DENSE_AUTO_TOKENS
        .iter()
        .find(|&&(most, _)| seqs <= most)
        .map_or(DENSE_AUTO_TOKENS[DENSE_AUTO_TOKENS.len() - 1].1, |&(_, tokens)| tokens)
}
/// The stateless decode applies the crossover to the live lengths of calls of up to this many
/// sequences, and to `batch * max_seq_len` above it. On a GPU the live lengths are read on the
/// device, so both paths are queued and the unchosen one's blocks return at once; their cost
/// grows with the batch. On the H200 at max_seq_len 128K (docs/RESULTS.md, fifth session)
/// choosing on the device made batches 1, 2 and 4 faster wherever dense won (8K tokens per
/// sequence: 64 -> 38, 74 -> 47, 86 -> 70 µs) and cost about 4 % where sparse won (128K), while at
/// batch 8 it never won (116 against 113 µs at 8K, 3-7 % slower at 32K-128K). The same rule on
/// every device, so a CPU and a CUDA handle of one configuration take the same path.
pub const LIVE_CROSSOVER_MAX_BATCH: u32 = 4;

/// When attend takes the dense decode instead of selecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossover {
    /// Up to this many tokens summed over a call's sequences (0: never).
    Tokens(u32),
    /// The measured break-even (SIKV_DENSE_CROSSOVER_AUTO): DENSE_AUTO_TOKENS by the call's
    /// sequences. The same on every device, so a CPU and a CUDA cache of one configuration take
    /// the same path.
    Auto,
}

impl Crossover {
    pub fn from_c(v: u32) -> Crossover {
        match v {
            SIKV_DENSE_CROSSOVER_AUTO => Crossover::Auto,
            n => Crossover::Tokens(n),
        }
    }
    /// The most tokens (summed over its sequences) a call over `seqs` sequences may hold and
    /// still run dense; None when it never does.
    pub fn max_tokens(self, seqs: u32) -> Option<u64> {
        match self {
            Crossover::Tokens(0) => None,
            Crossover::Tokens(n) => Some(n as u64),
            Crossover::Auto if seqs == 0 => None,
            Crossover::Auto => Some(dense_auto_tokens(seqs)),
        }
    }
    /// Whether a call over `seqs` sequences holding `tokens` tokens together runs dense.
    pub fn dense(self, seqs: u32, tokens: u64) -> bool {
        self.max_tokens(seqs).is_some_and(|m| tokens <= m)
    }
    /// The path of a crossover decode over `seqs` sequences of at most `max_seq_len` tokens
    /// each, from what is known before any live length is read: dense where even full
    /// sequences stay within max_tokens, sparse where the crossover is off or the batch is
    /// above LIVE_CROSSOVER_MAX_BATCH, else the live lengths decide (on a GPU, on the device).
    pub fn route(self, seqs: u32, max_seq_len: u32) -> Route {
        match self.max_tokens(seqs) {
            None => Route::Sparse,
            Some(m) if seqs as u64 * max_seq_len as u64 <= m => Route::Dense,
            Some(_) if seqs > LIVE_CROSSOVER_MAX_BATCH => Route::Sparse,
            Some(m) => Route::Live(m),
        }
    }
}

/// A decode's path once the crossover's bounds have been applied ([`Crossover::route`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Sparse,
    Dense,
    /// Dense when the call's live tokens, summed over its sequences, are at most this.
    Live(u64),
}

/// Profile names accepted by `sikv_config_init`.
pub const SIKV_PROFILE_2_1: u32 = 0;
pub const SIKV_PROFILE_4_1: u32 = 1;
pub const SIKV_PROFILE_16_1: u32 = 2;
/// 2+1 bits with every reference choice (64 heavy, k = 100, median, no sinks or window).
pub const SIKV_PROFILE_PARITY: u32 = 3;

/// Hard limits (independent of any configuration).
pub const MAX_HEAD_DIM_SUPPORTED: [u32; 3] = [64, 128, 256];
pub const MIN_PAGE_SIZE: u32 = 16;
pub const MAX_PAGE_SIZE: u32 = 256;
pub const MAX_GQA_RATIO: u32 = 16;
pub const MAX_RERANK_FACTOR: u32 = 16;

/// Cache configuration as C sees it. Fill it with `sikv_config_init`, then adjust.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SikvConfig {
    /// SIKV_DEVICE_*.
    pub device: u32,
    /// CUDA device ordinal (ignored on the CPU).
    pub device_ordinal: i32,
    /// SIKV_DTYPE_* of q, k, v and the attention output.
    pub dtype: u32,
    pub num_layers: u32,
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    /// 64, 128 or 256.
    pub head_dim: u32,
    /// Key magnitude bits: 2, 4, or 16 (fp16 keys, no magnitude quantisation).
    pub key_bits: u32,
    /// Value bits: 2, 4, or 16 (fp16 values).
    pub value_bits: u32,
    /// Tokens per page: a multiple of 16 in 16..=256.
    pub page_size: u32,
    /// Pages in the pool; 0 = max_seqs * ceil(max_seq_len / page_size).
    pub num_pages: u32,
    /// Sequence slots (sequences alive at once).
    pub max_seqs: u32,
    /// Longest sequence, in tokens.
    pub max_seq_len: u32,
    /// Most sequences in one attend call.
    pub max_batch: u32,
    /// Most tokens in one append call (all sequences together).
    pub max_append_tokens: u32,
    /// First positions always attended in full precision.
    pub n_sink: u32,
    /// Prompt tokens picked at calibration by the last prompt query, kept in full precision.
    pub n_heavy: u32,
    /// Most recent positions kept in full precision.
    pub n_window: u32,
    /// Selected tokens k = min(candidates, clamp(ceil(budget_ratio * candidates), budget_min, budget_max)).
    pub budget_ratio: f32,
    pub budget_min: u32,
    pub budget_max: u32,
    /// 0 or 1: one-stage selection. c >= 2: the 1-bit scan keeps c*k candidates, which are
    /// re-ranked with the stored (dequantised) key.
    pub rerank_factor: u32,
    /// SIKV_SELECTOR_*.
    pub selector: u32,
    /// SIKV_CENTRE_*.
    pub centre: u32,
    /// SIKV_FLAG_* bits.
    pub flags: u32,
    /// Softmax temperature; 0 = 1/sqrt(head_dim).
    pub softmax_scale: f32,
    /// Dense-decode crossover in tokens summed over a call's sequences: an attend whose
    /// sequences hold at most this many tokens together runs the dense decode over every token
    /// instead of selecting. The stateless decode applies it to the live lengths (read on the
    /// device for a device page table, so a captured graph follows them) for calls of up to 4
    /// sequences, and to batch times max_seq_len above that. 0 = never;
    /// SIKV_DENSE_CROSSOVER_AUTO (the default) = the library's measured break-even for the
    /// call's number of sequences (86016 tokens for one, 118784-524288 for more).
    pub dense_crossover: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }
    /// The 16-bit type used for stored full-precision keys/values (dense set, 16-bit planes).
    pub fn storage(self) -> HalfKind {
        match self {
            Dtype::Bf16 => HalfKind::Bf16,
            Dtype::F16 | Dtype::F32 => HalfKind::F16,
        }
    }
}

/// A 16-bit float format used for stored full-precision data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    Lut,
    SignSign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Centre {
    Median,
    Mean,
}

/// Which predicate turns a normalised key element into its sign bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignPredicate {
    /// `!signbit(x)`: +0 counts as positive, -0 as negative. Used everywhere by default.
    NotSignbit,
    /// `x > 0` (the reference encoder); the codebook still uses `!signbit`, as the reference does.
    Positive,
}

/// Selection budget: k = min(n, clamp(ceil(ratio * n), min, max)) for n candidates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub ratio: f32,
    pub min: u32,
    pub max: u32,
}

impl Budget {
    pub fn k_for(&self, candidates: u32) -> u32 {
        let want = (self.ratio as f64 * candidates as f64).ceil();
        let want = if want.is_finite() && want > 0.0 {
            want.min(u32::MAX as f64) as u32
        } else {
            0
        };
        want.clamp(self.min, self.max).min(candidates)
    }
}

/// The validated configuration every module works from.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub device: Device,
    pub device_ordinal: i32,
    pub dtype: Dtype,
    pub num_layers: u32,
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub key_bits: u32,
    pub value_bits: u32,
    pub page_size: u32,
    pub num_pages: u32,
    pub max_seqs: u32,
    pub max_seq_len: u32,
    pub max_batch: u32,
    pub max_append_tokens: u32,
    pub n_sink: u32,
    pub n_heavy: u32,
    pub n_window: u32,
    pub budget: Budget,
    pub rerank_factor: u32,
    pub selector: Selector,
    pub centre: Centre,
    pub sign_predicate: SignPredicate,
    pub force_generated: bool,
    /// Selection of multi-row calls (SIKV_FLAG_ROWS_MEAN_QUERY).
    pub row_selection: RowSelection,
    pub softmax_scale: f32,
    /// When attend runs the dense decode instead of selecting.
    pub dense_crossover: Crossover,
}

impl SikvConfig {
    /// Defaults for a profile, for a model of the given shape. Pool bounds are small and
    /// meant to be adjusted.
    pub fn for_profile(profile: u32) -> Result<SikvConfig> {
        let mut c = SikvConfig {
            device: SIKV_DEVICE_AUTO,
            device_ordinal: 0,
            dtype: SIKV_DTYPE_F16,
            num_layers: 1,
            num_q_heads: 8,
            num_kv_heads: 2,
            head_dim: 128,
            key_bits: 2,
            value_bits: 2,
            page_size: 64,
            num_pages: 0,
            max_seqs: 8,
            max_seq_len: 32768,
            max_batch: 8,
            max_append_tokens: 32768,
            n_sink: 4,
            n_heavy: 64,
            n_window: 64,
            budget_ratio: 1.0 / 16.0,
            budget_min: 128,
            budget_max: 2048,
            rerank_factor: 4,
            selector: SIKV_SELECTOR_LUT,
            centre: SIKV_CENTRE_MEDIAN,
            flags: 0,
            softmax_scale: 0.0,
            dense_crossover: SIKV_DENSE_CROSSOVER_AUTO,
        };
        match profile {
            SIKV_PROFILE_2_1 => {}
            SIKV_PROFILE_4_1 => {
                c.key_bits = 4;
                c.value_bits = 4;
            }
            SIKV_PROFILE_16_1 => {
                c.key_bits = 16;
                c.value_bits = 16;
            }
            SIKV_PROFILE_PARITY => {
                c.n_sink = 0;
                c.n_heavy = 64;
                c.n_window = 0;
                c.budget_ratio = 0.0;
                c.budget_min = 100;
                c.budget_max = 100;
                c.rerank_factor = 0;
                c.flags = SIKV_FLAG_PARITY_SIGN | SIKV_FLAG_FORCE_GENERATED;
            }
            other => return Err(Error::unsupported(format!("profile {other} is unknown"))),
        }
        Ok(c)
    }
}

impl CacheConfig {
    /// Validates every field; the message names the first bad one.
    pub fn from_c(c: &SikvConfig) -> Result<CacheConfig> {
        let device = match c.device {
            SIKV_DEVICE_AUTO => Device::Auto,
            SIKV_DEVICE_CPU => Device::Cpu,
            SIKV_DEVICE_CUDA => Device::Cuda,
            v => return Err(Error::unsupported(format!("config.device = {v} is unknown"))),
        };
        let dtype = match c.dtype {
            SIKV_DTYPE_F16 => Dtype::F16,
            SIKV_DTYPE_BF16 => Dtype::Bf16,
            SIKV_DTYPE_F32 => Dtype::F32,
            v => return Err(Error::unsupported(format!("config.dtype = {v} is unknown"))),
        };
        let selector = match c.selector {
            SIKV_SELECTOR_LUT => Selector::Lut,
            SIKV_SELECTOR_SIGN_SIGN => Selector::SignSign,
            v => return Err(Error::unsupported(format!("config.selector = {v} is unknown"))),
        };
        let centre = match c.centre {
            SIKV_CENTRE_MEDIAN => Centre::Median,
            SIKV_CENTRE_MEAN => Centre::Mean,
            v => return Err(Error::unsupported(format!("config.centre = {v} is unknown"))),
        };
        ensure!(
            c.flags & !KNOWN_FLAGS == 0,
            SIKV_ERR_UNSUPPORTED,
            "config.flags has unknown bits {:#x}",
            c.flags & !KNOWN_FLAGS
        );
        ensure!(
            MAX_HEAD_DIM_SUPPORTED.contains(&c.head_dim),
            SIKV_ERR_UNSUPPORTED,
            "config.head_dim = {} is not supported (64, 128 or 256)",
            c.head_dim
        );
        ensure!(
            matches!(c.key_bits, 2 | 4 | 16),
            SIKV_ERR_UNSUPPORTED,
            "config.key_bits = {} is not supported (2, 4 or 16)",
            c.key_bits
        );
        ensure!(
            matches!(c.value_bits, 2 | 4 | 16),
            SIKV_ERR_UNSUPPORTED,
            "config.value_bits = {} is not supported (2, 4 or 16)",
            c.value_bits
        );
        ensure!(
            c.num_layers >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.num_layers must be >= 1"
        );
        ensure!(
            c.num_kv_heads >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.num_kv_heads must be >= 1"
        );
        ensure!(
            c.num_q_heads >= c.num_kv_heads && c.num_q_heads % c.num_kv_heads == 0,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.num_q_heads = {} is not a multiple of config.num_kv_heads = {}",
            c.num_q_heads,
            c.num_kv_heads
        );
        ensure!(
            c.num_q_heads / c.num_kv_heads <= MAX_GQA_RATIO,
            SIKV_ERR_UNSUPPORTED,
            "query heads per KV head = {} exceeds {}",
            c.num_q_heads / c.num_kv_heads,
            MAX_GQA_RATIO
        );
        ensure!(
            (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&c.page_size) && c.page_size % 16 == 0,
            SIKV_ERR_UNSUPPORTED,
            "config.page_size = {} must be a multiple of 16 in 16..=256",
            c.page_size
        );
        ensure!(
            c.max_seqs >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.max_seqs must be >= 1"
        );
        ensure!(
            c.max_seq_len >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.max_seq_len must be >= 1"
        );
        ensure!(
            c.max_seq_len <= (1 << 30),
            SIKV_ERR_OUT_OF_BOUNDS,
            "config.max_seq_len = {} exceeds 2^30",
            c.max_seq_len
        );
        ensure!(
            (1..=c.max_seqs).contains(&c.max_batch),
            SIKV_ERR_INVALID_ARGUMENT,
            "config.max_batch = {} must be in 1..=max_seqs ({})",
            c.max_batch,
            c.max_seqs
        );
        ensure!(
            c.max_append_tokens >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.max_append_tokens must be >= 1"
        );
        let pages_per_seq = c.max_seq_len.div_ceil(c.page_size) as u64;
        let num_pages = if c.num_pages == 0 {
            pages_per_seq * c.max_seqs as u64
        } else {
            c.num_pages as u64
        };
        ensure!(
            num_pages <= i32::MAX as u64,
            SIKV_ERR_OUT_OF_BOUNDS,
            "config.num_pages = {num_pages} exceeds 2^31-1"
        );
        // Pool sizes are products of several 32-bit fields: bound them (generously, per token
        // at most 2 KiB per KV head; per state record its dense set plus 64 KiB) so that no
        // layout size can overflow, whatever the fields.
        let per_layer_tokens = num_pages as u128 * c.page_size as u128 * c.num_kv_heads as u128;
        let plane_bound = c.num_layers as u128 * per_layer_tokens * 2048;
        let dense = (c.n_sink as u128 + c.n_heavy as u128 + c.n_window as u128) * c.head_dim as u128 * 4;
        let state_bound = c.num_layers as u128 * c.max_seqs as u128 * c.num_kv_heads as u128 * (dense + 65536);
        ensure!(
            plane_bound.max(state_bound) <= (1u128 << 56),
            SIKV_ERR_OUT_OF_BOUNDS,
            "config.num_layers = {}, num_kv_heads = {}, num_pages = {num_pages}, max_seqs = {}: the pools would exceed 2^56 bytes",
            c.num_layers,
            c.num_kv_heads,
            c.max_seqs
        );
        ensure!(
            c.budget_ratio.is_finite() && (0.0..=1.0).contains(&c.budget_ratio),
            SIKV_ERR_INVALID_ARGUMENT,
            "config.budget_ratio = {} must be in [0, 1]",
            c.budget_ratio
        );
        ensure!(
            c.budget_min <= c.budget_max,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.budget_min = {} exceeds config.budget_max = {}",
            c.budget_min,
            c.budget_max
        );
        ensure!(
            c.budget_max >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.budget_max must be >= 1"
        );
        ensure!(
            c.budget_max <= 65536,
            SIKV_ERR_OUT_OF_BOUNDS,
            "config.budget_max = {} exceeds 65536",
            c.budget_max
        );
        ensure!(
            c.rerank_factor <= MAX_RERANK_FACTOR,
            SIKV_ERR_OUT_OF_BOUNDS,
            "config.rerank_factor = {} exceeds {}",
            c.rerank_factor,
            MAX_RERANK_FACTOR
        );
        let dense = c.n_sink as u64 + c.n_heavy as u64 + c.n_window as u64;
        ensure!(
            dense <= 4096,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_sink + n_heavy + n_window = {dense} exceeds 4096"
        );
        ensure!(
            c.softmax_scale.is_finite() && c.softmax_scale >= 0.0,
            SIKV_ERR_INVALID_ARGUMENT,
            "config.softmax_scale = {} must be finite and >= 0",
            c.softmax_scale
        );
        let softmax_scale = if c.softmax_scale == 0.0 {
            1.0 / (c.head_dim as f32).sqrt()
        } else {
            c.softmax_scale
        };
        Ok(CacheConfig {
            device,
            device_ordinal: c.device_ordinal,
            dtype,
            num_layers: c.num_layers,
            num_q_heads: c.num_q_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            key_bits: c.key_bits,
            value_bits: c.value_bits,
            page_size: c.page_size,
            num_pages: num_pages as u32,
            max_seqs: c.max_seqs,
            max_seq_len: c.max_seq_len,
            max_batch: c.max_batch,
            max_append_tokens: c.max_append_tokens,
            n_sink: c.n_sink,
            n_heavy: c.n_heavy,
            n_window: c.n_window,
            budget: Budget {
                ratio: c.budget_ratio,
                min: c.budget_min,
                max: c.budget_max,
            },
            rerank_factor: c.rerank_factor,
            selector,
            centre,
            sign_predicate: if c.flags & SIKV_FLAG_PARITY_SIGN != 0 {
                SignPredicate::Positive
            } else {
                SignPredicate::NotSignbit
            },
            force_generated: c.flags & SIKV_FLAG_FORCE_GENERATED != 0,
            row_selection: if c.flags & SIKV_FLAG_ROWS_MEAN_QUERY != 0 {
                RowSelection::MeanQuery
            } else {
                RowSelection::PerRow
            },
            softmax_scale,
            dense_crossover: Crossover::from_c(c.dense_crossover),
        })
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> u32 {
        self.num_q_heads / self.num_kv_heads
    }
    /// Dense (full-precision) entries per (sequence, layer, KV head).
    pub fn dense_capacity(&self) -> u32 {
        self.n_sink + self.n_heavy + self.n_window
    }
    /// Candidates kept by the first (1-bit) selection stage at most.
    pub fn stage1_max(&self) -> u32 {
        self.budget.max * self.rerank_factor.max(1)
    }
    pub fn two_stage(&self) -> bool {
        self.rerank_factor >= 2
    }
    pub fn pages_per_seq_max(&self) -> u32 {
        self.max_seq_len.div_ceil(self.page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each arm of the route: full sequences within the bound run dense, an off crossover or a
    /// batch above LIVE_CROSSOVER_MAX_BATCH runs sparse, anything else reads the live lengths.
    #[test]
    fn crossover_route_arms() {
        let auto = Crossover::Auto;
        assert_eq!(auto.route(1, 8192), Route::Dense);
        assert_eq!(auto.route(2, 32768), Route::Dense);
        let one = dense_auto_tokens(1);
        assert_eq!(auto.route(1, one as u32), Route::Dense);
        assert_eq!(auto.route(1, one as u32 + 1), Route::Live(one));
        let four = dense_auto_tokens(LIVE_CROSSOVER_MAX_BATCH);
        assert_eq!(four, 147456);
        assert_eq!(auto.route(LIVE_CROSSOVER_MAX_BATCH, 36864), Route::Dense);
        assert_eq!(auto.route(LIVE_CROSSOVER_MAX_BATCH, 36864 + 256), Route::Live(four));
        assert_eq!(auto.route(LIVE_CROSSOVER_MAX_BATCH + 1, 131072), Route::Sparse);
        // Above the live batch bound the declared tokens decide, by the batch's band.
        assert_eq!(auto.route(8, 18432), Route::Dense);
        assert_eq!(auto.route(8, 18432 + 1024), Route::Sparse);
        assert_eq!(auto.route(32, 10880), Route::Dense);
        assert_eq!(auto.route(32, 10880 + 128), Route::Sparse);
        assert_eq!(auto.route(64, 8192), Route::Dense);
        assert_eq!(auto.route(64, 8192 + 64), Route::Sparse);
        assert_eq!(auto.route(1024, 512), Route::Dense);
        assert_eq!(auto.route(1024, 1024), Route::Sparse);
        // Still dense above the live batch bound where full sequences fit.
        assert_eq!(auto.route(8, 8192), Route::Dense);
        assert_eq!(Crossover::Tokens(0).route(1, 16), Route::Sparse);
        assert_eq!(auto.route(0, 16), Route::Sparse);
        assert_eq!(Crossover::Tokens(1000).route(3, 500), Route::Live(1000));
        assert_eq!(Crossover::Tokens(1000).route(2, 500), Route::Dense);
    }
}
