//! Setup: the kernel parameter struct's layout on both sides, argument validation before any
//! launch, and the NVRTC path (the fallback end to end, and the compile of the embedded sources).

use selfindexkv::config::{SIKV_DTYPE_BF16, SIKV_DTYPE_F16, SIKV_DTYPE_F32};
use selfindexkv::cpu;
use selfindexkv::gpu::{params, DevBatch, DevPageTable, DevSelection, DevTokens, DevWorkspace, GpuContext};
use selfindexkv::layout::{Layout, SIKV_PLANE_SIGN};
use selfindexkv::status::SikvStatus;

use crate::common::Rng;
use crate::decode::run_decode;
use crate::fixture::*;

gpu_test!(params_layout, case_params_layout);
gpu_test!(validation, case_validation);
gpu_test!(nvrtc_fallback, case_nvrtc_fallback);
gpu_test!(switch_not_understood, case_switch_not_understood);

fn case_params_layout(_rng: &mut Rng) -> R {
    let cfg = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
    let dev = ctx.params_layout().map_err(e2s)?;
    let host = params::layout_probe();
    if dev != host {
        return Err(format!("SikvParams layout differs: device {dev:?} host {host:?}"));
    }
    println!("    build path: {}, device {:?}", ctx.build_path(), ctx.device_info());
    Ok(())
}

fn case_validation(_rng: &mut Rng) -> R {
    let cfg = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
    let layout = Layout::new(&cfg);
    let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
    let pools = DevPools::new(&ctx, &layout)?;
    let ws = ctx.alloc(GpuContext::workspace_bytes(&cfg, &layout, 4)).map_err(e2s)?;
    let buf = ctx.alloc(1 << 20).map_err(e2s)?;
    let table = DevPageTable {
        indptr: buf.ptr(),
        indices: buf.ptr(),
        last_page_len: buf.ptr(),
        batch: 2,
    };
    let b = buf.ptr();
    let expect = |what: &str, r: selfindexkv::Result<()>, st: SikvStatus| -> R {
        match r {
            Err(e) if e.status == st => Ok(()),
            other => Err(format!("{what}: expected {st:?}, got {other:?}")),
        }
    };
    let l = pools.layer();
    // Every address valid (one aligned buffer) unless a case says otherwise.
    let batch = DevBatch {
        table,
        seq_slot: b,
        q: b,
        rows: None,
    };
    let sel = DevSelection { indices: b, counts: b };
    let ws = ws.as_workspace();
    expect(
        "misaligned q",
        ctx.select(&cfg, &layout, &l, &DevBatch { q: b + 2, ..batch }, sel, ws, null()),
        SikvStatus::SIKV_ERR_MISALIGNED,
    )?;
    expect(
        "null q",
        ctx.select(&cfg, &layout, &l, &DevBatch { q: 0, ..batch }, sel, ws, null()),
        SikvStatus::SIKV_ERR_NULL_POINTER,
    )?;
    expect(
        "small ws",
        ctx.select(&cfg, &layout, &l, &batch, sel, DevWorkspace { bytes: 16, ..ws }, null()),
        SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
    )?;
    let big = DevBatch {
        table: DevPageTable {
            batch: cfg.max_batch + 1,
            ..table
        },
        ..batch
    };
    expect(
        "batch",
        ctx.attend(&cfg, &layout, &l, &big, sel, b, ws, null()),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
    )?;
    let tokens = DevTokens {
        n: 1,
        k: b,
        v: b,
        slot_mapping: b,
        seq_slot: b,
        position: b,
    };
    expect(
        "append n",
        ctx.append(
            &cfg,
            &layout,
            &l,
            &DevTokens {
                n: cfg.max_append_tokens + 1,
                ..tokens
            },
            null(),
        ),
        SikvStatus::SIKV_ERR_OUT_OF_BOUNDS,
    )?;
    let mut l2 = l;
    l2.planes[SIKV_PLANE_SIGN] = 0;
    expect(
        "null plane",
        ctx.append(&cfg, &layout, &l2, &tokens, null()),
        SikvStatus::SIKV_ERR_NULL_POINTER,
    )?;
    // reset_sequence matches cpu::reset_sequence.
    let mut host = HostPools::new(&layout);
    for (i, x) in host.state.iter_mut().enumerate() {
        *x = (i * 131 % 251) as u8;
    }
    pools.upload(&ctx, &host)?;
    cpu::reset_sequence(&layout, &mut host.state, 1).map_err(e2s)?;
    ctx.reset_sequence(&cfg, &layout, &l, 1, null()).map_err(e2s)?;
    let got = pools.download(&ctx, &layout)?;
    cmp_bytes("reset_sequence state", &got.state, &host.state)?;
    let f32cfg = make_cfg(base_shape(SIKV_DTYPE_F32, 128, 2, 4), |_| {});
    match GpuContext::new(&f32cfg, &Layout::new(&f32cfg)) {
        Err(e) if e.status == SikvStatus::SIKV_ERR_UNSUPPORTED => {}
        Err(e) => return Err(format!("f32 context: expected UNSUPPORTED, got {e}")),
        Ok(_) => return Err("f32 context: expected UNSUPPORTED, got a context".into()),
    }
    ctx.synchronize(null()).map_err(e2s)
}

/// A testing switch set to a value the library does not read fails the create with
/// INVALID_ARGUMENT naming it (src/gpu/switches.rs), and releases what it took: the next create,
/// with the switch unset, gets a working context.
fn case_switch_not_understood(_rng: &mut Rng) -> R {
    let cfg = make_cfg(base_shape(SIKV_DTYPE_F16, 128, 2, 4), |_| {});
    let layout = Layout::new(&cfg);
    {
        let _unset = EnvSet::new("SIKV_FUSED", "sometimes");
        match GpuContext::new(&cfg, &layout) {
            Err(e) if e.status == SikvStatus::SIKV_ERR_INVALID_ARGUMENT && e.message.contains("SIKV_FUSED") => {
                println!("    refused: {}", e.message)
            }
            Err(e) => {
                return Err(format!(
                    "SIKV_FUSED=sometimes: expected INVALID_ARGUMENT naming it, got {e}"
                ))
            }
            Ok(_) => return Err("SIKV_FUSED=sometimes: expected INVALID_ARGUMENT, got a context".into()),
        }
    }
    // A kernel launch on the next context: the layout probe.
    let ctx = GpuContext::new(&cfg, &layout).map_err(e2s)?;
    if ctx.params_layout().map_err(e2s)? != params::layout_probe() {
        return Err("SikvParams layout differs after the refused create".into());
    }
    Ok(())
}

/// A process-wide variable that every context creation reads, set for one case and unset again
/// however the case ends (a panic included): the tests after it in this process must not see it.
struct EnvSet(&'static str);
impl EnvSet {
    fn new(name: &'static str, value: &str) -> EnvSet {
        std::env::set_var(name, value);
        EnvSet(name)
    }
}
impl Drop for EnvSet {
    fn drop(&mut self) {
        std::env::remove_var(self.0);
    }
}

/// The NVRTC fallback end to end: a context whose kernels NVRTC compiled at create time
/// (SIKV_FORCE_NVRTC=1), checked like the fatbin ones on a small ragged batch.
fn case_nvrtc_fallback(rng: &mut Rng) -> R {
    let _unset = EnvSet::new("SIKV_FORCE_NVRTC", "1");
    let mut s = base_shape(SIKV_DTYPE_BF16, 64, 2, 3);
    s.max_batch = 2;
    s.kbits = 4;
    s.page = 16;
    let cfg = make_cfg(s, |c| c.rerank_factor = 2);
    let layout = Layout::new(&cfg);
    match GpuContext::new(&cfg, &layout) {
        Ok(ctx) if ctx.build_path() == "nvrtc" => run_decode(rng, s, &[300, 77], |c| c.rerank_factor = 2),
        Ok(ctx) => Err(format!("expected an NVRTC context, got {}", ctx.build_path())),
        Err(e) if e.message.contains("libnvrtc was not found") => {
            // A counted skip, not a pass: the fallback was not exercised.
            skip_no_nvrtc("setup::nvrtc_fallback");
            Ok(())
        }
        Err(e) => Err(e2s(e)),
    }
}

/// The NVRTC fallback compiles the embedded sources (no device needed; a counted skip line
/// without libnvrtc).
#[test]
fn nvrtc_compiles_embedded_sources() {
    let _one_at_a_time = serial();
    for (major, minor, only) in [(8, 0, Some((64u32, "bf16"))), (9, 0, Some((128, "f16")))] {
        match selfindexkv::gpu::nvrtc_check(major, minor, only) {
            Ok((bytes, desc)) => println!("nvrtc sm_{major}{minor} {only:?}: {bytes} bytes ({desc})"),
            Err(e) if e.message.contains("libnvrtc was not found") => {
                skip_no_nvrtc("setup::nvrtc_compiles_embedded_sources");
                return;
            }
            Err(e) => panic!("NVRTC compile for sm_{major}{minor} failed: {e}"),
        }
    }
}
