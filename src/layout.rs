//! The byte layout of pages and per-sequence state: the single source of truth.
//!
//! Every constant a kernel needs is written here once; `build.rs` turns the `pub const`s of
//! this file into `kernels/generated/layout.cuh`, and per-configuration sizes reach the kernels
//! as arguments computed by [`Layout`].
//!
//! Planes (one pool per plane per layer): `[num_pages][num_kv_heads][page_size][row_bytes]`.
//! Bit order (little-endian bit stream, channel c):
//! - SIGN: byte `c >> 3`, bit `c & 7`. The 4-channel sub-vector `s` has the code
//!   `(SIGN[s >> 1] >> (4 * (s & 1))) & 0xF`, bit i = channel 4s+i.
//! - KMAG / VCODE at 2 bits: byte `c >> 2`, shift `2 * (c & 3)`; at 4 bits: byte `c >> 1`,
//!   shift `4 * (c & 1)`.
//! - KPAR / VPAR: per 32-channel group g, two 16-bit floats `[delta_g, zero_g]` (fp16).
//! - KFULL / VFULL: `head_dim` 16-bit floats (fp16, or bf16 for bf16 models); keys are centred.

use crate::config::CacheConfig;

/// Channels per quantisation group (one fp16 scale/zero pair each).
pub const QUANT_GROUP: usize = 32;
/// Channels per sign sub-vector (one nibble of the sign plane).
pub const SUBVEC: usize = 4;
/// Centroids per sub-vector (one per sign pattern of 4 channels).
pub const CENTROIDS: usize = 16;
/// Alignment of every pool and plane base, in bytes.
pub const POOL_ALIGN: usize = 256;
/// Alignment of every array inside a state record, in bytes.
pub const STATE_ALIGN: usize = 16;
/// Tokens per attention split (the unit of split-K work and of the partial results).
pub const ATTEND_SPLIT: usize = 64;
/// Bytes of quantisation parameters per group (two 16-bit floats).
pub const PAR_BYTES_PER_GROUP: usize = 4;

/// Plane indices: fixed, part of the ABI (`SikvLayerPools.plane[i]`).
pub const SIKV_PLANE_SIGN: usize = 0;
pub const SIKV_PLANE_KMAG: usize = 1;
pub const SIKV_PLANE_VCODE: usize = 2;
pub const SIKV_PLANE_KPAR: usize = 3;
pub const SIKV_PLANE_VPAR: usize = 4;
pub const SIKV_PLANE_KFULL: usize = 5;
pub const SIKV_PLANE_VFULL: usize = 6;
pub const SIKV_NUM_PLANES: usize = 7;
pub const PLANE_NAMES: [&str; SIKV_NUM_PLANES] = ["SIGN", "KMAG", "VCODE", "KPAR", "VPAR", "KFULL", "VFULL"];

/// Indices into the `meta` array of a state record (int32 each).
pub const META_PROMPT_LEN: usize = 0;
pub const META_CALIBRATED: usize = 1;
pub const META_N_HEAVY: usize = 2;
pub const META_WORDS: usize = 4;

/// A value of `dense_pos` meaning "this dense entry holds no token".
pub const DENSE_EMPTY: i32 = -1;

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Row sizes of each plane for one token of one KV head (0 = plane absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenFormat {
    pub head_dim: usize,
    pub key_bits: u32,
    pub value_bits: u32,
    pub row_bytes: [usize; SIKV_NUM_PLANES],
}

impl TokenFormat {
    pub fn new(head_dim: usize, key_bits: u32, value_bits: u32) -> TokenFormat {
        let d = head_dim;
        let groups = d / QUANT_GROUP;
        let mut row = [0usize; SIKV_NUM_PLANES];
        row[SIKV_PLANE_SIGN] = d / 8;
        if key_bits == 16 {
            row[SIKV_PLANE_KFULL] = d * 2;
        } else {
            row[SIKV_PLANE_KMAG] = d * key_bits as usize / 8;
            row[SIKV_PLANE_KPAR] = groups * PAR_BYTES_PER_GROUP;
        }
        if value_bits == 16 {
            row[SIKV_PLANE_VFULL] = d * 2;
        } else {
            row[SIKV_PLANE_VCODE] = d * value_bits as usize / 8;
            row[SIKV_PLANE_VPAR] = groups * PAR_BYTES_PER_GROUP;
        }
        TokenFormat {
            head_dim,
            key_bits,
            value_bits,
            row_bytes: row,
        }
    }
    /// Bytes per token per KV head over all planes (112 for 2+1 at head_dim 128).
    pub fn bytes_per_token(&self) -> usize {
        self.row_bytes.iter().sum()
    }
    pub fn has(&self, plane: usize) -> bool {
        self.row_bytes[plane] != 0
    }
    pub fn groups(&self) -> usize {
        self.head_dim / QUANT_GROUP
    }
}

/// Offsets (bytes) of the arrays of one state record: one per (sequence slot, layer, KV head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLayout {
    pub head_dim: usize,
    pub dense_capacity: usize,
    /// f32[d]: per-channel centre m.
    pub centre: usize,
    /// f32[d]: per-channel scale a.
    pub scale: usize,
    /// f32[d]: 1/a.
    pub inv_scale: usize,
    /// f32[d]: per-channel median of the group-mean prompt queries (sign x sign selector).
    pub qmed: usize,
    /// f32[d/4][16][4]: centroids in centred-key space.
    pub codebook: usize,
    /// i32[META_WORDS].
    pub meta: usize,
    /// i32[dense_capacity]: position held by each dense entry, or DENSE_EMPTY.
    pub dense_pos: usize,
    /// 16-bit[dense_capacity][d]: centred keys k' of the dense entries.
    pub dense_k: usize,
    /// 16-bit[dense_capacity][d]: values of the dense entries.
    pub dense_v: usize,
    /// Total bytes of one record (a multiple of STATE_ALIGN).
    pub bytes: usize,
}

impl StateLayout {
    pub fn new(head_dim: usize, dense_capacity: usize) -> StateLayout {
        let d = head_dim;
        let mut off = 0usize;
        let mut take = |bytes: usize| {
            let at = off;
            off = align_up(off + bytes, STATE_ALIGN);
            at
        };
        let centre = take(4 * d);
        let scale = take(4 * d);
        let inv_scale = take(4 * d);
        let qmed = take(4 * d);
        let codebook = take(4 * (d / SUBVEC) * CENTROIDS * SUBVEC);
        let meta = take(4 * META_WORDS);
        let dense_pos = take(4 * dense_capacity);
        let dense_k = take(2 * dense_capacity * d);
        let dense_v = take(2 * dense_capacity * d);
        StateLayout {
            head_dim,
            dense_capacity,
            centre,
            scale,
            inv_scale,
            qmed,
            codebook,
            meta,
            dense_pos,
            dense_k,
            dense_v,
            bytes: off,
        }
    }
    /// Codebook floats per record.
    pub fn codebook_len(&self) -> usize {
        (self.head_dim / SUBVEC) * CENTROIDS * SUBVEC
    }
}

/// Where everything of one configuration lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub format: TokenFormat,
    pub state: StateLayout,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub page_size: usize,
    pub num_pages: usize,
    pub max_seqs: usize,
    /// Byte offset of each plane inside one layer's plane block (unused for absent planes).
    pub plane_offset: [usize; SIKV_NUM_PLANES],
    /// Bytes of each plane of one layer (0 for absent planes).
    pub plane_bytes: [usize; SIKV_NUM_PLANES],
    /// Bytes of all planes of one layer (a multiple of POOL_ALIGN).
    pub layer_plane_bytes: usize,
    /// Bytes of the state pool of one layer: max_seqs * num_kv_heads records.
    pub layer_state_bytes: usize,
}

impl Layout {
    pub fn new(cfg: &CacheConfig) -> Layout {
        let format = TokenFormat::new(cfg.head_dim as usize, cfg.key_bits, cfg.value_bits);
        let state = StateLayout::new(cfg.head_dim as usize, cfg.dense_capacity() as usize);
        let (h, p, n) = (
            cfg.num_kv_heads as usize,
            cfg.page_size as usize,
            cfg.num_pages as usize,
        );
        let mut plane_offset = [0usize; SIKV_NUM_PLANES];
        let mut plane_bytes = [0usize; SIKV_NUM_PLANES];
        let mut off = 0usize;
        for i in 0..SIKV_NUM_PLANES {
            if format.has(i) {
                plane_offset[i] = off;
                plane_bytes[i] = n * h * p * format.row_bytes[i];
                off = align_up(off + plane_bytes[i], POOL_ALIGN);
            }
        }
        Layout {
            format,
            state,
            num_layers: cfg.num_layers as usize,
            num_kv_heads: h,
            page_size: p,
            num_pages: n,
            max_seqs: cfg.max_seqs as usize,
            plane_offset,
            plane_bytes,
            layer_plane_bytes: off,
            layer_state_bytes: align_up(cfg.max_seqs as usize * h * state.bytes, POOL_ALIGN),
        }
    }

    /// Byte offset of a token row inside its plane: `((page * H + head) * P + slot) * row`.
    pub fn row_offset(&self, plane: usize, page: usize, head: usize, slot: usize) -> usize {
        ((page * self.num_kv_heads + head) * self.page_size + slot) * self.format.row_bytes[plane]
    }

    /// Byte offset of a state record inside one layer's state pool.
    pub fn state_offset(&self, seq_slot: usize, head: usize) -> usize {
        (seq_slot * self.num_kv_heads + head) * self.state.bytes
    }

    /// Bytes per token per KV head (all planes).
    pub fn bytes_per_token(&self) -> usize {
        self.format.bytes_per_token()
    }
    /// Bytes of one page over all planes of one layer.
    pub fn bytes_per_page(&self) -> usize {
        self.bytes_per_token() * self.page_size * self.num_kv_heads
    }
    /// Bytes of all layers' planes.
    pub fn total_plane_bytes(&self) -> usize {
        self.layer_plane_bytes * self.num_layers
    }
    /// Bytes of all layers' state pools.
    pub fn total_state_bytes(&self) -> usize {
        self.layer_state_bytes * self.num_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_plus_one_is_112_bytes_at_d128() {
        let f = TokenFormat::new(128, 2, 2);
        assert_eq!(f.bytes_per_token(), 112);
        assert_eq!(f.row_bytes, [16, 32, 32, 16, 16, 0, 0]);
        let dense = 2 * 2 * 128;
        assert!((dense as f64 / 112.0 - 4.571).abs() < 1e-3);
    }

    #[test]
    fn four_plus_one_and_sixteen_plus_one() {
        assert_eq!(TokenFormat::new(128, 4, 4).bytes_per_token(), 176);
        assert_eq!(TokenFormat::new(128, 16, 16).bytes_per_token(), 528);
        assert_eq!(TokenFormat::new(64, 2, 2).bytes_per_token(), 56);
        assert_eq!(TokenFormat::new(256, 2, 2).bytes_per_token(), 224);
    }

    #[test]
    fn state_arrays_are_aligned_and_disjoint() {
        for d in [64, 128, 256] {
            for cap in [0, 1, 3, 132] {
                let s = StateLayout::new(d, cap);
                let parts = [
                    (s.centre, 4 * d),
                    (s.scale, 4 * d),
                    (s.inv_scale, 4 * d),
                    (s.qmed, 4 * d),
                    (s.codebook, 4 * s.codebook_len()),
                    (s.meta, 4 * META_WORDS),
                    (s.dense_pos, 4 * cap),
                    (s.dense_k, 2 * cap * d),
                    (s.dense_v, 2 * cap * d),
                ];
                for w in parts.windows(2) {
                    assert_eq!(w[0].0 % STATE_ALIGN, 0);
                    assert!(w[0].0 + w[0].1 <= w[1].0);
                }
                assert!(s.dense_v + 2 * cap * d <= s.bytes);
                assert_eq!(s.bytes % STATE_ALIGN, 0);
            }
        }
    }
}
