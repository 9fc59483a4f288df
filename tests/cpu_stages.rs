//! Tests of the CPU backend stages over layout memory (method §10.7 items 4-7 end to end):
//! calibrate + append + select + attend on ragged batches with random pages.
//!
//! Random inputs come from a splitmix64 generator seeded from the clock (override with
//! SIKV_TEST_SEED=<hex or decimal>); every test prints its seed, which cargo shows on failure.

use selfindexkv::config::{
    CacheConfig, Centre, HalfKind, Selector, SikvConfig, SIKV_CENTRE_MEAN, SIKV_DEVICE_CPU, SIKV_DTYPE_BF16,
    SIKV_FLAG_FORCE_GENERATED, SIKV_FLAG_PARITY_SIGN, SIKV_PROFILE_2_1, SIKV_SELECTOR_SIGN_SIGN,
};
use selfindexkv::cpu::{
    append, attend, attend_dense, calibrate, read_state, reset_sequence, select, PageTable, StateRecord,
};
use selfindexkv::layout::{
    Layout, DENSE_EMPTY, META_CALIBRATED, META_N_HEAVY, META_PROMPT_LEN, SIKV_NUM_PLANES, SIKV_PLANE_SIGN,
};
use selfindexkv::numeric::round_half;
use selfindexkv::reference::attend::{attend_group, dense_attention_f64};
use selfindexkv::reference::calibrate::{calibrate_head, CalibrateParams};
use selfindexkv::reference::encode::{decode_key, decode_value, encode_token};
use selfindexkv::reference::score::{build_lut, group_mean_query, lut_score, sign_sign_score};
use selfindexkv::reference::topk::topk;
use selfindexkv::status::SikvStatus;

mod common;
use common::{HostPools as Pools, Rng};

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn config(f: impl FnOnce(&mut SikvConfig)) -> (CacheConfig, Layout) {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.num_layers = 1;
    c.num_q_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.page_size = 16;
    c.num_pages = 96;
    c.max_seqs = 4;
    c.max_seq_len = 1024;
    c.max_batch = 4;
    c.max_append_tokens = 64;
    c.n_sink = 4;
    c.n_heavy = 8;
    c.n_window = 16;
    c.budget_ratio = 0.25;
    c.budget_min = 8;
    c.budget_max = 24;
    c.rerank_factor = 0;
    f(&mut c);
    let cfg = CacheConfig::from_c(&c).unwrap();
    let layout = Layout::new(&cfg);
    (cfg, layout)
}

/// One sequence as the test sees it.
struct Seq {
    slot: usize,
    pages: Vec<i32>,
    /// len x H_kv x d raw keys / values.
    k: Vec<f32>,
    v: Vec<f32>,
    prompt_len: usize,
    /// The group-mean queries of the calibration tail, per KV head (nq x d).
    qbar_tail: Vec<Vec<f32>>,
}

struct World {
    cfg: CacheConfig,
    layout: Layout,
    pools: Pools,
    free_pages: Vec<i32>,
    seqs: Vec<Seq>,
    bias: Vec<f32>,
}

impl World {
    fn new(rng: &mut Rng, cfg: CacheConfig, layout: Layout) -> World {
        let mut free_pages: Vec<i32> = (0..layout.num_pages as i32).collect();
        rng.shuffle(&mut free_pages);
        let d = cfg.head_dim as usize;
        // Keys with a per-channel offset (so that the centre matters) and a few outlier channels.
        let bias: Vec<f32> = (0..d)
            .map(|c| {
                if c % 11 == 0 {
                    4.0 * rng.normal()
                } else {
                    0.5 * rng.normal()
                }
            })
            .collect();
        let pools = Pools::new(&layout);
        World {
            cfg,
            layout,
            pools,
            free_pages,
            seqs: Vec::new(),
            bias,
        }
    }
    fn d(&self) -> usize {
        self.cfg.head_dim as usize
    }
    fn hkv(&self) -> usize {
        self.cfg.num_kv_heads as usize
    }
    fn p(&self) -> usize {
        self.layout.page_size
    }
    fn storage(&self) -> HalfKind {
        self.cfg.dtype.storage()
    }
    fn token(&self, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
        let (d, hkv) = (self.d(), self.hkv());
        let k = (0..hkv * d).map(|i| rng.normal() + self.bias[i % d]).collect();
        let v = rng.normals(hkv * d);
        (k, v)
    }
    fn slot_of(&self, b: usize, pos: usize) -> i64 {
        let p = self.p();
        self.seqs[b].pages[pos / p] as i64 * p as i64 + (pos % p) as i64
    }
    fn len(&self, b: usize) -> usize {
        self.seqs[b].k.len() / (self.hkv() * self.d())
    }
    fn grow(&mut self, b: usize, new_len: usize) {
        while self.seqs[b].pages.len() * self.p() < new_len {
            let page = self.free_pages.pop().expect("test ran out of pages");
            self.seqs[b].pages.push(page);
        }
    }
    /// Adds a sequence with an `n`-token prompt and calibrates it.
    fn add_sequence(&mut self, rng: &mut Rng, slot: usize, n: usize, nq: usize) {
        let (d, hkv) = (self.d(), self.hkv());
        let hq = self.cfg.num_q_heads as usize;
        let g = self.cfg.group_size() as usize;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..n {
            let (kt, vt) = self.token(rng);
            k.extend(kt);
            v.extend(vt);
        }
        let q_tail = rng.normals(nq * hq * d);
        let qbar_tail = (0..hkv)
            .map(|h| {
                (0..nq)
                    .flat_map(|j| group_mean_query(&q_tail[(j * hq + h * g) * d..(j * hq + (h + 1) * g) * d], d))
                    .collect()
            })
            .collect();
        self.seqs.push(Seq {
            slot,
            pages: Vec::new(),
            k: k.clone(),
            v: v.clone(),
            prompt_len: n,
            qbar_tail,
        });
        let b = self.seqs.len() - 1;
        self.grow(b, n);
        let sm: Vec<i64> = (0..n).map(|t| self.slot_of(b, t)).collect();
        calibrate(
            &self.layout,
            &self.cfg,
            &mut self.pools.layer_mut(),
            slot,
            &k,
            &v,
            &q_tail,
            &sm,
        )
        .unwrap();
    }
    /// Grows sequence `b` by `count` positions that are never appended (a gap).
    fn skip(&mut self, rng: &mut Rng, b: usize, count: usize) {
        for _ in 0..count {
            let p = self.len(b);
            self.grow(b, p + 1);
            let (kt, vt) = self.token(rng);
            self.seqs[b].k.extend(&kt);
            self.seqs[b].v.extend(&vt);
        }
    }
    /// Appends tokens: `(b, count)` pairs, all in one call.
    fn append(&mut self, rng: &mut Rng, what: &[(usize, usize)]) {
        let mut k = Vec::new();
        let mut v = Vec::new();
        let mut sm = Vec::new();
        let mut slots = Vec::new();
        let mut pos = Vec::new();
        for &(b, count) in what {
            for _ in 0..count {
                let p = self.len(b);
                self.grow(b, p + 1);
                let (kt, vt) = self.token(rng);
                self.seqs[b].k.extend(&kt);
                self.seqs[b].v.extend(&vt);
                k.extend(kt);
                v.extend(vt);
                sm.push(self.slot_of(b, p));
                slots.push(self.seqs[b].slot as i32);
                pos.push(p as i32);
            }
        }
        append(
            &self.layout,
            &self.cfg,
            &mut self.pools.layer_mut(),
            &k,
            &v,
            &sm,
            &slots,
            &pos,
        )
        .unwrap();
    }
    fn table(&self, batch: &[usize]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
        let p = self.p();
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut last = Vec::new();
        for &b in batch {
            let len = self.len(b);
            let np = len.div_ceil(p);
            indices.extend(&self.seqs[b].pages[..np]);
            indptr.push(indices.len() as i32);
            last.push(if len == 0 { 0 } else { (len - (np - 1) * p) as i32 });
        }
        (indptr, indices, last)
    }
    fn key(&self, b: usize, t: usize, h: usize) -> &[f32] {
        let (d, hkv) = (self.d(), self.hkv());
        &self.seqs[b].k[(t * hkv + h) * d..(t * hkv + h + 1) * d]
    }
    fn value(&self, b: usize, t: usize, h: usize) -> &[f32] {
        let (d, hkv) = (self.d(), self.hkv());
        &self.seqs[b].v[(t * hkv + h) * d..(t * hkv + h + 1) * d]
    }
    fn state(&self, b: usize, h: usize) -> StateRecord {
        read_state(&self.layout, self.storage(), &self.pools.state, self.seqs[b].slot, h)
    }
    fn rows_of(&self, b: usize, h: usize, pos: usize) -> [&[u8]; SIKV_NUM_PLANES] {
        let p = self.p();
        self.pools
            .rows(&self.layout, self.seqs[b].pages[pos / p] as usize, h, pos % p)
    }
}

fn geometry(cfg: &CacheConfig) -> (usize, usize, usize) {
    (cfg.n_sink as usize, cfg.n_heavy as usize, cfg.n_window as usize)
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// State right after calibration: fitted arrays, meta, dense set, and the encoded pages.
fn check_calibration(w: &World, b: usize) {
    let (s, hn, wn) = geometry(&w.cfg);
    let d = w.d();
    let seq = &w.seqs[b];
    let n = seq.prompt_len;
    let p = CalibrateParams {
        centre: w.cfg.centre,
        n_sink: w.cfg.n_sink,
        n_heavy: w.cfg.n_heavy,
        n_window: w.cfg.n_window,
    };
    for h in 0..w.hkv() {
        let keys: Vec<f32> = (0..n).flat_map(|t| w.key(b, t, h).to_vec()).collect();
        let cal = calibrate_head(&p, d, &keys, &seq.qbar_tail[h]);
        let rec = w.state(b, h);
        assert_eq!(rec.centre, cal.centre);
        assert_eq!(rec.scale, cal.scale);
        assert_eq!(rec.inv_scale, cal.inv_scale);
        assert_eq!(rec.qmed, cal.qmed);
        assert_eq!(rec.codebook, cal.codebook);
        assert_eq!(rec.meta[META_PROMPT_LEN], n as i32);
        assert_eq!(rec.meta[META_CALIBRATED], 1);
        assert_eq!(rec.meta[META_N_HEAVY], cal.heavy.len() as i32);
        let room = n.saturating_sub(wn).saturating_sub(s);
        assert_eq!(cal.heavy.len(), hn.min(room), "heavy count (n={n})");
        let mut want_pos = vec![DENSE_EMPTY; s + hn + wn];
        for (t, w) in want_pos.iter_mut().enumerate().take(s.min(n)) {
            *w = t as i32;
        }
        for (i, &t) in cal.heavy.iter().enumerate() {
            assert!(
                (t as usize) >= s && (t as usize) < n.saturating_sub(wn),
                "heavy {t} outside [S, n - W)"
            );
            want_pos[s + i] = t as i32;
        }
        if wn > 0 {
            for t in s.max(n.saturating_sub(wn))..n {
                want_pos[s + hn + t % wn] = t as i32;
            }
        }
        assert_eq!(
            rec.dense_pos, want_pos,
            "dense_pos after calibration (b={b}, h={h}, n={n})"
        );
        check_dense_payload(w, b, h, &rec);
        // Every prompt token is encoded in its page slot, exactly as encode_token writes it.
        for t in 0..n {
            let mut scratch: Vec<Vec<u8>> = (0..SIKV_NUM_PLANES)
                .map(|q| vec![0u8; w.layout.format.row_bytes[q]])
                .collect();
            let mut it = scratch.iter_mut();
            let mut rows: [&mut [u8]; SIKV_NUM_PLANES] = std::array::from_fn(|_| it.next().unwrap().as_mut_slice());
            encode_token(
                &w.layout.format,
                w.storage(),
                w.cfg.sign_predicate,
                w.key(b, t, h),
                w.value(b, t, h),
                &rec.centre,
                &rec.inv_scale,
                &mut rows,
            );
            let got = w.rows_of(b, h, t);
            for q in 0..SIKV_NUM_PLANES {
                assert_eq!(got[q], &scratch[q][..], "plane {q} of token {t} (b={b}, h={h})");
            }
        }
    }
}

/// Dense entries hold k' = k - m and v, rounded to the storage type.
fn check_dense_payload(w: &World, b: usize, h: usize, rec: &StateRecord) {
    let d = w.d();
    for (i, &p) in rec.dense_pos.iter().enumerate() {
        if p < 0 {
            continue;
        }
        let (k, v) = (w.key(b, p as usize, h), w.value(b, p as usize, h));
        for c in 0..d {
            assert_eq!(
                rec.dense_k[i * d + c],
                round_half(w.storage(), k[c] - rec.centre[c]),
                "dense_k[{i}] (pos {p})"
            );
            assert_eq!(
                rec.dense_v[i * d + c],
                round_half(w.storage(), v[c]),
                "dense_v[{i}] (pos {p})"
            );
        }
    }
}

/// Runs select + attend + attend_dense on `batch` and checks everything against the reference.
fn check_decode_step(w: &World, rng: &mut Rng, batch: &[usize]) -> usize {
    check_decode_step_with(w, rng, batch, true)
}

/// `complete`: every position of every sequence was calibrated or appended (no gaps).
fn check_decode_step_with(w: &World, rng: &mut Rng, batch: &[usize], complete: bool) -> usize {
    let cfg = &w.cfg;
    let (s, hn, wn) = geometry(cfg);
    let (d, hkv) = (w.d(), w.hkv());
    let hq = cfg.num_q_heads as usize;
    let g = cfg.group_size() as usize;
    let kmax = cfg.budget.max as usize;
    let (indptr, indices, last) = w.table(batch);
    let table = PageTable {
        indptr: &indptr,
        indices: &indices,
        last_page_len: &last,
    };
    let slots: Vec<i32> = batch.iter().map(|&b| w.seqs[b].slot as i32).collect();
    let q = rng.normals(batch.len() * hq * d);
    let mut idx = vec![12345i32; batch.len() * hkv * kmax];
    let mut cnt = vec![-7i32; batch.len() * hkv];
    let layer = w.pools.layer_ref();
    select(&w.layout, cfg, &layer, &table, &slots, &q, &mut idx, &mut cnt).unwrap();
    let mut out = vec![f32::NAN; batch.len() * hq * d];
    attend(&w.layout, cfg, &layer, &table, &slots, &q, &idx, &cnt, &mut out).unwrap();
    let mut out_dense = vec![f32::NAN; batch.len() * hq * d];
    attend_dense(&w.layout, cfg, &layer, &table, &slots, &q, &mut out_dense).unwrap();

    let mut forced_seen = 0;
    for (bi, &b) in batch.iter().enumerate() {
        let len = w.len(b);
        assert_eq!(table.seq_len(bi, w.p()), len);
        let prompt_len = w.seqs[b].prompt_len;
        for h in 0..hkv {
            let rec = w.state(b, h);
            let ctx = format!("b={b} h={h} len={len}");
            // Dense-set bookkeeping: sinks, the calibration heavy set, the current window.
            let heavy: Vec<u32> = rec.dense_pos[s..s + hn]
                .iter()
                .filter(|&&p| p >= 0)
                .map(|&p| p as u32)
                .collect();
            assert_eq!(heavy.len(), rec.meta[META_N_HEAVY] as usize, "{ctx}");
            for t in 0..s {
                assert_eq!(
                    rec.dense_pos[t],
                    if t < len { t as i32 } else { DENSE_EMPTY },
                    "sink entry {t} {ctx}"
                );
            }
            let win_lo = s.max(len.saturating_sub(wn));
            let mut window: Vec<usize> = rec.dense_pos[s + hn..]
                .iter()
                .filter(|&&p| p >= 0 && (p as usize) >= win_lo)
                .map(|&p| p as usize)
                .collect();
            window.sort();
            if complete {
                assert_eq!(window, (win_lo..len).collect::<Vec<_>>(), "window entries {ctx}");
            }
            check_dense_payload(w, b, h, &rec);

            let cands: Vec<u32> = (s as u32..win_lo as u32).filter(|p| !heavy.contains(p)).collect();
            // Sinks, heavy, window and candidates partition [0, len).
            assert!(
                !complete || s.min(len) + heavy.len() + (len - win_lo.min(len)) + cands.len() == len,
                "partition {ctx}"
            );

            // Budget rule.
            let n = cands.len() as f64;
            let want_k = ((cfg.budget.ratio as f64 * n).ceil() as usize)
                .clamp(cfg.budget.min as usize, cfg.budget.max as usize)
                .min(cands.len());
            let row = &idx[(bi * hkv + h) * kmax..(bi * hkv + h + 1) * kmax];
            assert_eq!(cnt[bi * hkv + h] as usize, want_k, "count {ctx}");
            let sel: Vec<u32> = row[..want_k].iter().map(|&p| p as u32).collect();
            assert!(row[want_k..].iter().all(|&p| p == -1), "row tail must be -1 {ctx}");
            assert!(sel.windows(2).all(|x| x[0] < x[1]), "ascending {ctx}: {sel:?}");
            for &p in &sel {
                assert!(
                    (p as usize) < len && p as usize >= s,
                    "{p} is a sink or past the end {ctx}"
                );
                assert!(!heavy.contains(&p), "{p} is heavy {ctx}");
                assert!((p as usize) < win_lo, "{p} is in the window {ctx}");
            }

            // The expected selection, from the reference.
            let qbar = group_mean_query(&q[(bi * hq + h * g) * d..(bi * hq + (h + 1) * g) * d], d);
            let forced = |p: u32| cfg.force_generated && p as usize >= prompt_len;
            let lut = build_lut(&rec.codebook, &qbar);
            let s1: Vec<f32> = cands
                .iter()
                .map(|&p| {
                    let sign = w.rows_of(b, h, p as usize)[SIKV_PLANE_SIGN];
                    if forced(p) {
                        f32::INFINITY
                    } else {
                        match cfg.selector {
                            Selector::Lut => lut_score(&lut, sign),
                            Selector::SignSign => sign_sign_score(sign, &qbar, &rec.qmed),
                        }
                    }
                })
                .collect();
            let want = if cfg.rerank_factor >= 2 {
                let stage1 = topk(&s1, &cands, cands.len().min(cfg.rerank_factor as usize * want_k));
                let s2: Vec<f32> = stage1
                    .iter()
                    .map(|&p| {
                        if forced(p) {
                            f32::INFINITY
                        } else {
                            let kh =
                                decode_key(&w.layout.format, w.storage(), &w.rows_of(b, h, p as usize), &rec.scale);
                            kh.iter().zip(&qbar).fold(0f32, |a, (x, y)| a + x * y)
                        }
                    })
                    .collect();
                let chosen = topk(&s2, &stage1, want_k);
                assert!(chosen.iter().all(|p| stage1.contains(p)));
                chosen
            } else {
                topk(&s1, &cands, want_k)
            };
            assert_eq!(sel, want, "selection {ctx}");
            // Forced generated tokens: all selected while they fit, else the oldest ones.
            let forced_c: Vec<u32> = cands.iter().copied().filter(|&p| forced(p)).collect();
            forced_seen += forced_c.len();
            if forced_c.len() <= want_k {
                assert!(forced_c.iter().all(|p| sel.contains(p)), "forced tokens missing {ctx}");
            } else {
                assert_eq!(sel, forced_c[..want_k].to_vec(), "forced overflow {ctx}");
            }

            // Attention over exactly the expected token set.
            let mut keys = Vec::new();
            let mut values = Vec::new();
            let mut dense_keys = Vec::new();
            for (i, &p) in rec.dense_pos.iter().enumerate() {
                if p < 0 || p as usize >= len || (i >= s + hn && (p as usize) < win_lo) {
                    continue;
                }
                dense_keys.push(p as usize);
                keys.push(rec.dense_k[i * d..(i + 1) * d].to_vec());
                values.push(rec.dense_v[i * d..(i + 1) * d].to_vec());
            }
            let mut all_keys = keys.clone();
            let mut all_values = values.clone();
            for &p in &sel {
                let rows = w.rows_of(b, h, p as usize);
                keys.push(decode_key(&w.layout.format, w.storage(), &rows, &rec.scale));
                values.push(decode_value(&w.layout.format, w.storage(), &rows));
            }
            for &p in &cands {
                let rows = w.rows_of(b, h, p as usize);
                all_keys.push(decode_key(&w.layout.format, w.storage(), &rows, &rec.scale));
                all_values.push(decode_value(&w.layout.format, w.storage(), &rows));
            }
            if complete {
                assert_eq!(
                    dense_keys.len() + cands.len(),
                    len,
                    "dense + candidates cover the sequence {ctx}"
                );
            }
            let qs = &q[(bi * hq + h * g) * d..(bi * hq + (h + 1) * g) * d];
            let want_out = attend_group(qs, d, cfg.softmax_scale, &keys, &values);
            let got = &out[(bi * hq + h * g) * d..(bi * hq + (h + 1) * g) * d];
            assert_eq!(got, &want_out[..], "attend output {ctx}");
            let want_dense = attend_group(qs, d, cfg.softmax_scale, &all_keys, &all_values);
            let got_dense = &out_dense[(bi * hq + h * g) * d..(bi * hq + (h + 1) * g) * d];
            assert_eq!(got_dense, &want_dense[..], "attend_dense output {ctx}");
        }
    }
    forced_seen
}

fn run_end_to_end(name: &str, tweak: impl FnOnce(&mut SikvConfig)) -> usize {
    let mut rng = Rng::new(name);
    let (cfg, layout) = config(tweak);
    let mut w = World::new(&mut rng, cfg, layout);
    let p = w.p();
    let not_multiple = |n: usize| if n % p == 0 { n + 1 } else { n };
    let lens = [not_multiple(90 + rng.below(110)), not_multiple(33 + rng.below(40)), 13];
    let slots = [2usize, 0, 3];
    for b in 0..3 {
        let nq = 1 + rng.below(3);
        w.add_sequence(&mut rng, slots[b], lens[b], nq);
        check_calibration(&w, b);
    }
    let mut forced = check_decode_step(&w, &mut rng, &[0, 1, 2]);
    for step in 0..40 {
        // Ragged appends: sequence 0 grows by 2 tokens every other step, in the same call.
        let what: Vec<(usize, usize)> = if step % 2 == 0 {
            vec![(0, 2), (1, 1), (2, 1)]
        } else {
            vec![(2, 1), (0, 1), (1, 1)]
        };
        w.append(&mut rng, &what);
        // The batch order differs from the slot order; sometimes a sub-batch.
        let batch: Vec<usize> = match step % 3 {
            0 => vec![0, 1, 2],
            1 => vec![2, 0, 1],
            _ => vec![1],
        };
        forced += check_decode_step(&w, &mut rng, &batch);
    }
    forced
}

// ---------------------------------------------------------------------------------------------
// End to end.

#[test]
fn end_to_end_lut_one_stage() {
    run_end_to_end("end_to_end_lut_one_stage", |_| {});
}

#[test]
fn end_to_end_lut_two_stage_bf16_4bit() {
    run_end_to_end("end_to_end_lut_two_stage_bf16_4bit", |c| {
        c.head_dim = 128;
        c.dtype = SIKV_DTYPE_BF16;
        c.key_bits = 4;
        c.value_bits = 2;
        c.rerank_factor = 3;
        c.centre = SIKV_CENTRE_MEAN;
    });
}

#[test]
fn end_to_end_sign_sign_force_generated_parity() {
    let forced = run_end_to_end("end_to_end_sign_sign_force_generated_parity", |c| {
        c.head_dim = 256;
        c.n_sink = 0;
        c.n_window = 0;
        c.selector = SIKV_SELECTOR_SIGN_SIGN;
        c.flags = SIKV_FLAG_FORCE_GENERATED | SIKV_FLAG_PARITY_SIGN;
        c.budget_ratio = 0.0;
        c.budget_min = 20;
        c.budget_max = 20;
    });
    assert!(forced > 0, "the forced-selection path must be exercised");
}

#[test]
fn end_to_end_force_generated_with_window_and_rerank() {
    run_end_to_end("end_to_end_force_generated_with_window_and_rerank", |c| {
        c.n_window = 8;
        c.flags = SIKV_FLAG_FORCE_GENERATED;
        c.rerank_factor = 2;
        c.value_bits = 4;
    });
}

// ---------------------------------------------------------------------------------------------
// Degenerate equivalences (method §10.7 item 7).

/// Calibrates a batch with 16-bit planes, decodes a few steps and returns (world, outputs of
/// attend, outputs of the f64 dense oracle over raw keys).
fn sixteen_bit_outputs(
    name: &str,
    seed_rng: &mut Rng,
    tweak: impl FnOnce(&mut SikvConfig),
) -> (Vec<f32>, Vec<f64>, Vec<usize>) {
    let (cfg, layout) = config(|c| {
        c.key_bits = 16;
        c.value_bits = 16;
        c.budget_ratio = 1.0;
        c.budget_min = 1;
        c.budget_max = 4096;
        tweak(c);
    });
    let mut rng = Rng(seed_rng.next_u64() | 1);
    let mut w = World::new(&mut rng, cfg, layout);
    let lens = [150usize, 77, 5];
    for (b, &len) in lens.iter().enumerate() {
        w.add_sequence(&mut rng, b, len, 2);
    }
    for _ in 0..9 {
        w.append(&mut rng, &[(0, 1), (1, 2), (2, 1)]);
    }
    let cfg = &w.cfg;
    let (d, hkv) = (w.d(), w.hkv());
    let hq = cfg.num_q_heads as usize;
    let g = cfg.group_size() as usize;
    let batch = [0usize, 1, 2];
    let (indptr, indices, last) = w.table(&batch);
    let table = PageTable {
        indptr: &indptr,
        indices: &indices,
        last_page_len: &last,
    };
    let slots: Vec<i32> = batch.iter().map(|&b| w.seqs[b].slot as i32).collect();
    let q = rng.normals(batch.len() * hq * d);
    let kmax = cfg.budget.max as usize;
    let mut idx = vec![0i32; batch.len() * hkv * kmax];
    let mut cnt = vec![0i32; batch.len() * hkv];
    let layer = w.pools.layer_ref();
    select(&w.layout, cfg, &layer, &table, &slots, &q, &mut idx, &mut cnt).unwrap();
    let mut out = vec![0f32; batch.len() * hq * d];
    attend(&w.layout, cfg, &layer, &table, &slots, &q, &idx, &cnt, &mut out).unwrap();
    let mut oracle = Vec::new();
    let mut counts = Vec::new();
    for &b in &batch {
        let len = w.len(b);
        for h in 0..hkv {
            // Every token is either dense or selected.
            let rec = w.state(b, h);
            let n_dense = rec.dense_pos.iter().filter(|&&p| p >= 0).count();
            counts.push(cnt[b * hkv + h] as usize + n_dense);
            assert!(
                cnt[b * hkv + h] as usize + n_dense >= len,
                "{name}: every token attended"
            );
            let keys: Vec<Vec<f32>> = (0..len).map(|t| w.key(b, t, h).to_vec()).collect();
            let values: Vec<Vec<f32>> = (0..len).map(|t| w.value(b, t, h).to_vec()).collect();
            oracle.extend(dense_attention_f64(
                &q[(b * hq + h * g) * d..(b * hq + (h + 1) * g) * d],
                d,
                cfg.softmax_scale,
                &keys,
                &values,
            ));
        }
    }
    let mut dense_out = vec![0f32; batch.len() * hq * d];
    attend_dense(&w.layout, cfg, &layer, &table, &slots, &q, &mut dense_out).unwrap();
    assert_eq!(
        dense_out, out,
        "{name}: with k = N, attend and attend_dense see the same tokens in the same order"
    );
    (out, oracle, counts)
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

#[test]
fn sixteen_bit_full_budget_equals_dense_attention() {
    let mut rng = Rng::new("sixteen_bit_full_budget_equals_dense_attention");
    for (dtype, tol) in [(0u32, 2e-3), (SIKV_DTYPE_BF16, 2e-2)] {
        let (out, oracle, counts) = sixteen_bit_outputs("sixteen_bit", &mut rng, |c| {
            c.dtype = dtype;
            c.n_sink = 0;
            c.n_heavy = 0;
            c.n_window = 0;
        });
        let err = max_abs_diff(&out, &oracle);
        assert!(err < tol, "dtype {dtype}: max |attend - dense f64| = {err}");
        // S = H = W = 0: everything comes from the planes (k = N).
        assert_eq!(counts, vec![159, 159, 95, 95, 14, 14]);
    }
}

#[test]
fn output_does_not_depend_on_the_centre() {
    let mut rng = Rng::new("output_does_not_depend_on_the_centre");
    let seed = rng.next_u64();
    let (median, oracle, _) = sixteen_bit_outputs("median", &mut Rng(seed), |c| c.centre = 0);
    let (mean, oracle2, _) = sixteen_bit_outputs("mean", &mut Rng(seed), |c| c.centre = SIKV_CENTRE_MEAN);
    assert_eq!(oracle, oracle2, "same data for both centres");
    let diff = median
        .iter()
        .zip(&mean)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 2e-3, "median vs mean centring: max diff {diff}");
    assert!(max_abs_diff(&median, &oracle) < 2e-3);
    assert!(max_abs_diff(&mean, &oracle) < 2e-3);
    let _ = Centre::Median;
}

// ---------------------------------------------------------------------------------------------
// Page table and validation.

#[test]
fn page_table_lengths_locations_and_validation() {
    let (cfg, layout) = config(|_| {});
    let indptr = [0, 2, 2, 5];
    let indices = [7, 3, 9, 1, 4];
    let last = [5, 0, 16];
    let t = PageTable {
        indptr: &indptr,
        indices: &indices,
        last_page_len: &last,
    };
    assert_eq!(t.batch(), 3);
    assert_eq!((t.seq_len(0, 16), t.seq_len(1, 16), t.seq_len(2, 16)), (21, 0, 48));
    assert_eq!(t.locate(0, 0, 16), (7, 0));
    assert_eq!(t.locate(0, 20, 16), (3, 4));
    assert_eq!(t.locate(2, 47, 16), (4, 15));
    assert_eq!(t.locate(2, 16, 16), (1, 0));
    t.validate(&layout, &cfg).unwrap();

    let bad = |indptr: &[i32], indices: &[i32], last: &[i32], status: SikvStatus, needle: &str| {
        let e = PageTable {
            indptr,
            indices,
            last_page_len: last,
        }
        .validate(&layout, &cfg)
        .unwrap_err();
        assert_eq!(e.status, status, "{}", e.message);
        assert!(
            e.message.contains(needle),
            "message {:?} should name {needle:?}",
            e.message
        );
    };
    bad(
        &[0, 2],
        &[1, 9999],
        &[3],
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.indices[1] = 9999",
    );
    bad(
        &[0, 1],
        &[-1],
        &[3],
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.indices[0]",
    );
    bad(
        &[0, 1, 2],
        &[1, 2],
        &[3],
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "indptr",
    );
    bad(
        &[1, 2],
        &[1, 2],
        &[3],
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "indptr[0]",
    );
    bad(
        &[0, 2, 1],
        &[1, 2],
        &[3, 3],
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "indptr[2]",
    );
    bad(&[0, 3], &[1, 2], &[3], SikvStatus::SIKV_ERR_INVALID_ARGUMENT, "indices");
    bad(
        &[0, 1],
        &[1],
        &[0],
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "last_page_len[0]",
    );
    bad(
        &[0, 1],
        &[1],
        &[17],
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "last_page_len[0]",
    );
    bad(
        &[0, 0],
        &[],
        &[2],
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "last_page_len[0]",
    );
    bad(
        &[0, 0, 0, 0, 0, 0],
        &[],
        &[0; 5],
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "max_batch",
    );
    let many: Vec<i32> = (0..65).map(|i| i % 64).collect();
    bad(&[0, 65], &many, &[1], SikvStatus::SIKV_ERR_OUT_OF_BOUNDS, "max_seq_len");
}

#[test]
fn stages_validate_before_writing() {
    let mut rng = Rng::new("stages_validate_before_writing");
    let (cfg, layout) = config(|_| {});
    let mut w = World::new(&mut rng, cfg.clone(), layout.clone());
    let (d, hkv) = (w.d(), w.hkv());
    let hq = cfg.num_q_heads as usize;
    w.add_sequence(&mut rng, 1, 40, 1);
    let n = 20;
    let k = rng.normals(n * hkv * d);
    let v = rng.normals(n * hkv * d);
    let q = rng.normals(hq * d);
    let sm: Vec<i64> = (0..n as i64).map(|t| 16 * 50 + t).collect();
    let err = |r: selfindexkv::status::Result<()>, status: SikvStatus, needle: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.status, status, "{}", e.message);
        assert!(
            e.message.contains(needle),
            "message {:?} should name {needle:?}",
            e.message
        );
    };
    let before = w.pools.clone();
    let mut p = w.pools.clone();
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 1, &k, &v, &q, &sm),
        SikvStatus::SIKV_ERR_ALREADY_CALIBRATED,
        "seq_slot = 1",
    );
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 4, &k, &v, &q, &sm),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "seq_slot",
    );
    let mut bad_sm = sm.clone();
    bad_sm[7] = 96 * 16;
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 0, &k, &v, &q, &bad_sm),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "slot_mapping[7]",
    );
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 0, &k[1..], &v, &q, &sm),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "k has",
    );
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 0, &k, &v[..d], &q, &sm),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "v has",
    );
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 0, &k, &v, &q[1..], &sm),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "q_tail",
    );
    err(
        calibrate(&layout, &cfg, &mut p.layer_mut(), 0, &[], &[], &q, &[]),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "slot_mapping",
    );
    // Append: uncalibrated slot, positions, lengths.
    let one_k = &k[..hkv * d];
    let one_v = &v[..hkv * d];
    err(
        append(&layout, &cfg, &mut p.layer_mut(), one_k, one_v, &[5], &[0], &[3]),
        SikvStatus::SIKV_ERR_NOT_CALIBRATED,
        "seq_slot[0] = 0",
    );
    err(
        append(&layout, &cfg, &mut p.layer_mut(), one_k, one_v, &[5], &[1], &[1024]),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "position[0]",
    );
    err(
        append(&layout, &cfg, &mut p.layer_mut(), one_k, one_v, &[5], &[9], &[3]),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "seq_slot[0]",
    );
    err(
        append(
            &layout,
            &cfg,
            &mut p.layer_mut(),
            one_k,
            one_v,
            &[5, 6],
            &[1, 1],
            &[40, 41],
        ),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "k has",
    );
    err(
        append(&layout, &cfg, &mut p.layer_mut(), one_k, one_v, &[5], &[1, 1], &[40]),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "seq_slot",
    );
    err(
        append(
            &layout,
            &cfg,
            &mut p.layer_mut(),
            one_k,
            one_v,
            &[-1 + 96 * 16 + 1],
            &[1],
            &[40],
        ),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "slot_mapping[0]",
    );
    // A valid token followed by an invalid one: nothing is written.
    let two_k = &k[..2 * hkv * d];
    let two_v = &v[..2 * hkv * d];
    err(
        append(
            &layout,
            &cfg,
            &mut p.layer_mut(),
            two_k,
            two_v,
            &[5, 6],
            &[1, 0],
            &[40, 0],
        ),
        SikvStatus::SIKV_ERR_NOT_CALIBRATED,
        "seq_slot[1]",
    );
    assert!(p == before, "a failed call must not write anything");

    // Select / attend.
    let (indptr, indices, last) = w.table(&[0]);
    let t = PageTable {
        indptr: &indptr,
        indices: &indices,
        last_page_len: &last,
    };
    let kmax = cfg.budget.max as usize;
    let layer = w.pools.layer_ref();
    let mut idx = vec![0i32; hkv * kmax];
    let mut cnt = vec![0i32; hkv];
    err(
        select(&layout, &cfg, &layer, &t, &[0], &q, &mut idx, &mut cnt),
        SikvStatus::SIKV_ERR_NOT_CALIBRATED,
        "seq_slot[0] = 0",
    );
    err(
        select(&layout, &cfg, &layer, &t, &[1], &q[1..], &mut idx, &mut cnt),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "q has",
    );
    err(
        select(&layout, &cfg, &layer, &t, &[1, 1], &q, &mut idx, &mut cnt),
        SikvStatus::SIKV_ERR_INVALID_ARGUMENT,
        "seq_slot",
    );
    err(
        select(&layout, &cfg, &layer, &t, &[1], &q, &mut idx[1..], &mut cnt),
        SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
        "indices",
    );
    err(
        select(&layout, &cfg, &layer, &t, &[1], &q, &mut idx, &mut cnt[1..]),
        SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
        "counts",
    );
    select(&layout, &cfg, &layer, &t, &[1], &q, &mut idx, &mut cnt).unwrap();
    let mut out = vec![0f32; hq * d];
    err(
        attend(&layout, &cfg, &layer, &t, &[1], &q, &idx, &cnt, &mut out[1..]),
        SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
        "out",
    );
    let mut big = cnt.clone();
    big[1] = kmax as i32 + 1;
    err(
        attend(&layout, &cfg, &layer, &t, &[1], &q, &idx, &big, &mut out),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        "counts[1]",
    );
    let mut far = idx.clone();
    far[kmax] = 40;
    err(
        attend(&layout, &cfg, &layer, &t, &[1], &q, &far, &cnt, &mut out),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
        &format!("indices[{kmax}] = 40"),
    );
    err(
        attend_dense(&layout, &cfg, &layer, &t, &[3], &q, &mut out),
        SikvStatus::SIKV_ERR_NOT_CALIBRATED,
        "seq_slot[0] = 3",
    );
    attend(&layout, &cfg, &layer, &t, &[1], &q, &idx, &cnt, &mut out).unwrap();

    // reset_sequence makes a slot calibratable again.
    let mut p = w.pools.clone();
    reset_sequence(&layout, &mut p.state, 1).unwrap();
    let rec = read_state(&layout, HalfKind::F16, &p.state, 1, 0);
    assert_eq!(rec.meta[META_CALIBRATED], 0);
    assert!(rec.dense_pos.iter().all(|&x| x == DENSE_EMPTY));
    calibrate(&layout, &cfg, &mut p.layer_mut(), 1, &k, &v, &q, &sm).unwrap();
    assert_eq!(
        read_state(&layout, HalfKind::F16, &p.state, 1, 1).meta[META_PROMPT_LEN],
        n as i32
    );
    assert!(reset_sequence(&layout, &mut p.state, 4).is_err());
}

/// Window entries hold the last position written to them; one whose position has left the
/// window (here: because positions were skipped) must not be attended.
#[test]
fn stale_window_entries_are_not_attended() {
    let mut rng = Rng::new("stale_window_entries_are_not_attended");
    let (cfg, layout) = config(|_| {});
    let mut w = World::new(&mut rng, cfg, layout);
    w.add_sequence(&mut rng, 1, 30, 2);
    check_decode_step(&w, &mut rng, &[0]);
    w.skip(&mut rng, 0, 10);
    w.append(&mut rng, &[(0, 1)]); // position 40 only
    let (s, hn, wn) = geometry(&w.cfg);
    let rec = w.state(0, 0);
    let stale = rec.dense_pos[s + hn..]
        .iter()
        .filter(|&&p| p >= 0 && (p as usize) < 41 - wn)
        .count();
    assert!(stale > 0, "the test needs stale window entries");
    assert_eq!(rec.dense_pos[s + hn + 40 % wn], 40);
    check_decode_step_with(&w, &mut rng, &[0], false);
}

#[test]
fn negative_slot_mapping_skips_the_page_write_only() {
    let mut rng = Rng::new("negative_slot_mapping_skips_the_page_write_only");
    let (cfg, layout) = config(|_| {});
    let (d, hkv) = (cfg.head_dim as usize, cfg.num_kv_heads as usize);
    let hq = cfg.num_q_heads as usize;
    let mut pools = Pools::new(&layout);
    let n = 30;
    let k = rng.normals(n * hkv * d);
    let v = rng.normals(n * hkv * d);
    let q = rng.normals(hq * d);
    // Tokens 0..16 go to page 5, tokens 16..30 are skipped.
    let sm: Vec<i64> = (0..n as i64).map(|t| if t < 16 { 5 * 16 + t } else { -1 }).collect();
    calibrate(&layout, &cfg, &mut pools.layer_mut(), 0, &k, &v, &q, &sm).unwrap();
    for p in 0..SIKV_NUM_PLANES {
        let row = layout.format.row_bytes[p];
        for page in 0..layout.num_pages {
            for h in 0..hkv {
                for s in 0..16 {
                    let o = layout.row_offset(p, page, h, s);
                    let written = pools.planes[p][o..o + row].iter().any(|&x| x != 0);
                    if page != 5 {
                        assert!(!written, "plane {p} page {page} must stay untouched");
                    }
                }
            }
        }
    }
    assert!(pools.planes[SIKV_PLANE_SIGN].iter().any(|&x| x != 0));
    // The window (positions 14..30) is still in the dense set.
    let rec = read_state(&layout, HalfKind::F16, &pools.state, 0, 1);
    let s_h = (cfg.n_sink + cfg.n_heavy) as usize;
    let mut win: Vec<i32> = rec.dense_pos[s_h..].to_vec();
    win.sort();
    assert_eq!(win, (14..30).collect::<Vec<i32>>());
    // Append with a negative slot mapping still updates the window.
    let (k1, v1) = (rng.normals(hkv * d), rng.normals(hkv * d));
    append(&layout, &cfg, &mut pools.layer_mut(), &k1, &v1, &[-1], &[0], &[30]).unwrap();
    let rec = read_state(&layout, HalfKind::F16, &pools.state, 0, 0);
    assert_eq!(rec.dense_pos[s_h + 30 % 16], 30);
    assert_eq!(rec.dense_v[(s_h + 30 % 16) * d], round_half(HalfKind::F16, v1[0]));
}
