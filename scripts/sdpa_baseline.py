#!/usr/bin/env python3
"""Dense decode baseline: torch.nn.functional.scaled_dot_product_attention on fp16 K/V with the
cuDNN and flash backends, at the shapes of examples/gpu_bench.rs (d = 128, 32 query / 8 KV heads,
one query token, batch 1..8, N = 8K / 32K / 128K). CUDA events, warm-up, median of the timed
runs. GQA uses enable_gqa=True (no K/V expansion); a backend that rejects it is retried with K/V
expanded to all query heads and marked `expanded` (its bytes are then 4x larger).

`graph_us` and `cold_us` are timed as examples/gpu_bench.rs times its own (GRAPH_REPS copies of
the call in one CUDA graph; for `cold_us` each copy after a write of FLUSH_BYTES, less the graph of
the writes alone), so the two scripts' columns compare like for like. Empty where the backend
cannot be captured.

Usage: sdpa_baseline.py [--csv PATH] [--quick] [--iters N]
CSV: backend,N,batch,d,G,hkv,median_us,p10_us,p90_us,bytes,GBps,note,graph_us,cold_us
"""
import argparse
import sys

GRAPH_REPS = 20
FLUSH_BYTES = 128 << 20


def timed_us(torch, fn, iters, per=1):
    """Sorted CUDA-event times (us) of `iters` calls of `fn`, each divided by `per`."""
    times = []
    for _ in range(iters):
        s0 = torch.cuda.Event(enable_timing=True)
        s1 = torch.cuda.Event(enable_timing=True)
        s0.record()
        fn()
        s1.record()
        s1.synchronize()
        times.append(s0.elapsed_time(s1) * 1000.0 / per)
    return sorted(times)


def cell(x):
    """A CSV cell: empty for a figure that was not taken."""
    return "" if x is None else f"{x:.2f}"


def graph_times(torch, run, flush, iters):
    """(graph_us, cold_us) of `run` as gpu_bench times its calls; None where capture fails."""
    def capture(body):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()  # warm-up outside the graph, on the capture stream
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                body()
        torch.cuda.current_stream().wait_stream(s)
        return g

    def reps(wipe, call):
        def body():
            for i in range(GRAPH_REPS):
                if wipe:
                    flush.fill_(i)
                if call:
                    run()
        return body

    def median_us(g):
        times = timed_us(torch, g.replay, iters, GRAPH_REPS)
        return times[len(times) // 2]

    try:
        warm, both, alone = capture(reps(False, True)), capture(reps(True, True)), capture(reps(True, False))
    except Exception as e:  # noqa: BLE001
        print(f"   graph capture failed: {str(e).splitlines()[0][:80]}")
        return None, None
    for g in (warm, both, alone):
        g.replay()
    torch.cuda.synchronize()
    return median_us(warm), median_us(both) - median_us(alone)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--n", default=None, help="context lengths, e.g. 8192,16384 (replaces the defaults)")
    ap.add_argument("--batch", default=None, help="batches, e.g. 1,8 (replaces the defaults)")
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        print(f"sdpa baseline skipped: torch unavailable ({e})")
        return 0
    if not torch.cuda.is_available():
        print("sdpa baseline skipped: no CUDA device")
        return 0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    ns = [8192] if a.quick else [8192, 32768, 131072]
    batches = [1, 2] if a.quick else [1, 2, 4, 8]
    if a.n:
        ns = [int(x) for x in a.n.split(",")]
    if a.batch:
        batches = [int(x) for x in a.batch.split(",")]
    hq, hkv, d = 32, 8, 128
    g = hq // hkv
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
    rows = ["backend,N,batch,d,G,hkv,median_us,p10_us,p90_us,bytes,GBps,note,graph_us,cold_us"]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=dev)
    print(f"{'backend':<8} {'N':>7} {'B':>3} {'median_us':>10} {'GB/s':>8} {'graph_us':>9} {'cold_us':>9} note")
    for n in ns:
        for b in batches:
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
            k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.float16)
            v = torch.randn(b, hkv, n, d, device=dev, dtype=torch.float16)
            for name, be in backends:
                note = "gqa"
                run = None
                try:
                    with sdpa_kernel(be):
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    torch.cuda.synchronize()

                    def run(q=q, k=k, v=v, be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                except Exception:  # noqa: BLE001
                    try:
                        ke = k.repeat_interleave(g, dim=1)
                        ve = v.repeat_interleave(g, dim=1)
                        with sdpa_kernel(be):
                            F.scaled_dot_product_attention(q, ke, ve)
                        torch.cuda.synchronize()
                        note = "expanded"

                        def run(q=q, ke=ke, ve=ve, be=be):
                            with sdpa_kernel(be):
                                return F.scaled_dot_product_attention(q, ke, ve)
                    except Exception as e:  # noqa: BLE001
                        print(f"{name:<8} {n:>7} {b:>3} unsupported: {str(e).splitlines()[0][:80]}")
                        rows.append(f"{name},{n},{b},{d},{g},{hkv},,,,,,unsupported,,")
                        continue
                for _ in range(10):
                    run()
                torch.cuda.synchronize()
                times = timed_us(torch, run, max(a.iters, 50))
                med = times[len(times) // 2]
                p10 = times[int(0.1 * (len(times) - 1))]
                p90 = times[int(0.9 * (len(times) - 1))]
                heads = b * (hq if note == "expanded" else hkv)
                nbytes = heads * n * d * 2 * 2
                gbps = nbytes / (med * 1e-6) / 1e9
                gus, cold = graph_times(torch, run, flush, 20)
                print(f"{name:<8} {n:>7} {b:>3} {med:>10.1f} {gbps:>8.1f} {cell(gus):>9} {cell(cold):>9} {note}")
                rows.append(f"{name},{n},{b},{d},{g},{hkv},{med:.2f},{p10:.2f},{p90:.2f},{nbytes},{gbps:.1f},{note},{cell(gus)},{cell(cold)}")
            del q, k, v
            torch.cuda.empty_cache()
    if a.csv:
        with open(a.csv, "w") as f:
            f.write("\n".join(rows) + "\n")
        print(f"wrote {a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
