#!/usr/bin/env python3
"""Write-path costs of the library at one layer (32 query / 8 KV heads, head_dim 128, bf16):

  append     sikv_kernel_append of one token per sequence, B = 1, 2, 4, ..., 64, timed as an
             eager call (CUDA events around the call: what a caller without graphs pays) and as
             a one-call CUDA graph replay (the device time alone). Baseline: the dense engine's
             equivalent, writing B new bf16 k/v rows into [B, 8, N, 128] caches
             (`kv_write`, also eager and graph).
  calibrate  sikv_kernel_calibrate of one sequence's 8K / 32K / 128K-token prompt (the state
             slot reset before each run, outside the timed region). Baseline: that layer's
             causal prefill attention through PyTorch SDPA (flash backend, B=1, 32/8 heads,
             enable_gqa; K/V repeated to 32 heads if the backend refuses GQA, noted).

Inputs are random (torch.randn, keys with per-channel offsets), never zeros. CUDA events,
warm-up, median (p10/p90 alongside). CSV + a table last.

Usage: append_calibrate.py [--lib PATH] [--csv PATH] [--quick] [--profiles 2+1,4+1]
       [--smoke]  (tiny shapes on the CPU with the library's CPU device)
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as CM  # noqa: E402
import sikv_ctypes as S  # noqa: E402

FIELDS = ["op", "profile", "N", "batch", "mode", "median_us", "p10_us", "p90_us", "baseline", "baseline_us",
          "ratio", "note"]


def time_graph_or_eager(torch, dev, fn, warmup, iters, graph):
    """(median, p10, p90) in microseconds of fn() eagerly, or of a CUDA graph holding one fn()."""
    if graph:
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream(dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    med, p10, p90 = CM.time_fn(torch, dev, fn, warmup, iters)
    return med * 1e3, p10 * 1e3, p90 * 1e3


def bench_append(torch, dev, lib, prof, dims, batches, n_ctx, warmup, iters, rows, log):
    hq, hkv, d = dims
    bmax = max(batches)
    c = CM.SikvLayers(torch, lib, dev, prof, 1, hq, hkv, d, n_ctx, bmax)
    g = torch.Generator(device=dev)
    g.manual_seed(11)
    off = 1.5 * torch.randn((d,), generator=g, device=dev)
    n_prompt = min(n_ctx - 1, 1024)
    # Every slot must be calibrated before it can be appended to.
    for b in range(bmax):
        k = (torch.randn((n_prompt, hkv, d), generator=g, device=dev) + off).to(torch.bfloat16)
        v = torch.randn((n_prompt, hkv, d), generator=g, device=dev, dtype=torch.bfloat16)
        q = torch.randn((1, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
        c.calibrate(0, b, k, v, q)
    CM.sync(torch, dev)
    modes = [("eager", False)] + ([("graph", True)] if CM.on_cuda(dev) else [])
    for B in batches:
        c.set_batch(B)
        k = (torch.randn((B, hkv, d), generator=g, device=dev) + off).to(torch.bfloat16)
        v = torch.randn((B, hkv, d), generator=g, device=dev, dtype=torch.bfloat16)
        st = lambda: c.stream()  # noqa: E731 - the capture stream inside a graph

        def app(k=k, v=v, B=B):
            c.kern.append(c.pools[0], B, k.data_ptr(), v.data_ptr(), c.b_sm.data_ptr(), c.b_slots.data_ptr(),
                          c.b_pos.data_ptr(), st())

        # The dense engine's write of the same tokens: one row per (sequence, KV head) at n_ctx-1.
        kc = torch.empty((B, hkv, n_ctx, d), dtype=torch.bfloat16, device=dev).normal_()
        vc = torch.empty_like(kc).normal_()

        def kvw(k=k, v=v, kc=kc, vc=vc):
            kc[:, :, n_ctx - 1].copy_(k)
            vc[:, :, n_ctx - 1].copy_(v)

        for mode, graph in modes:
            try:
                med, p10, p90 = time_graph_or_eager(torch, dev, app, warmup, iters, graph)
                bm, _, _ = time_graph_or_eager(torch, dev, kvw, warmup, iters, graph)
            except Exception as e:  # noqa: BLE001 - a capture failure is a finding, not the end of the run
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
                log(f"  append {prof} B={B} {mode}: failed: {msg}")
                rows.append(dict(op="append", profile=prof, N=n_ctx, batch=B, mode=mode, note=f"failed: {msg}"))
                CM.sync(torch, dev)
                if graph:
                    c.reopen()  # a failed capture may have poisoned the handle; the pools are intact
                continue
            rows.append(dict(op="append", profile=prof, N=n_ctx, batch=B, mode=mode, median_us=round(med, 2),
                             p10_us=round(p10, 2), p90_us=round(p90, 2), baseline="kv_write", baseline_us=round(bm, 2),
                             ratio=round(med / bm, 2)))
            log(f"  append {prof} B={B:>3} {mode:<5}: {med:8.2f} us (kv_write {bm:.2f} us)")
        del kc, vc
    c.close()


def prefill_us(torch, dev, backend, n, hq, hkv, d, warmup, iters, log):
    """Causal prefill attention of one layer at length n through SDPA; (median us, note)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    q = torch.randn((1, hq, n, d), device=dev, dtype=torch.bfloat16)
    k = torch.randn((1, hkv, n, d), device=dev, dtype=torch.bfloat16)
    v = torch.randn((1, hkv, n, d), device=dev, dtype=torch.bfloat16)
    note = "gqa"

    def run():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run()
    except Exception:  # noqa: BLE001
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        note = "expanded"

        def run():  # noqa: F811
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        try:
            run()
        except Exception as e:  # noqa: BLE001
            log(f"  prefill {backend} N={n}: unsupported ({str(e).splitlines()[0][:100]})")
            return None, "unsupported"
    med, _, _ = CM.time_fn(torch, dev, run, warmup, iters)
    return med * 1e3, note


def bench_calibrate(torch, dev, lib, prof, dims, lengths, warmup, iters, prefill, rows, log):
    hq, hkv, d = dims
    g = torch.Generator(device=dev)
    g.manual_seed(13)
    for n in lengths:
        c = CM.SikvLayers(torch, lib, dev, prof, 1, hq, hkv, d, n, 1)
        off = 1.5 * torch.randn((d,), generator=g, device=dev)
        k = (torch.randn((n, hkv, d), generator=g, device=dev) + off).to(torch.bfloat16)
        v = torch.randn((n, hkv, d), generator=g, device=dev, dtype=torch.bfloat16)
        q = torch.randn((1, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
        sm = c.slot_mapping(0, torch.arange(n, device=dev, dtype=torch.int64))
        args = (c.pools[0], 0, n, k.data_ptr(), v.data_ptr(), 1, q.data_ptr(), sm.data_ptr(), c.ws.data_ptr(), c.ws_bytes)
        ms, walls = [], []
        for i in range(warmup + iters):
            c.kern.reset_slot(c.pools[0], 0, c.stream())
            CM.sync(torch, dev)
            t0 = time.perf_counter()
            if CM.on_cuda(dev):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                c.kern.calibrate(*args, c.stream())
                e1.record()
                e1.synchronize()
                dt = e0.elapsed_time(e1)
            else:
                c.kern.calibrate(*args, 0)
                dt = (time.perf_counter() - t0) * 1e3
            wall = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                ms.append(dt)
                walls.append(wall)
        med, p10, p90 = CM.quantiles(ms)
        wmed = CM.quantiles(walls)[0]
        base, note = prefill_us(torch, dev, prefill, n, hq, hkv, d, warmup, max(iters, 5), log)
        rows.append(dict(op="calibrate", profile=prof, N=n, batch=1, mode="eager", median_us=round(med * 1e3, 1),
                         p10_us=round(p10 * 1e3, 1), p90_us=round(p90 * 1e3, 1), baseline=f"prefill_{prefill}",
                         baseline_us=round(base, 1) if base else None, ratio=round(med * 1e3 / base, 2) if base else None,
                         note=f"host wall {wmed:.2f} ms; prefill {note}"))
        log(f"  calibrate {prof} N={n:>6}: {med:8.3f} ms (host wall {wmed:.3f} ms); causal {prefill} prefill "
            f"{(base or float('nan')) / 1e3:.3f} ms ({note})")
        c.close()
        del k, v, q, sm


def main():
    ap = argparse.ArgumentParser(description="append / calibrate timings of one layer vs dense baselines")
    ap.add_argument("--lib", default=None)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (library CPU device)")
    ap.add_argument("--profiles", default="2+1")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--prefill", default="flash", help="SDPA backend of the prefill baseline")
    a = ap.parse_args()
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        print(f"append_calibrate skipped: torch unavailable ({e})")
        return 0
    if a.smoke:
        dev, dims = torch.device("cpu"), (8, 2, 64)
        batches = [int(x) for x in (a.batches or "1,2,4").split(",")]
        lengths = [int(x) for x in (a.lengths or "512,1024").split(",")]
        prefill, n_app = "math", 1024
        aw, ai, cw, ci = 1, 3, 1, 2
    else:
        if not torch.cuda.is_available():
            print("append_calibrate skipped: no CUDA device")
            return 0
        dev, dims = torch.device("cuda", torch.cuda.current_device()), (32, 8, 128)
        batches = [int(x) for x in (a.batches or "1,2,4,8,16,32,64").split(",")]
        lengths = [int(x) for x in (a.lengths or "8192,32768,131072").split(",")]
        prefill, n_app = a.prefill, 8192
        aw, ai = (5, 30) if a.quick else (10, 100)
        cw, ci = (1, 3) if a.quick else (2, 7)
    lib = S.Lib(a.lib)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name(dev) if CM.on_cuda(dev) else 'cpu'}, "
        f"library {lib.version()}")
    S.self_check(lib, quiet=True)
    rows = []
    t0 = time.perf_counter()
    for prof in a.profiles.split(","):
        try:
            bench_append(torch, dev, lib, prof, dims, batches, n_app, aw, ai, rows, log)
        except Exception as e:  # noqa: BLE001
            log(f"  append {prof} failed: {type(e).__name__}: {e}")
            rows.append(dict(op="append", profile=prof, note=f"failed: {str(e).splitlines()[0][:160]}"))
        try:
            bench_calibrate(torch, dev, lib, prof, dims, lengths, cw, ci, prefill, rows, log)
        except Exception as e:  # noqa: BLE001
            log(f"  calibrate {prof} failed: {type(e).__name__}: {e}")
            rows.append(dict(op="calibrate", profile=prof, note=f"failed: {str(e).splitlines()[0][:160]}"))
        if CM.on_cuda(dev):
            torch.cuda.empty_cache()
    CM.write_csv(a.csv, rows, FIELDS)
    log(f"total {time.perf_counter() - t0:.1f} s")
    print()
    cols = [("op", "op", ""), ("profile", "profile", ""), ("N", "N", ""), ("batch", "B", ""), ("mode", "mode", ""),
            ("median_us", "median us", ".2f"), ("p10_us", "p10", ".2f"), ("p90_us", "p90", ".2f"),
            ("baseline", "baseline", ""), ("baseline_us", "baseline us", ".2f"), ("ratio", "ratio", ".2f"),
            ("note", "note", "")]
    CM.print_table(rows, cols, "write path at one layer (32/8 heads, d=128, bf16): ratio = library / baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
