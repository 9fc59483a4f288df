//! `sikv_attend_selected` on the CPU: the library's own selection handed back is `sikv_attend`
//! bit for bit, and another selection is attended as given (a full one is the dense decode,
//! the first few candidates match a float64 recomputation from the exact keys and values).
//! Bad selections are in `abi_errors.rs`.

mod common;

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::ptr::null_mut;

use common::{last_error, OwnedCache, Rng};
use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::ffi::*;
use selfindexkv::{numeric, CacheConfig, SikvStatus};

const HQ: usize = 8;
const HK: usize = 2;
const D: usize = 64;
const SINKS: u32 = 4;
const HEAVY: u32 = 8;
const WINDOW: u32 = 16;

fn config(profile: u32, dtype: u32, layers: u32, budget_max: u32) -> SikvConfig {
    let mut c = SikvConfig::for_profile(profile).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.dtype = dtype;
    c.num_layers = layers;
    c.num_q_heads = HQ as u32;
    c.num_kv_heads = HK as u32;
    c.head_dim = D as u32;
    c.page_size = 16;
    c.max_seqs = 2;
    c.max_batch = 2;
    c.max_seq_len = 1024;
    c.max_append_tokens = 64;
    c.n_sink = SINKS;
    c.n_heavy = HEAVY;
    c.n_window = WINDOW;
    c.budget_min = 8;
    c.budget_max = budget_max;
    // The identities tested here are those of the sparse path: never the dense crossover.
    c.dense_crossover = 0;
    c
}

fn bytes(dt: Dtype, x: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; x.len() * dt.size()];
    numeric::from_f32(dt, x, &mut b);
    b
}

/// Exact activations of one sequence at one layer, as handed to the cache: `[pos][H_kv][d]`.
struct Kv {
    k: Vec<f32>,
    v: Vec<f32>,
}

fn vp(b: &[u8]) -> *const c_void {
    b.as_ptr() as *const c_void
}

#[test]
fn the_own_selection_given_back_is_attend() {
    let mut rng = Rng::new("the_own_selection_given_back_is_attend");
    let ids = [41i64, 42];
    let prompts = [203u32, 517];
    let steps = 5;
    for profile in [SIKV_PROFILE_2_1, SIKV_PROFILE_16_1] {
        for dtype in [SIKV_DTYPE_F32, SIKV_DTYPE_F16] {
            let c = config(profile, dtype, 2, 48);
            let dt = CacheConfig::from_c(&c).unwrap().dtype;
            let mut h = null_mut();
            assert_eq!(sikv_cache_create(&c, &mut h), SikvStatus::SIKV_OK, "{}", last_error());
            let cache = OwnedCache(h);
            for (&id, &n) in ids.iter().zip(&prompts) {
                assert_eq!(sikv_seq_add(cache.0, id), SikvStatus::SIKV_OK);
                for layer in 0..c.num_layers {
                    let k = bytes(dt, &rng.normals(n as usize * HK * D));
                    let v = bytes(dt, &rng.normals(n as usize * HK * D));
                    let q = bytes(dt, &rng.normals(2 * HQ * D));
                    let s = sikv_calibrate(cache.0, layer, id, n, vp(&k), vp(&v), 2, vp(&q), null_mut());
                    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
                }
            }
            let rows = ids.len() * HK;
            let kmax = c.budget_max as usize;
            for step in 0..steps {
                for layer in 0..c.num_layers {
                    let k = bytes(dt, &rng.normals(ids.len() * HK * D));
                    let v = bytes(dt, &rng.normals(ids.len() * HK * D));
                    let s = sikv_append(
                        cache.0,
                        layer,
                        2,
                        ids.as_ptr(),
                        std::ptr::null(),
                        vp(&k),
                        vp(&v),
                        null_mut(),
                    );
                    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
                    let q = bytes(dt, &rng.normals(ids.len() * HQ * D));
                    let mut idx = vec![0i32; rows * kmax];
                    let mut cnt = vec![0i32; rows];
                    let s = sikv_select(
                        cache.0,
                        layer,
                        2,
                        ids.as_ptr(),
                        vp(&q),
                        idx.as_mut_ptr(),
                        cnt.as_mut_ptr(),
                        null_mut(),
                    );
                    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
                    assert!(cnt.iter().all(|&x| x > 0), "empty selection: {cnt:?}");
                    let mut want = vec![0u8; q.len()];
                    let s = sikv_attend(
                        cache.0,
                        layer,
                        2,
                        ids.as_ptr(),
                        vp(&q),
                        want.as_mut_ptr() as *mut c_void,
                        null_mut(),
                    );
                    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
                    // What follows a row's count is the caller's business.
                    for r in 0..rows {
                        for (j, x) in idx[r * kmax..(r + 1) * kmax].iter_mut().enumerate() {
                            if j >= cnt[r] as usize {
                                *x = if j % 2 == 0 { i32::MAX } else { -7 };
                            }
                        }
                    }
                    let mut got = vec![0xA5u8; q.len()];
                    let s = sikv_attend_selected(
                        cache.0,
                        layer,
                        2,
                        ids.as_ptr(),
                        vp(&q),
                        idx.as_ptr(),
                        cnt.as_ptr(),
                        got.as_mut_ptr() as *mut c_void,
                        null_mut(),
                    );
                    assert_eq!(s, SikvStatus::SIKV_OK, "{}", last_error());
                    assert!(
                        got == want,
                        "profile {profile} dtype {dtype} step {step} layer {layer}: attend_selected with \
                         select's output differs from attend"
                    );
                }
            }
        }
    }
}

/// A two-sequence f32 cache at one layer, with the exact keys and values it was given.
fn build(rng: &mut Rng, profile: u32, ids: &[i64], prompts: &[u32], steps: u32) -> (Cache, Vec<Kv>) {
    // budget_max above every candidate count, so a full selection fits.
    let c = config(profile, SIKV_DTYPE_F32, 1, 256);
    let mut cache = Cache::new(CacheConfig::from_c(&c).unwrap()).unwrap();
    let null = null_mut();
    let mut kv = Vec::new();
    for (&id, &n) in ids.iter().zip(prompts) {
        cache.add_seq(id).unwrap();
        let k = rng.normals(n as usize * HK * D);
        let v = rng.normals(n as usize * HK * D);
        let q = rng.normals(HQ * D);
        let (kb, vb, qb) = (bytes(Dtype::F32, &k), bytes(Dtype::F32, &v), bytes(Dtype::F32, &q));
        cache
            .calibrate(
                0,
                id,
                n,
                Activations::Host(&kb),
                Activations::Host(&vb),
                1,
                Activations::Host(&qb),
                null,
            )
            .unwrap();
        kv.push(Kv { k, v });
    }
    for _ in 0..steps {
        let k = rng.normals(ids.len() * HK * D);
        let v = rng.normals(ids.len() * HK * D);
        let (kb, vb) = (bytes(Dtype::F32, &k), bytes(Dtype::F32, &v));
        let ones = vec![1u32; ids.len()];
        cache
            .append(0, ids, &ones, Activations::Host(&kb), Activations::Host(&vb), null)
            .unwrap();
        for (b, e) in kv.iter_mut().enumerate() {
            e.k.extend_from_slice(&k[b * HK * D..(b + 1) * HK * D]);
            e.v.extend_from_slice(&v[b * HK * D..(b + 1) * HK * D]);
        }
    }
    (cache, kv)
}

fn attend_with(cache: &mut Cache, ids: &[i64], q: &[u8], idx: &[i32], cnt: &[i32]) -> Vec<u8> {
    let mut out = vec![0u8; q.len()];
    cache
        .attend_selected(
            0,
            ids,
            Activations::Host(q),
            idx,
            cnt,
            Output::Host(&mut out),
            null_mut(),
        )
        .unwrap_or_else(|e| panic!("attend_selected: {e}"));
    out
}

fn floats(b: &[u8]) -> Vec<f32> {
    let mut f = vec![0f32; b.len() / 4];
    numeric::to_f32(Dtype::F32, b, &mut f);
    f
}

/// Softmax attention in float64 of query head `qh` of sequence `b` over `set`, from the exact
/// keys and values (the stored keys are centred, which shifts every score of a head equally).
fn reference(kv: &Kv, q: &[f32], b: usize, qh: usize, set: &[u32], scale: f32) -> Vec<f64> {
    let h = qh / (HQ / HK);
    let qv = &q[(b * HQ + qh) * D..(b * HQ + qh + 1) * D];
    let row = |x: &[f32], p: u32| -> Vec<f64> {
        let at = (p as usize * HK + h) * D;
        x[at..at + D].iter().map(|&y| y as f64).collect()
    };
    let scores: Vec<f64> = set
        .iter()
        .map(|&p| scale as f64 * row(&kv.k, p).iter().zip(qv).map(|(k, &q)| k * q as f64).sum::<f64>())
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut out = vec![0f64; D];
    for (&p, wi) in set.iter().zip(&w) {
        for (o, v) in out.iter_mut().zip(row(&kv.v, p)) {
            *o += wi / total * v;
        }
    }
    out
}

#[test]
fn a_given_selection_is_attended_as_given() {
    let mut rng = Rng::new("a_given_selection_is_attended_as_given");
    let ids = [7i64, 9];
    let prompts = [150u32, 230];
    for profile in [SIKV_PROFILE_2_1, SIKV_PROFILE_16_1] {
        let (mut cache, kv) = build(&mut rng, profile, &ids, &prompts, 3);
        let kmax = cache.cfg.budget.max as usize;
        let rows = ids.len() * HK;
        let qf = rng.normals(ids.len() * HQ * D);
        let q = bytes(Dtype::F32, &qf);
        let null = null_mut();
        let (mut own, mut own_cnt) = (vec![-1i32; rows * kmax], vec![0i32; rows]);
        cache
            .select(0, &ids, Activations::Host(&q), &mut own, &mut own_cnt, null)
            .unwrap();
        let sets = cache.attended_positions(0, &ids, Activations::Host(&q), null).unwrap();

        // Candidates = every position minus the dense set (attended, not selected).
        let mut cands: Vec<Vec<u32>> = Vec::new();
        for (b, &id) in ids.iter().enumerate() {
            let len = cache.seq_len(id, 0).unwrap();
            for (h, set) in sets[b].iter().enumerate() {
                let r = b * HK + h;
                let sel: BTreeSet<u32> = own[r * kmax..r * kmax + own_cnt[r] as usize]
                    .iter()
                    .map(|&p| p as u32)
                    .collect();
                let dense: BTreeSet<u32> = set.iter().copied().filter(|p| !sel.contains(p)).collect();
                assert_eq!(dense.len() as u32, SINKS + HEAVY + WINDOW, "dense set of row {r}");
                let c: Vec<u32> = (0..len).filter(|p| !dense.contains(p)).collect();
                assert!(c.iter().all(|&p| p >= SINKS && p < len - WINDOW));
                cands.push(c);
            }
        }
        let row_of = |pick: &dyn Fn(usize, &[u32]) -> Vec<u32>| -> (Vec<i32>, Vec<i32>) {
            let (mut idx, mut cnt) = (vec![-1i32; rows * kmax], vec![0i32; rows]);
            for r in 0..rows {
                let sel = pick(r, &cands[r]);
                for (j, &p) in sel.iter().enumerate() {
                    idx[r * kmax + j] = p as i32;
                }
                cnt[r] = sel.len() as i32;
            }
            (idx, cnt)
        };

        // Every candidate: the dense decode, bit for bit (same order of tokens, same splits).
        let (idx, cnt) = row_of(&|_, c| c.to_vec());
        let all = attend_with(&mut cache, &ids, &q, &idx, &cnt);
        let mut dense = vec![0u8; q.len()];
        cache
            .attend_dense(0, &ids, Activations::Host(&q), Output::Host(&mut dense), null)
            .unwrap();
        assert!(
            all == dense,
            "profile {profile}: a full selection differs from attend_dense"
        );

        // The first candidates, as many as the library picks: not the library's choice.
        let (first, first_cnt) = row_of(&|r, c| c[..own_cnt[r] as usize].to_vec());
        assert_eq!(first_cnt, own_cnt);
        assert_ne!(first, own, "profile {profile}: the first candidates are the selection");
        let got = attend_with(&mut cache, &ids, &q, &first, &first_cnt);
        let mut sparse = vec![0u8; q.len()];
        cache
            .attend(0, &ids, Activations::Host(&q), Output::Host(&mut sparse), null)
            .unwrap();
        assert!(
            got != sparse,
            "profile {profile}: another selection gives attend's output"
        );

        // Rows belong to their sequence: the batch reversed gives the outputs reversed.
        let swap = |x: &[u8], per: usize| [&x[per..], &x[..per]].concat();
        let swap_i = |x: &[i32], per: usize| [&x[per..], &x[..per]].concat();
        let rev = attend_with(
            &mut cache,
            &[ids[1], ids[0]],
            &swap(&q, q.len() / 2),
            &swap_i(&first, HK * kmax),
            &swap_i(&first_cnt, HK),
        );
        assert!(rev == swap(&got, got.len() / 2), "profile {profile}: reversed batch");

        // With 16-bit keys and values the output is the exact attention over dense + given.
        if profile == SIKV_PROFILE_16_1 {
            let out = floats(&got);
            let amax = out.iter().fold(0f32, |m, x| m.max(x.abs()));
            let mut worst = 0f64;
            for b in 0..ids.len() {
                for qh in 0..HQ {
                    let r = b * HK + qh / (HQ / HK);
                    let given = &first[r * kmax..r * kmax + first_cnt[r] as usize];
                    let mut set: Vec<u32> = sets[b][qh / (HQ / HK)]
                        .iter()
                        .copied()
                        .filter(|p| !own[r * kmax..r * kmax + own_cnt[r] as usize].contains(&(*p as i32)))
                        .collect();
                    set.extend(given.iter().map(|&p| p as u32));
                    let want = reference(&kv[b], &qf, b, qh, &set, cache.cfg.softmax_scale);
                    for (o, w) in out[(b * HQ + qh) * D..(b * HQ + qh + 1) * D].iter().zip(&want) {
                        worst = worst.max((*o as f64 - w).abs() / amax as f64);
                    }
                }
            }
            assert!(
                worst < 5e-3,
                "16+1: output differs from the float64 recomputation by {worst:.2e}"
            );
        }
    }
}
