//! Benchmarks of the CPU reference hot loops: LUT scoring of the sign plane and token
//! encoding, over 64K tokens at head_dim 128 (2+1 bits).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use selfindexkv::config::{Centre, HalfKind, SignPredicate};
use selfindexkv::layout::{TokenFormat, SIKV_NUM_PLANES, SIKV_PLANE_SIGN};
use selfindexkv::reference::calibrate::{calibrate_head, CalibrateParams};
use selfindexkv::reference::encode::encode_token;
use selfindexkv::reference::score::{build_lut, lut_score};

const D: usize = 128;
const TOKENS: usize = 64 * 1024;

/// splitmix64, fixed seed: benchmarks must see the same data every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x5151_0001);
    let f = TokenFormat::new(D, 2, 2);
    let keys: Vec<f32> = (0..TOKENS * D).map(|_| rng.f()).collect();
    let values: Vec<f32> = (0..TOKENS * D).map(|_| rng.f()).collect();
    let qbar: Vec<f32> = (0..D).map(|_| rng.f()).collect();
    let p = CalibrateParams {
        centre: Centre::Mean,
        n_sink: 0,
        n_heavy: 0,
        n_window: 0,
    };
    let cal = calibrate_head(&p, D, &keys[..4096 * D], &qbar);

    let mut planes: Vec<Vec<u8>> = (0..SIKV_NUM_PLANES)
        .map(|q| vec![0u8; TOKENS * f.row_bytes[q]])
        .collect();
    let encode_all = |planes: &mut Vec<Vec<u8>>| {
        for t in 0..TOKENS {
            let mut it = planes.iter_mut().enumerate();
            let mut rows: [&mut [u8]; SIKV_NUM_PLANES] = std::array::from_fn(|_| {
                let (q, plane) = it.next().unwrap();
                let n = f.row_bytes[q];
                &mut plane[t * n..(t + 1) * n]
            });
            encode_token(
                &f,
                HalfKind::F16,
                SignPredicate::NotSignbit,
                &keys[t * D..(t + 1) * D],
                &values[t * D..(t + 1) * D],
                &cal.centre,
                &cal.inv_scale,
                &mut rows,
            );
        }
    };
    encode_all(&mut planes);

    let mut g = c.benchmark_group("reference");
    g.sample_size(10);
    g.throughput(Throughput::Elements(TOKENS as u64));
    g.bench_function("lut_score_64k_d128", |b| {
        let sign = &planes[SIKV_PLANE_SIGN];
        let row = f.row_bytes[SIKV_PLANE_SIGN];
        b.iter(|| {
            let lut = build_lut(&cal.codebook, black_box(&qbar));
            let mut acc = 0f32;
            for t in 0..TOKENS {
                acc += lut_score(&lut, &sign[t * row..(t + 1) * row]);
            }
            black_box(acc)
        })
    });
    g.bench_function("encode_64k_d128", |b| b.iter(|| encode_all(black_box(&mut planes))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
