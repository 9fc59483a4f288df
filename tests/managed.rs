//! Managed-cache behaviour beyond the stages: the dense-decode crossover.

mod common;

use common::Rng;
use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::CacheConfig;

fn cache(crossover: u32) -> Cache {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.dtype = SIKV_DTYPE_F32;
    c.num_layers = 1;
    c.num_q_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c.page_size = 16;
    c.max_seqs = 2;
    c.max_batch = 2;
    c.max_seq_len = 1024;
    c.max_append_tokens = 1024;
    c.n_sink = 2;
    c.n_heavy = 4;
    c.n_window = 8;
    c.budget_min = 8;
    c.budget_max = 16;
    c.dense_crossover = crossover;
    Cache::new(CacheConfig::from_c(&c).unwrap()).unwrap()
}

fn bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs one sequence of `n` prompt tokens and returns (attend, attend_dense) outputs.
fn run(crossover: u32, n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    // The same seed gives every run the same inputs, so the outputs can be compared.
    let mut rng = Rng(seed);
    let mut rnd = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.range(-1.0, 1.0) + 1e-3).collect() };
    let mut c = cache(crossover);
    c.add_seq(1).unwrap();
    let (k, v, q) = (bytes(&rnd(n * 2 * 64)), bytes(&rnd(n * 2 * 64)), bytes(&rnd(4 * 64)));
    let null = std::ptr::null_mut();
    c.calibrate(
        0,
        1,
        n as u32,
        Activations::Host(&k),
        Activations::Host(&v),
        1,
        Activations::Host(&q),
        null,
    )
    .unwrap();
    let (mut a, mut d) = (vec![0u8; 4 * 64 * 4], vec![0u8; 4 * 64 * 4]);
    c.attend(0, &[1], Activations::Host(&q), Output::Host(&mut a), null)
        .unwrap();
    c.attend_dense(0, &[1], Activations::Host(&q), Output::Host(&mut d), null)
        .unwrap();
    (a, d)
}

#[test]
fn below_the_crossover_attend_is_the_dense_decode() {
    let seed = common::seed("below_the_crossover_attend_is_the_dense_decode");
    // 500 tokens, k = 16: the sparse output differs from the dense one.
    let (sparse, dense) = run(0, 500, seed);
    assert_ne!(
        sparse, dense,
        "seed {seed:#x}: a 16-token selection of 500 should not equal dense attention"
    );
    // Crossover at or above the length: attend runs the dense decode, bit for bit.
    let (a, d) = run(500, 500, seed);
    assert_eq!(a, d, "seed {seed:#x}");
    assert_eq!(d, dense);
    // Crossover below the length: the sparse path, unchanged.
    let (a, _) = run(499, 500, seed);
    assert_eq!(a, sparse, "seed {seed:#x}");
}

/// The default crossover (SIKV_DENSE_CROSSOVER_AUTO) is the measured break-even, the same on
/// every device: a bound on the tokens summed over the call's sequences, by their number
/// (DENSE_AUTO_TOKENS's bands, each bound inclusive).
#[test]
fn the_default_crossover_is_the_measured_break_even() {
    let c = SikvConfig::for_profile(0).unwrap();
    assert_eq!(c.dense_crossover, SIKV_DENSE_CROSSOVER_AUTO);
    let auto = CacheConfig::from_c(&c).unwrap().dense_crossover;
    assert_eq!(auto, Crossover::Auto);
    for (seqs, limit) in [
        (1u32, 86016u64),
        (2, 118784),
        (3, 118784),
        (4, 147456),
        (8, 147456),
        (16, 147456),
        (31, 147456),
        (32, 348160),
        (63, 348160),
        (64, 524288),
        (u32::MAX, 524288),
    ] {
        assert_eq!(dense_auto_tokens(seqs), limit, "{seqs} sequences");
        assert!(auto.dense(seqs, limit), "{seqs} sequences, {limit} tokens: dense");
        assert!(
            !auto.dense(seqs, limit + 1),
            "{seqs} sequences, {} tokens: sparse",
            limit + 1
        );
    }
    assert!(!auto.dense(0, 0), "an empty call selects nothing densely");
    // An explicit count is a plain bound on the tokens, whatever the batch; 0 turns it off.
    assert!(Crossover::Tokens(300).dense(8, 300) && !Crossover::Tokens(300).dense(1, 301));
    assert!(!Crossover::Tokens(0).dense(1, 0));
    let seed = common::seed("the_default_crossover_is_the_measured_break_even");
    let (a, d) = run(SIKV_DENSE_CROSSOVER_AUTO, 500, seed);
    assert_eq!(a, d, "seed {seed:#x}: 500 tokens are below the default crossover");
}

/// The crossover counts the tokens of all the call's sequences together.
#[test]
fn the_crossover_sums_the_batch() {
    let seed = common::seed("the_crossover_sums_the_batch");
    let run2 = |crossover: u32| -> (Vec<u8>, Vec<u8>) {
        let mut rng = Rng(seed);
        let mut rnd = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.range(-1.0, 1.0) + 1e-3).collect() };
        let mut c = cache(crossover);
        let null = std::ptr::null_mut();
        let q = bytes(&rnd(2 * 4 * 64));
        for (id, n) in [(1i64, 300usize), (2, 200)] {
            c.add_seq(id).unwrap();
            let (k, v) = (bytes(&rnd(n * 2 * 64)), bytes(&rnd(n * 2 * 64)));
            let qt = &q[..4 * 64 * 4];
            c.calibrate(
                0,
                id,
                n as u32,
                Activations::Host(&k),
                Activations::Host(&v),
                1,
                Activations::Host(qt),
                null,
            )
            .unwrap();
        }
        let (mut a, mut d) = (vec![0u8; 2 * 4 * 64 * 4], vec![0u8; 2 * 4 * 64 * 4]);
        c.attend(0, &[1, 2], Activations::Host(&q), Output::Host(&mut a), null)
            .unwrap();
        c.attend_dense(0, &[1, 2], Activations::Host(&q), Output::Host(&mut d), null)
            .unwrap();
        (a, d)
    };
    // 300 + 200 tokens: each sequence is below 300, but together they pass 499.
    let (a, d) = run2(499);
    assert_ne!(a, d, "seed {seed:#x}: 500 tokens in all exceed a crossover of 499");
    let (a, d) = run2(500);
    assert_eq!(a, d, "seed {seed:#x}: 500 tokens in all are within a crossover of 500");
}
