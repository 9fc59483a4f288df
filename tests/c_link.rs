//! C and C++ clients of the generated header, linked with `libselfindexkv.a` and nothing but
//! `-lpthread -ldl -lm`.
//!
//! `tests/c/abi_c99.c` (float32, raw C ABI) and `tests/c/abi_cpp17.cpp` (fp16, the
//! `selfindexkv.hpp` wrapper) run one scenario on the CPU device and write every input and
//! output to a file. This test replays the same calls through the Rust API (`cache::Cache`, the
//! same PRNG) and requires bit-identical records; in `full` mode (16-bit planes, a budget that
//! covers every token) it also checks each attention output against a float64 dense softmax.
//! The C++ samples in `cpp_examples/` are compiled with the plain compiler and run, so they
//! cannot rot.
//!
//! Seeds are fresh each run and printed; `SIKV_TEST_SEED=0x…` replays one (the programs take
//! the seed as an argument and use the tests' generator). `CC` / `CXX` pick the
//! compilers (default `cc` / `c++`).

mod common;

use common::{static_lib, Rng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use selfindexkv::cache::{Activations, Cache, Output};
use selfindexkv::config::*;
use selfindexkv::{numeric, CacheConfig};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const LINK_LIBS: [&str; 3] = ["-lpthread", "-ldl", "-lm"];

// ---------------------------------------------------------------------------------------------
// Building and running the programs
// ---------------------------------------------------------------------------------------------

fn scratch_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_link");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Clone, Copy)]
enum Lang {
    C99,
    Cpp17,
}

/// Compiles and links `sources` into `name` with the plain compiler command line.
fn compile(lang: Lang, sources: &[PathBuf], extra_includes: &[PathBuf], name: &str, opt: &str) -> PathBuf {
    let (compiler, std_flags): (String, &[&str]) = match lang {
        Lang::C99 => (
            std::env::var("CC").unwrap_or_else(|_| "cc".into()),
            &["-std=c99", "-pedantic"],
        ),
        Lang::Cpp17 => (std::env::var("CXX").unwrap_or_else(|_| "c++".into()), &["-std=c++17"]),
    };
    let exe = scratch_dir().join(name);
    let mut cmd = Command::new(&compiler);
    cmd.args(std_flags)
        .args(["-Wall", "-Wextra", "-Werror", opt])
        .arg(format!("-I{ROOT}/include"));
    for inc in extra_includes {
        cmd.arg(format!("-I{}", inc.display()));
    }
    cmd.args(sources).arg(static_lib()).args(LINK_LIBS).arg("-o").arg(&exe);
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run `{compiler}`: {e}"));
    assert!(
        out.status.success(),
        "compiling {name} failed: {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a program; its stdout (a summary line) is echoed into the test output.
fn run(exe: &Path, args: &[&str]) -> String {
    let out = Command::new(exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{stdout}{}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{stdout}");
    stdout
}

// ---------------------------------------------------------------------------------------------
// The scenario, replayed through the Rust API (keep in step with tests/c/abi_c99.c)
// ---------------------------------------------------------------------------------------------

const N_LAYERS: u32 = 2;
const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 64;
const N_QUERY: u32 = 4;
const N_STEPS: usize = 64;
const IDS: [i64; 3] = [11, 22, 33];
const PROMPT: [u32; 3] = [37, 100, 250];
const TAIL: [u32; 3] = [4, 7, 9];
const FORK_SRC: i64 = 22;
const FORK_DST: i64 = 44;
const REMOVED: i64 = 11;

const REC_HEADER: u32 = 1;
const REC_CONFIG: u32 = 2;
const REC_INPUT: u32 = 3;
const REC_ATTEND: u32 = 4;
const REC_DENSE: u32 = 5;
const REC_INDICES: u32 = 6;
const REC_COUNTS: u32 = 7;
const REC_SEQ_LEN: u32 = 8;
const REC_INFO: u32 = 9;
const REC_CHECKSUM: u32 = 10;

fn tag_name(t: u32) -> &'static str {
    [
        "?",
        "header",
        "config",
        "input",
        "attend",
        "attend_dense",
        "indices",
        "counts",
        "seq_len",
        "info",
        "checksum",
    ]
    .get(t as usize)
    .copied()
    .unwrap_or("?")
}

fn config(dtype: u32, full: bool) -> SikvConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CPU;
    c.dtype = dtype;
    c.num_layers = N_LAYERS;
    c.num_q_heads = HQ as u32;
    c.num_kv_heads = HKV as u32;
    c.head_dim = D as u32;
    c.page_size = 16;
    c.num_pages = 0;
    c.max_seqs = 4;
    c.max_seq_len = 512;
    c.dense_crossover = 0; // as the C programs: the sparse path always
    c.max_batch = 4;
    c.max_append_tokens = 64;
    c.n_sink = 4;
    c.n_heavy = 16;
    c.n_window = 16;
    if full {
        c.key_bits = 16;
        c.value_bits = 16;
        c.budget_ratio = 1.0;
        c.budget_min = 512;
        c.budget_max = 512;
        c.rerank_factor = 0;
    } else {
        c.budget_ratio = 0.125;
        c.budget_min = 16;
        c.budget_max = 48;
        c.rerank_factor = 2;
    }
    c
}

/// The C and C++ programs' inputs: the tests' generator (their copy of it), values odd
/// multiples of 1/512 in (-2, 2): exact in fp16 and never 0.
fn value(rng: &mut Rng) -> f32 {
    let odd = ((rng.next_u64() >> 40) % 1024) as i32 * 2 - 1023;
    odd as f32 / 512.0
}

fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| value(rng)).collect()
}

type Record = (u32, Vec<u8>);

/// What the replay produced: the records, and for `full` mode the float64 dense reference of
/// every attention output record (record index, expected values).
struct Replay {
    records: Vec<Record>,
    reference: Vec<(usize, Vec<f64>)>,
}

/// Exact keys and values of every (layer, sequence), token-major `[t][H_kv][d]`.
#[derive(Default, Clone)]
struct History {
    k: Vec<f32>,
    v: Vec<f32>,
}

struct Replayer {
    dtype: Dtype,
    cache: Cache,
    rng: Rng,
    out: Replay,
    history: HashMap<(u32, i64), History>,
}

fn host(b: &[u8]) -> Activations<'_> {
    Activations::Host(b)
}

impl Replayer {
    fn bytes(&self, vals: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; vals.len() * self.dtype.size()];
        numeric::from_f32(self.dtype, vals, &mut b);
        b
    }
    fn input(&mut self, n: usize) -> (Vec<f32>, Vec<u8>) {
        let v = values(&mut self.rng, n);
        let b = self.bytes(&v);
        (v, b)
    }
    fn record(&mut self, tag: u32, bytes: Vec<u8>) -> usize {
        self.out.records.push((tag, bytes));
        self.out.records.len() - 1
    }
    fn remember(&mut self, layer: u32, id: i64, k: &[f32], v: &[f32]) {
        let h = self.history.entry((layer, id)).or_default();
        h.k.extend_from_slice(k);
        h.v.extend_from_slice(v);
    }
    /// Float64 softmax attention over every remembered token of each sequence.
    fn reference(&mut self, rec: usize, layer: u32, ids: &[i64], q: &[f32]) {
        let scale = 1.0 / (D as f64).sqrt();
        let g = HQ / HKV;
        let mut want = Vec::with_capacity(ids.len() * HQ * D);
        for (b, id) in ids.iter().enumerate() {
            let h = &self.history[&(layer, *id)];
            let len = h.k.len() / (HKV * D);
            for qh in 0..HQ {
                let kh = qh / g;
                let qv = &q[(b * HQ + qh) * D..(b * HQ + qh + 1) * D];
                let logits: Vec<f64> = (0..len)
                    .map(|t| {
                        let kv = &h.k[(t * HKV + kh) * D..(t * HKV + kh + 1) * D];
                        scale * qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for c in 0..D {
                    want.push((0..len).map(|t| w[t] * h.v[(t * HKV + kh) * D + c] as f64).sum::<f64>() / z);
                }
            }
        }
        self.out.reference.push((rec, want));
    }
    fn attend(&mut self, layer: u32, ids: &[i64], q: &[u8], dense: bool) -> Vec<u8> {
        let mut out = vec![0u8; ids.len() * HQ * D * self.dtype.size()];
        let s = std::ptr::null_mut();
        if dense {
            self.cache
                .attend_dense(layer, ids, host(q), Output::Host(&mut out), s)
                .unwrap();
        } else {
            self.cache
                .attend(layer, ids, host(q), Output::Host(&mut out), s)
                .unwrap();
        }
        out
    }
}

fn as_bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain-old-data (integers, floats, repr(C) structs of 4-byte fields).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }.to_vec()
}

fn replay(seed: u64, dtype: u32, full: bool) -> Replay {
    let s = std::ptr::null_mut();
    let c = config(dtype, full);
    let cfg = CacheConfig::from_c(&c).unwrap();
    let mut r = Replayer {
        dtype: cfg.dtype,
        cache: Cache::new(cfg).unwrap(),
        rng: Rng(seed),
        out: Replay {
            records: Vec::new(),
            reference: Vec::new(),
        },
        history: HashMap::new(),
    };
    let (row_q, row_kv) = (HQ * D, HKV * D);
    r.record(
        REC_HEADER,
        as_bytes(&[
            seed as u32,
            (seed >> 32) as u32,
            full as u32,
            std::mem::size_of::<SikvConfig>() as u32,
        ]),
    );
    r.record(REC_CONFIG, as_bytes(&[c]));

    for id in IDS {
        r.cache.add_seq(id).unwrap();
    }
    for layer in 0..N_LAYERS {
        for (i, &id) in IDS.iter().enumerate() {
            let n = PROMPT[i] - TAIL[i];
            let (kf, k) = r.input(n as usize * row_kv);
            let (vf, v) = r.input(n as usize * row_kv);
            let (_, q) = r.input(N_QUERY as usize * row_q);
            r.cache
                .calibrate(layer, id, n, host(&k), host(&v), N_QUERY, host(&q), s)
                .unwrap();
            r.remember(layer, id, &kf, &vf);
            r.record(REC_INPUT, k);
            r.record(REC_INPUT, v);
            r.record(REC_INPUT, q);
        }
    }
    let total_tail: u32 = TAIL.iter().sum();
    for layer in 0..N_LAYERS {
        let (kf, k) = r.input(total_tail as usize * row_kv);
        let (vf, v) = r.input(total_tail as usize * row_kv);
        r.cache.append(layer, &IDS, &TAIL, host(&k), host(&v), s).unwrap();
        let mut at = 0;
        for (i, &id) in IDS.iter().enumerate() {
            let n = TAIL[i] as usize * row_kv;
            r.remember(layer, id, &kf[at..at + n], &vf[at..at + n]);
            at += n;
        }
        r.record(REC_INPUT, k);
        r.record(REC_INPUT, v);
    }
    for step in 0..N_STEPS {
        for layer in 0..N_LAYERS {
            let (kf, k) = r.input(IDS.len() * row_kv);
            let (vf, v) = r.input(IDS.len() * row_kv);
            r.cache.append(layer, &IDS, &[1, 1, 1], host(&k), host(&v), s).unwrap();
            for (i, &id) in IDS.iter().enumerate() {
                r.remember(
                    layer,
                    id,
                    &kf[i * row_kv..(i + 1) * row_kv],
                    &vf[i * row_kv..(i + 1) * row_kv],
                );
            }
            let (qf, q) = r.input(IDS.len() * row_q);
            let out = r.attend(layer, &IDS, &q, false);
            r.record(REC_INPUT, k);
            r.record(REC_INPUT, v);
            r.record(REC_INPUT, q.clone());
            let at = r.record(REC_ATTEND, out);
            if full {
                r.reference(at, layer, &IDS, &qf);
            }
            if step == N_STEPS - 1 {
                let dense = r.attend(layer, &IDS, &q, true);
                let at = r.record(REC_DENSE, dense);
                if full {
                    r.reference(at, layer, &IDS, &qf);
                }
            }
        }
    }
    {
        let rows = IDS.len() * HKV;
        let kmax = c.budget_max as usize;
        let (_, q) = r.input(IDS.len() * row_q);
        let mut idx = vec![-1i32; rows * kmax];
        let mut cnt = vec![0i32; rows];
        r.cache
            .select(N_LAYERS - 1, &IDS, host(&q), &mut idx, &mut cnt, s)
            .unwrap();
        r.record(REC_INPUT, q);
        r.record(REC_INDICES, as_bytes(&idx));
        r.record(REC_COUNTS, as_bytes(&cnt));
    }
    r.cache.fork_seq(FORK_SRC, FORK_DST).unwrap();
    for layer in 0..N_LAYERS {
        let h = r.history[&(layer, FORK_SRC)].clone();
        r.history.insert((layer, FORK_DST), h);
    }
    let pair = [FORK_SRC, FORK_DST];
    for layer in 0..N_LAYERS {
        let lens = [
            r.cache.seq_len(FORK_SRC, layer).unwrap(),
            r.cache.seq_len(FORK_DST, layer).unwrap(),
        ];
        r.record(REC_SEQ_LEN, as_bytes(&lens));
        let mut qf = values(&mut r.rng, row_q);
        qf.extend_from_within(..);
        let q = r.bytes(&qf);
        let out = r.attend(layer, &pair, &q, false);
        r.record(REC_INPUT, q);
        let at = r.record(REC_ATTEND, out);
        if full {
            r.reference(at, layer, &pair, &qf);
        }
    }
    for layer in 0..N_LAYERS {
        let (kf, k) = r.input(row_kv);
        let (vf, v) = r.input(row_kv);
        r.cache.append(layer, &[FORK_DST], &[1], host(&k), host(&v), s).unwrap();
        r.remember(layer, FORK_DST, &kf, &vf);
        let (qf, q) = r.input(row_q);
        let out = r.attend(layer, &[FORK_DST], &q, false);
        r.record(REC_INPUT, k);
        r.record(REC_INPUT, v);
        r.record(REC_INPUT, q);
        let at = r.record(REC_ATTEND, out);
        if full {
            r.reference(at, layer, &[FORK_DST], &qf);
        }
    }
    r.cache.remove_seq(REMOVED).unwrap();
    let st = r.cache.stats();
    r.record(
        REC_INFO,
        as_bytes(&[SIKV_DEVICE_CPU, st.num_seqs, st.free_pages, st.num_pages]),
    );
    r.record(REC_INFO, as_bytes(&[r.cache.layout.bytes_per_token() as u64]));
    let sum = r.cache.checksum().unwrap();
    r.record(REC_CHECKSUM, as_bytes(&[sum]));
    r.out
}

fn read_records(path: &Path) -> Vec<Record> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut recs = Vec::new();
    let mut at = 0;
    while at < data.len() {
        assert!(
            at + 8 <= data.len(),
            "{}: truncated record header at byte {at}",
            path.display()
        );
        let tag = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
        let n = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
        assert!(
            at + 8 + n <= data.len(),
            "{}: truncated record at byte {at}",
            path.display()
        );
        recs.push((tag, data[at + 8..at + 8 + n].to_vec()));
        at += 8 + n;
    }
    recs
}

/// The element at byte offset `off` of a record, for messages.
fn element(tag: u32, dtype: Dtype, b: &[u8], off: usize) -> String {
    let float_rec = matches!(tag, REC_INPUT | REC_ATTEND | REC_DENSE);
    let size = if float_rec { dtype.size() } else { 4 };
    let i = off / size;
    let e = &b[i * size..(i + 1) * size];
    if float_rec {
        let mut v = [0f32];
        numeric::to_f32(dtype, e, &mut v);
        format!("[{i}] = {} ({e:02x?})", v[0])
    } else {
        format!("[{i}] = {e:02x?}")
    }
}

/// The program's records must equal the replay's, byte for byte.
fn assert_bit_identical(program: &str, got: &[Record], want: &[Record], dtype: Dtype) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.0,
            w.0,
            "{program}: record {i} is `{}`, the replay has `{}`",
            tag_name(g.0),
            tag_name(w.0)
        );
        if g.1 != w.1 {
            assert_eq!(
                g.1.len(),
                w.1.len(),
                "{program}: record {i} (`{}`) has a different size",
                tag_name(g.0)
            );
            let off = g.1.iter().zip(&w.1).position(|(a, b)| a != b).unwrap();
            let differing =
                g.1.chunks(dtype.size())
                    .zip(w.1.chunks(dtype.size()))
                    .filter(|(a, b)| a != b)
                    .count();
            panic!(
                "{program}: record {i} (`{}`, {} bytes) differs from the Rust replay: {program} {} vs Rust {} \
                 ({differing} elements differ)",
                tag_name(g.0),
                g.1.len(),
                element(g.0, dtype, &g.1, off),
                element(w.0, dtype, &w.1, off)
            );
        }
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{program}: {} records, the replay has {}",
        got.len(),
        want.len()
    );
}

/// Every attention output of a `full` run against the float64 dense softmax.
fn assert_dense_softmax(program: &str, got: &[Record], reference: &[(usize, Vec<f64>)], dtype: Dtype) -> f64 {
    // fp16 outputs round at 2^-11 relative; fp32 outputs carry the f32 accumulation only.
    let (atol, rtol) = match dtype {
        Dtype::F32 => (1e-4, 1e-4),
        _ => (2e-3, 2e-3),
    };
    let mut worst = 0f64;
    assert!(!reference.is_empty());
    for (rec, want) in reference {
        let b = &got[*rec].1;
        let mut vals = vec![0f32; want.len()];
        numeric::to_f32(dtype, b, &mut vals);
        for (j, (&g, &w)) in vals.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            worst = worst.max(err);
            assert!(
                err <= atol + rtol * w.abs(),
                "{program}: record {rec} (`{}`) element {j} (seq row {}, q head {}, channel {}) = {g}, \
                 float64 dense softmax = {w} (|err| = {err:.3e})",
                tag_name(got[*rec].0),
                j / (HQ * D),
                j / D % HQ,
                j % D
            );
        }
    }
    worst
}

/// Runs one program in both modes and checks it against the Rust replay (and, in `full`
/// mode, against the float64 dense softmax).
fn check_program(test: &str, program: &str, exe: &Path, dtype_code: u32) {
    // The program is seeded from the same variable as every Rust test.
    let seed = common::seed(test);
    let dtype = CacheConfig::from_c(&config(dtype_code, false)).unwrap().dtype;
    for mode in ["sparse", "full"] {
        let file = scratch_dir().join(format!("{program}-{mode}.bin"));
        let _ = std::fs::remove_file(&file);
        run(exe, &[&format!("{seed:#x}"), mode, file.to_str().unwrap()]);
        let got = read_records(&file);
        let want = replay(seed, dtype_code, mode == "full");
        assert_bit_identical(program, &got, &want.records, dtype);
        let attends = got.iter().filter(|r| r.0 == REC_ATTEND).count();
        if mode == "full" {
            let worst = assert_dense_softmax(program, &got, &want.reference, dtype);
            println!(
                "{program} {mode}: {} records bit-identical to the Rust replay; {} outputs within fp16 tolerance \
                 of a float64 dense softmax (max |err| {worst:.2e})",
                got.len(),
                want.reference.len()
            );
        } else {
            println!(
                "{program} {mode}: {} records ({attends} attend outputs) bit-identical to the Rust replay",
                got.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn c99_program_matches_rust_replay() {
    let exe = compile(
        Lang::C99,
        &[PathBuf::from(ROOT).join("tests/c/abi_c99.c")],
        &[],
        "abi_c99",
        "-O1",
    );
    check_program("c99_program_matches_rust_replay", "abi_c99", &exe, SIKV_DTYPE_F32);
}

#[test]
fn cpp17_program_matches_rust_replay() {
    let exe = compile(
        Lang::Cpp17,
        &[PathBuf::from(ROOT).join("tests/c/abi_cpp17.cpp")],
        &[],
        "abi_cpp17",
        "-O1",
    );
    check_program("cpp17_program_matches_rust_replay", "abi_cpp17", &exe, SIKV_DTYPE_F16);
}

#[test]
fn engine_sample_builds_and_runs() {
    let dir = PathBuf::from(ROOT).join("cpp_examples/engine_sample");
    let exe = compile(Lang::Cpp17, &[dir.join("main.cpp")], &[], "engine_sample", "-O2");
    let out = run(&exe, &["--steps", "8"]);
    assert!(out.contains("bytes/token"), "engine_sample printed no bytes/token line");
    assert!(
        out.contains("speculative verification") && out.contains("== one-token decode: yes"),
        "engine_sample did not verify drafts with attend_rows"
    );
}

#[test]
fn trt_plugin_sample_builds_and_runs() {
    let dir = PathBuf::from(ROOT).join("cpp_examples/trt_plugin_sample");
    let exe = compile(
        Lang::Cpp17,
        &[dir.join("harness.cpp"), dir.join("sikv_attention_plugin.cpp")],
        std::slice::from_ref(&dir),
        "trt_plugin_harness",
        "-O2",
    );
    // The harness drives the IPluginV3 through build, serialise, deserialise and runtime
    // phases as TensorRT would, and compares every output row with the managed cache.
    let out = run(&exe, &["--steps", "8"]);
    assert!(
        out.contains("plugin == managed cache") && out.contains("bit-identical"),
        "trt_plugin_harness did not compare against the managed cache"
    );
    // Generation requests of several tokens (speculative verification) went through
    // sikv_kernel_decode_rows and their rows were compared: the count must be there and not 0.
    let multi_rows = out
        .lines()
        .find_map(|l| l.strip_prefix("multi-row: "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|f| f.strip_suffix(" rows compared"))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        matches!(multi_rows, Some(n) if n > 0),
        "trt_plugin_harness compared no multi-row generation rows: {multi_rows:?}"
    );
    assert!(
        out.contains("3 bad request lists fail enqueue, reported to the recorder"),
        "trt_plugin_harness skipped the error checks"
    );
}
