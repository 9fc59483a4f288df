//! Several query rows per sequence on the CPU reference (`select_rows`, `attend_rows`): one row
//! is the decode, the last row is the decode, rows are causal, and the mean-query selection is
//! one selection per sequence. Seeded (SIKV_TEST_SEED replays a run).

use selfindexkv::config::{CacheConfig, SikvConfig, SIKV_DEVICE_CPU, SIKV_PROFILE_2_1};
use selfindexkv::cpu::{
    append, attend, attend_rows, calibrate, select, select_rows, LayerMut, LayerRef, PageTable, RowSelection,
};
use selfindexkv::layout::Layout;
use selfindexkv::status::SikvStatus;

mod common;
use common::{HostPools, Rng};

const PROMPTS: [usize; 2] = [120, 90];

fn config(window: u32, rerank: u32) -> (CacheConfig, Layout) {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.num_layers = 1;
    c.num_q_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.page_size = 16;
    c.num_pages = 32;
    c.max_seqs = 2;
    c.max_seq_len = 256;
    c.max_batch = 2;
    c.max_append_tokens = 64;
    c.n_sink = 4;
    c.n_heavy = 8;
    c.n_window = window;
    c.budget_ratio = 0.25;
    c.budget_min = 8;
    c.budget_max = 24;
    c.rerank_factor = rerank;
    let cfg = CacheConfig::from_c(&c).unwrap();
    let layout = Layout::new(&cfg);
    (cfg, layout)
}

/// Two calibrated sequences (slots 0 and 1, pages 0.. and 16..) and `news[b]` appended tokens
/// each; `last_k_shift` is added to the key of sequence 0's last appended token.
struct World {
    cfg: CacheConfig,
    layout: Layout,
    pools: HostPools,
    lens: [usize; 2],
}

impl World {
    fn new(seed: u64, window: u32, rerank: u32, news: [usize; 2], last_k_shift: f32) -> World {
        let (cfg, layout) = config(window, rerank);
        let mut rng = Rng(seed);
        let (d, hkv, hq) = (64usize, 2usize, 6usize);
        let mut w = World {
            pools: HostPools::new(&layout),
            cfg,
            layout,
            lens: PROMPTS,
        };
        for (b, &n) in PROMPTS.iter().enumerate() {
            let k = rng.normals(n * hkv * d);
            let v = rng.normals(n * hkv * d);
            let q = rng.normals(hq * d);
            let sm: Vec<i64> = (0..n).map(|p| w.slot(b, p)).collect();
            let (cfg, layout) = (w.cfg.clone(), w.layout.clone());
            calibrate(&layout, &cfg, &mut w.layer_mut(), b, &k, &v, &q, &sm).unwrap();
        }
        let mut k = Vec::new();
        let mut v = Vec::new();
        let (mut sm, mut ss, mut pos) = (Vec::new(), Vec::new(), Vec::new());
        for b in 0..2 {
            for t in 0..news[b] {
                let mut kt = rng.normals(hkv * d);
                if b == 0 && t + 1 == news[0] {
                    kt.iter_mut().for_each(|x| *x += last_k_shift);
                }
                k.extend(kt);
                v.extend(rng.normals(hkv * d));
                sm.push(w.slot(b, w.lens[b] + t));
                ss.push(b as i32);
                pos.push((w.lens[b] + t) as i32);
            }
        }
        let (cfg, layout) = (w.cfg.clone(), w.layout.clone());
        append(&layout, &cfg, &mut w.layer_mut(), &k, &v, &sm, &ss, &pos).unwrap();
        w.lens = [PROMPTS[0] + news[0], PROMPTS[1] + news[1]];
        w
    }
    fn slot(&self, b: usize, p: usize) -> i64 {
        ((b * 16 + p / 16) * 16 + p % 16) as i64
    }
    fn layer_mut(&mut self) -> LayerMut<'_> {
        self.pools.layer_mut()
    }
    fn layer(&self) -> LayerRef<'_> {
        self.pools.layer_ref()
    }
    fn table(&self) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
        let (mut indptr, mut idx, mut last) = (vec![0i32], Vec::new(), Vec::new());
        for b in 0..2 {
            let np = self.lens[b].div_ceil(16);
            idx.extend((0..np).map(|i| (b * 16 + i) as i32));
            indptr.push(idx.len() as i32);
            last.push((self.lens[b] - (np - 1) * 16) as i32);
        }
        (indptr, idx, last)
    }
    /// select_rows + attend_rows: (indices, counts, out).
    fn rows(&self, rows: &[u32], q: &[f32], mode: RowSelection) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
        let (indptr, idx, last) = self.table();
        let t = PageTable {
            indptr: &indptr,
            indices: &idx,
            last_page_len: &last,
        };
        let r: usize = rows.iter().map(|&n| n as usize).sum();
        let (mut ind, mut cnt, mut out) = (vec![0i32; r * 2 * 24], vec![0i32; r * 2], vec![0f32; r * 6 * 64]);
        let (layer, ss) = (self.layer(), [0i32, 1]);
        select_rows(
            &self.layout,
            &self.cfg,
            &layer,
            &t,
            &ss,
            rows,
            q,
            mode,
            &mut ind,
            &mut cnt,
        )
        .unwrap();
        attend_rows(&self.layout, &self.cfg, &layer, &t, &ss, rows, q, &ind, &cnt, &mut out).unwrap();
        (ind, cnt, out)
    }
    /// select + attend of one row per sequence.
    fn decode(&self, q: &[f32]) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
        let (indptr, idx, last) = self.table();
        let t = PageTable {
            indptr: &indptr,
            indices: &idx,
            last_page_len: &last,
        };
        let (mut ind, mut cnt, mut out) = (vec![0i32; 2 * 2 * 24], vec![0i32; 2 * 2], vec![0f32; 2 * 6 * 64]);
        let (layer, ss) = (self.layer(), [0i32, 1]);
        select(&self.layout, &self.cfg, &layer, &t, &ss, q, &mut ind, &mut cnt).unwrap();
        attend(&self.layout, &self.cfg, &layer, &t, &ss, q, &ind, &cnt, &mut out).unwrap();
        (ind, cnt, out)
    }
}

const ROW_F: usize = 6 * 64; // floats per query row
const ROW_I: usize = 2 * 24; // indices per query row

fn ranged(v: &[i32], cnt: &[i32], row: usize, h: usize) -> Vec<i32> {
    v[(row * 2 + h) * 24..(row * 2 + h) * 24 + cnt[row * 2 + h] as usize].to_vec()
}

#[test]
fn one_row_is_select_and_attend() {
    let seed = common::seed("one_row_is_select_and_attend");
    for (window, rerank) in [(16, 0), (16, 4)] {
        let w = World::new(seed, window, rerank, [3, 2], 0.0);
        let q = Rng(seed ^ 1).normals(2 * ROW_F);
        let want = w.decode(&q);
        for mode in [RowSelection::PerRow, RowSelection::MeanQuery] {
            let got = w.rows(&[1, 1], &q, mode);
            assert!(
                got == want,
                "seed {seed:#x}: one row ({mode:?}, rerank {rerank}) differs from select + attend"
            );
        }
    }
}

#[test]
fn the_last_row_is_the_decode_of_its_sequence() {
    let seed = common::seed("the_last_row_is_the_decode_of_its_sequence");
    let w = World::new(seed, 16, 4, [4, 3], 0.0);
    let q = Rng(seed ^ 2).normals(7 * ROW_F);
    let (ind, cnt, out) = w.rows(&[4, 3], &q, RowSelection::PerRow);
    // Rows 3 and 6 are the sequences' last.
    let last_q: Vec<f32> = [3usize, 6]
        .iter()
        .flat_map(|&r| q[r * ROW_F..(r + 1) * ROW_F].to_vec())
        .collect();
    let (dind, dcnt, dout) = w.decode(&last_q);
    for (b, r) in [(0usize, 3usize), (1, 6)] {
        assert_eq!(
            out[r * ROW_F..(r + 1) * ROW_F],
            dout[b * ROW_F..(b + 1) * ROW_F],
            "seed {seed:#x}: seq {b}"
        );
        assert_eq!(
            ind[r * ROW_I..(r + 1) * ROW_I],
            dind[b * ROW_I..(b + 1) * ROW_I],
            "seed {seed:#x}: seq {b}"
        );
        assert_eq!(cnt[r * 2..r * 2 + 2], dcnt[b * 2..b * 2 + 2], "seed {seed:#x}: seq {b}");
    }
}

/// Changing the key of sequence 0's last new token changes its last row only: the earlier rows
/// and the other sequence are bit for bit the same. With a window of 4 and 8 rows, the first
/// rows also have candidates cut at their bound.
#[test]
fn rows_are_causal() {
    let seed = common::seed("rows_are_causal");
    for (window, news) in [(16u32, [6usize, 3usize]), (4, [8, 3])] {
        let a = World::new(seed, window, 4, news, 0.0);
        let b = World::new(seed, window, 4, news, 3.0);
        let rows = [news[0] as u32, news[1] as u32];
        let n = news[0] + news[1];
        let q = Rng(seed ^ 3).normals(n * ROW_F);
        for mode in [RowSelection::PerRow, RowSelection::MeanQuery] {
            let (ia, ca, oa) = a.rows(&rows, &q, mode);
            let (ib, cb, ob) = b.rows(&rows, &q, mode);
            let last = news[0] - 1;
            for r in (0..n).filter(|&r| r != last) {
                let what = format!("seed {seed:#x}, window {window}, {mode:?}, row {r}");
                assert_eq!(
                    oa[r * ROW_F..(r + 1) * ROW_F],
                    ob[r * ROW_F..(r + 1) * ROW_F],
                    "{what}: output"
                );
                if mode == RowSelection::PerRow {
                    assert_eq!(
                        ia[r * ROW_I..(r + 1) * ROW_I],
                        ib[r * ROW_I..(r + 1) * ROW_I],
                        "{what}: selection"
                    );
                    assert_eq!(ca[r * 2..r * 2 + 2], cb[r * 2..r * 2 + 2], "{what}: counts");
                }
            }
            assert_ne!(
                oa[last * ROW_F..(last + 1) * ROW_F],
                ob[last * ROW_F..(last + 1) * ROW_F],
                "seed {seed:#x}: the changed token did not reach the row it belongs to; the check proves nothing"
            );
            // Every selected position is below its row's bound and a candidate (>= the sinks).
            for (b, start) in [(0usize, 0usize), (1, news[0])] {
                for r in 0..news[b] {
                    let bound = a.lens[b] - news[b] + r + 1;
                    for h in 0..2 {
                        for &p in &ranged(&ia, &ca, start + r, h) {
                            assert!(
                                p >= 4 && (p as usize) < bound,
                                "seed {seed:#x}: row {r} of seq {b} selected {p}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// MeanQuery selects once per sequence and KV head: every row keeps the same positions (all
/// below the first row's bound when the rows fit in the window); PerRow differs between rows.
#[test]
fn the_mean_query_selects_once_per_sequence() {
    let seed = common::seed("the_mean_query_selects_once_per_sequence");
    let w = World::new(seed, 16, 4, [5, 4], 0.0);
    let q = Rng(seed ^ 4).normals(9 * ROW_F);
    let (im, cm, _) = w.rows(&[5, 4], &q, RowSelection::MeanQuery);
    let (ip, cp, _) = w.rows(&[5, 4], &q, RowSelection::PerRow);
    let mut per_row_differs = false;
    for (start, n) in [(0usize, 5usize), (5, 4)] {
        for h in 0..2 {
            let first = ranged(&im, &cm, start, h);
            assert!(!first.is_empty());
            for r in 1..n {
                assert_eq!(
                    ranged(&im, &cm, start + r, h),
                    first,
                    "seed {seed:#x}: row {r} of the rows at {start}"
                );
                per_row_differs |= ranged(&ip, &cp, start + r, h) != ranged(&ip, &cp, start, h);
            }
        }
    }
    assert!(
        per_row_differs,
        "seed {seed:#x}: every PerRow selection equals its first row's; the check proves nothing"
    );
}

#[test]
fn bad_rows_are_refused_and_write_nothing() {
    let seed = common::seed("bad_rows_are_refused_and_write_nothing");
    let w = World::new(seed, 16, 0, [2, 2], 0.0);
    let (indptr, idx, last) = w.table();
    let t = PageTable {
        indptr: &indptr,
        indices: &idx,
        last_page_len: &last,
    };
    let (layer, ss) = (w.layer(), [0i32, 1]);
    let q = Rng(seed ^ 5).normals(4 * ROW_F);
    let mut ind = vec![7i32; 4 * ROW_I];
    let mut cnt = vec![7i32; 8];
    for (rows, status) in [
        (vec![0u32, 4], SikvStatus::SIKV_ERR_OUT_OF_BOUNDS),
        (vec![17, 1], SikvStatus::SIKV_ERR_OUT_OF_BOUNDS),
        (vec![2, 2, 1], SikvStatus::SIKV_ERR_INVALID_ARGUMENT),
        (vec![3, 2], SikvStatus::SIKV_ERR_INVALID_ARGUMENT), // q holds 4 rows
    ] {
        let e = select_rows(
            &w.layout,
            &w.cfg,
            &layer,
            &t,
            &ss,
            &rows,
            &q,
            RowSelection::PerRow,
            &mut ind,
            &mut cnt,
        )
        .unwrap_err();
        assert_eq!(e.status, status, "rows {rows:?}: {e}");
        assert!(
            ind.iter().chain(&cnt).all(|&x| x == 7),
            "rows {rows:?}: written before the refusal"
        );
    }
    // A selection at or past a row's bound: attend_rows refuses it and leaves out alone.
    let (mut ind, cnt, _) = w.rows(&[2, 2], &q, RowSelection::PerRow);
    ind[0] = (w.lens[0] - 1) as i32; // row 0 of sequence 0 stands at len - 2
    let mut out = vec![0.5f32; 4 * ROW_F];
    let e = attend_rows(&w.layout, &w.cfg, &layer, &t, &ss, &[2, 2], &q, &ind, &cnt, &mut out).unwrap_err();
    assert_eq!(e.status, SikvStatus::SIKV_ERR_OUT_OF_BOUNDS, "{e}");
    assert!(out.iter().all(|&x| x == 0.5), "out written before the refusal");
}
