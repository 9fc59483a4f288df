//! The managed path against the stateless one, as an engine sees them: `sikv_attend` back to back
//! against `sikv_kernel_decode` back to back over the SAME pools (a managed cache created over
//! device pools the benchmark owns; the stateless call gets a page table describing the pages the
//! managed cache handed out), d = 128, 32 query / 8 KV heads, fp16, 2+1, default budget. The two
//! outputs must be identical bit for bit (that also proves the page table describes the same
//! tokens). CUDA events around 200 back-to-back calls after 20 warm-up calls, median of 5.
//!
//! Usage: managed_bench [--quick] [--csv PATH]. Without a CUDA device it prints one line and
//! exits 0.

use std::ffi::c_void;
use std::io::Write;

use selfindexkv::config::{CacheConfig, SikvConfig, SIKV_DEVICE_CUDA, SIKV_DTYPE_F16, SIKV_PROFILE_2_1};
use selfindexkv::ffi::*;
use selfindexkv::gpu::{DeviceBuffer, GpuContext};
use selfindexkv::layout::{Layout, SIKV_NUM_PLANES};
use selfindexkv::SikvStatus;

type R<T = ()> = Result<T, String>;

const PAGE: u32 = 64;
const CALLS: usize = 200;

fn ok(s: SikvStatus, what: &str) -> R {
    if s == SikvStatus::SIKV_OK {
        Ok(())
    } else {
        Err(format!("{what}: {s:?}: {}", last_error_message()))
    }
}

fn config(n: u32, batch: u32) -> SikvConfig {
    let mut c = SikvConfig::for_profile(SIKV_PROFILE_2_1).unwrap();
    c.device = SIKV_DEVICE_CUDA;
    c.dtype = SIKV_DTYPE_F16;
    c.num_layers = 1;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.page_size = PAGE;
    c.max_seq_len = n;
    c.max_batch = batch;
    c.max_seqs = batch;
    c.max_append_tokens = n;
    c
}

/// Roughly normal fp16 values with a per-channel offset (never zeros).
fn random_f16(state: &mut u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let r = *state;
        let s: f32 = (0..4).map(|j| ((r >> (16 * j)) & 0xffff) as f32 / 65536.0).sum::<f32>() - 2.0;
        out.extend_from_slice(&half::f16::from_f32(s * 1.7 + 0.02 * (i % 128) as f32).to_le_bytes());
    }
    out
}

fn upload(ctx: &GpuContext, bytes: &[u8]) -> R<DeviceBuffer> {
    let b = ctx.alloc(bytes.len().max(16)).map_err(|e| e.to_string())?;
    ctx.copy_htod_async(b.ptr(), bytes, std::ptr::null_mut())
        .map_err(|e| e.to_string())?;
    Ok(b)
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Median over 5 rounds of the device time of one call, the calls made back to back.
fn per_call_us(ctx: &GpuContext, stream: *mut c_void, call: &dyn Fn() -> R) -> R<f64> {
    for _ in 0..20 {
        call()?;
    }
    ctx.synchronize(stream).map_err(|e| e.to_string())?;
    let mut v = Vec::new();
    for _ in 0..5 {
        let mut failed = None;
        let ms = ctx
            .time_ms(stream, || {
                for _ in 0..CALLS {
                    if let Err(e) = call() {
                        failed = Some(e);
                        break;
                    }
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        if let Some(e) = failed {
            return Err(e);
        }
        v.push(ms as f64 * 1000.0 / CALLS as f64);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(v[2])
}

struct Row {
    n: u32,
    batch: u32,
    managed_us: f64,
    stateless_us: f64,
    identical: bool,
}

fn bench(n: u32, batch: u32, seed: &mut u64) -> R<Row> {
    let c = config(n, batch);
    let cfg = CacheConfig::from_c(&c).map_err(|e| e.to_string())?;
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).map_err(|e| e.to_string())?;
    let stream = ctx.create_stream().map_err(|e| e.to_string())?;
    let s = stream.raw;
    let mut info = SikvLayoutInfo::default();
    ok(sikv_query_layout(&c, &mut info), "sikv_query_layout")?;
    let alloc = |bytes: usize| ctx.alloc(bytes).map_err(|e| e.to_string());
    let planes = alloc(info.total_plane_bytes)?;
    let state = alloc(info.total_state_bytes)?;
    let ws = alloc(info.workspace_bytes)?;
    let pools = SikvPoolsDesc {
        planes: planes.ptr() as *mut c_void,
        planes_bytes: info.total_plane_bytes,
        state: state.ptr() as *mut c_void,
        state_bytes: info.total_state_bytes,
        workspace: ws.ptr() as *mut c_void,
        workspace_bytes: info.workspace_bytes,
    };
    let mut cache: *mut SikvCache = std::ptr::null_mut();
    ok(
        sikv_cache_create_with_pools(&c, &pools, &mut cache),
        "sikv_cache_create_with_pools",
    )?;
    let (hq, hk, d) = (32usize, 8usize, 128usize);
    let ids: Vec<i64> = (0..batch as i64).collect();
    let result = (|| -> R<Row> {
        // Prefill: each sequence n tokens, calibrated in order, so the managed cache hands out
        // pages 0.. in order and slots 0.. in order (the allocator's documented order).
        for &id in &ids {
            let k = upload(&ctx, &random_f16(seed, n as usize * hk * d))?;
            let v = upload(&ctx, &random_f16(seed, n as usize * hk * d))?;
            let q = upload(&ctx, &random_f16(seed, hq * d))?;
            ok(sikv_seq_add(cache, id), "sikv_seq_add")?;
            let p = |b: &DeviceBuffer| b.ptr() as *const c_void;
            ok(
                sikv_calibrate(cache, 0, id, n, p(&k), p(&v), 1, p(&q), s),
                "sikv_calibrate",
            )?;
            ctx.synchronize(s).map_err(|e| e.to_string())?;
        }
        let q = upload(&ctx, &random_f16(seed, batch as usize * hq * d))?;
        let out_bytes = batch as usize * hq * d * 2;
        let out_m = alloc(out_bytes)?;
        let out_s = alloc(out_bytes)?;
        // The stateless description of the same memory.
        let np = n.div_ceil(PAGE) as i32;
        let indptr: Vec<i32> = (0..=batch as i32).map(|b| b * np).collect();
        let indices: Vec<i32> = (0..batch as i32 * np).collect();
        let last = vec![(n - (np as u32 - 1) * PAGE) as i32; batch as usize];
        let slots: Vec<i32> = (0..batch as i32).collect();
        let (d_indptr, d_indices, d_last, d_slots) = (
            upload(&ctx, &i32_bytes(&indptr))?,
            upload(&ctx, &i32_bytes(&indices))?,
            upload(&ctx, &i32_bytes(&last))?,
            upload(&ctx, &i32_bytes(&slots))?,
        );
        let mut plane = [std::ptr::null_mut(); SIKV_NUM_PLANES];
        for (p, x) in plane.iter_mut().enumerate() {
            if info.plane_bytes[p] > 0 {
                *x = (planes.ptr() + info.plane_offset[p] as u64) as *mut c_void;
            }
        }
        let lp = SikvLayerPools {
            plane,
            state: state.ptr() as *mut c_void,
        };
        let table = SikvPageTable {
            indptr: d_indptr.ptr() as *const i32,
            indices: d_indices.ptr() as *const i32,
            last_page_len: d_last.ptr() as *const i32,
            batch,
        };
        let mut kernels: *mut SikvKernels = std::ptr::null_mut();
        ok(sikv_kernels_create(&c, &mut kernels), "sikv_kernels_create")?;
        let mut ws_bytes = 0usize;
        ok(
            sikv_workspace_size(kernels, batch, &mut ws_bytes),
            "sikv_workspace_size",
        )?;
        let sws = alloc(ws_bytes)?;
        let qp = q.ptr() as *const c_void;
        let managed = || {
            ok(
                sikv_attend(cache, 0, batch, ids.as_ptr(), qp, out_m.ptr() as *mut c_void, s),
                "sikv_attend",
            )
        };
        let stateless = || {
            ok(
                sikv_kernel_decode(
                    kernels,
                    &lp,
                    &table,
                    d_slots.ptr() as *const i32,
                    qp,
                    out_s.ptr() as *mut c_void,
                    sws.ptr() as *mut c_void,
                    ws_bytes,
                    s,
                ),
                "sikv_kernel_decode",
            )
        };
        let r = (|| -> R<Row> {
            let managed_us = per_call_us(&ctx, s, &managed)?;
            let stateless_us = per_call_us(&ctx, s, &stateless)?;
            ctx.synchronize(s).map_err(|e| e.to_string())?;
            let (mut a, mut b) = (vec![0u8; out_bytes], vec![1u8; out_bytes]);
            ctx.copy_dtoh(&mut a, out_m.ptr()).map_err(|e| e.to_string())?;
            ctx.copy_dtoh(&mut b, out_s.ptr()).map_err(|e| e.to_string())?;
            Ok(Row {
                n,
                batch,
                managed_us,
                stateless_us,
                identical: a == b,
            })
        })();
        sikv_kernels_destroy(kernels);
        r
    })();
    sikv_cache_destroy(cache);
    result
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let csv = args
        .iter()
        .position(|a| a == "--csv")
        .and_then(|i| args.get(i + 1).cloned());
    let probe = config(8192, 1);
    if let Err(e) = GpuContext::new(
        &CacheConfig::from_c(&probe).unwrap(),
        &Layout::new(&CacheConfig::from_c(&probe).unwrap()),
    ) {
        println!("managed_bench: no usable CUDA device ({e}); nothing measured");
        return;
    }
    let sizes: &[(u32, u32)] = if quick {
        &[(8192, 1), (131072, 1)]
    } else {
        &[(8192, 1), (8192, 8), (32768, 1), (32768, 8), (131072, 1), (131072, 8)]
    };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ std::process::id() as u64;
    let mut rows = Vec::new();
    let mut failed = false;
    for &(n, b) in sizes {
        match bench(n, b, &mut seed) {
            Ok(r) => rows.push(r),
            Err(e) => {
                println!("managed_bench N={n} B={b}: {e}");
                failed = true;
            }
        }
    }
    if let Some(path) = csv {
        let mut f = std::fs::File::create(path).expect("csv");
        writeln!(f, "N,batch,managed_us,stateless_us,ratio,identical").unwrap();
        for r in &rows {
            writeln!(
                f,
                "{},{},{:.2},{:.2},{:.3},{}",
                r.n,
                r.batch,
                r.managed_us,
                r.stateless_us,
                r.managed_us / r.stateless_us,
                r.identical
            )
            .unwrap();
        }
    }
    println!("managed sikv_attend vs stateless sikv_kernel_decode, back to back, us per call");
    println!(
        "{:>7} {:>2} {:>9} {:>9} {:>6} {:>9}",
        "N", "B", "managed", "stateless", "ratio", "identical"
    );
    for r in &rows {
        println!(
            "{:>7} {:>2} {:>9.1} {:>9.1} {:>6.3} {:>9}",
            r.n,
            r.batch,
            r.managed_us,
            r.stateless_us,
            r.managed_us / r.stateless_us,
            r.identical
        );
        failed |= !r.identical;
    }
    if failed {
        std::process::exit(1);
    }
}
