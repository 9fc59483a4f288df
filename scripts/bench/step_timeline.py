#!/usr/bin/env python3
"""Where a decode step's time goes, kernel by kernel, on the device's own clock.

One layer (32 query / 8 KV heads, head_dim 128, bf16) of the library's cache is calibrated on
random prompts of N-1 tokens per sequence; then COPIES back-to-back `sikv_kernel_decode` calls are
captured in one CUDA graph on PyTorch's stream and replayed under the PyTorch profiler, whose
CUDA activity trace gives every kernel's start and end on the GPU. The kernels of one call are
the same sequence each time, so for the j-th kernel of a call the script reports the median over
the copies of:

  start   its first block's start, from the start of the call's first kernel
  end     its last block's end, from the same origin
  dur     end - start (with programmatic dependent launch a kernel starts while the one ahead
          still runs, so this includes its wait)
  adds    end - the previous kernel's end (the previous call's last end, for the first kernel):
          what the kernel adds to the critical path of back-to-back calls (kernels of parallel
          graph branches, listed one after the other, can show 0 or less)

`call` is the median period of one call (last end to last end); the copies follow
one another in the graph as the layers of a model would (minus the other layers' work between).
Eager calls are traced too (mode `eager`), where the host's launch time shows up as gaps.

Usage: step_timeline.py [--lib PATH] [--n 32768,131072] [--batch 1,8] [--copies 20]
                        [--csv PATH] [--profile 2+1]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as CM  # noqa: E402
import sikv_ctypes as S  # noqa: E402

FIELDS = ["mode", "N", "batch", "index", "kernel", "start_us", "end_us", "dur_us", "adds_us", "calls", "call_us"]


def kernel_events(torch, prof_fn):
    """(name, start_us, end_us) of every GPU kernel that prof_fn() ran, in start order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prof_fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    ev = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"]))
          for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and e.get("ph") == "X"]
    ev.sort(key=lambda x: x[1])
    return ev


def per_call(events, calls, origin_kernel):
    """Splits the kernels into calls that each begin with a kernel whose name contains
    origin_kernel; returns (rows of per-index medians, the median call period), or (None, an
    explanation) when the calls differ."""
    starts = [i for i, e in enumerate(events) if origin_kernel in e[0]]
    groups = [events[a:b] for a, b in zip(starts, starts[1:] + [len(events)])]
    if not groups:
        return None, "no call found"
    # Kernels on parallel branches of a graph (the routed decode's two paths) may start in a
    # different order from call to call: a call's kernels are put in the order of the calls'
    # most common set of names, kernels of one name in their start order.
    sig = statistics.mode(tuple(sorted(e[0] for e in g)) for g in groups)
    ref = next(g for g in groups if tuple(sorted(e[0] for e in g)) == sig)
    order = {}
    for i, e in enumerate(ref):
        order.setdefault(e[0], []).append(i)

    def in_ref_order(g):
        out, seen = [None] * len(g), {}
        for e in g:
            k = seen.get(e[0], 0)
            seen[e[0]] = k + 1
            out[order[e[0]][k]] = e
        return out

    groups = [in_ref_order(g) for g in groups if tuple(sorted(e[0] for e in g)) == sig]
    n = len(ref)
    if len(groups) < max(3, calls // 2):
        return None, f"calls differ ({len(groups)} of {len(starts)} alike)"
    # Each call's last end; the first kernel's `adds` is from the previous call's (the copies
    # run back to back; the first call of a trace has none), and so is the call's period.
    ends = [max(e[2] for e in g) for g in groups]
    first_adds = [g[0][2] - ends[i - 1] for i, g in enumerate(groups) if i and ends[i - 1] <= g[0][2]]
    gaps = [b - a for a, b in zip(ends, ends[1:]) if b > a]
    period = statistics.median(gaps) if gaps else ends[0] - groups[0][0][1]
    rows = []
    for j in range(n):
        st = [g[j][1] - g[0][1] for g in groups]
        en = [g[j][2] - g[0][1] for g in groups]
        du = [g[j][2] - g[j][1] for g in groups]
        ad = [g[j][2] - g[j - 1][2] for g in groups] if j else (first_adds or du)
        rows.append(dict(index=j, kernel=groups[0][j][0], start_us=statistics.median(st),
                         end_us=statistics.median(en), dur_us=statistics.median(du),
                         adds_us=statistics.median(ad), calls=len(groups)))
    return rows, period


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=None)
    ap.add_argument("--n", default="32768,131072")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--profile", default="2+1")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("step_timeline: no CUDA device; nothing traced (this script needs a GPU)")
        return 0
    dev = torch.device("cuda", 0)
    lib = S.Lib(a.lib)
    prof = S.PROFILES[a.profile]
    hq, hkv, d = 32, 8, 128
    rows = []
    for n_ctx in [int(x) for x in a.n.split(",")]:
        for batch in [int(x) for x in a.batch.split(",")]:
            cache = CM.SikvLayers(torch, lib, dev, prof, 1, hq, hkv, d, n_ctx, batch)
            g = torch.Generator(device=dev)
            g.manual_seed(7 + n_ctx + batch)
            off = 1.5 * torch.randn((d,), generator=g, device=dev)
            for b in range(batch):
                k = (torch.randn((n_ctx - 1, hkv, d), generator=g, device=dev) + off).to(torch.bfloat16)
                v = torch.randn((n_ctx - 1, hkv, d), generator=g, device=dev, dtype=torch.bfloat16)
                qt = torch.randn((1, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
                cache.calibrate(0, b, k, v, qt)
                del k, v, qt
            cache.set_batch(batch)
            q = torch.randn((batch, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
            out = torch.empty((batch, hq, d), dtype=torch.bfloat16, device=dev)

            def call():
                cache.kern.decode(cache.pools[0], cache.table, cache.b_slots.data_ptr(), q.data_ptr(),
                                  out.data_ptr(), cache.ws.data_ptr(), cache.ws_bytes, cache.stream())

            for _ in range(3):
                call()
            torch.cuda.synchronize()
            first = kernel_events(torch, call)
            if not first:
                print(f"N={n_ctx} B={batch}: the profiler recorded no kernel")
                cache.close()
                continue
            origin = first[0][0]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(a.copies):
                    call()
            torch.cuda.synchronize()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()

            def eager():
                for _ in range(a.copies):
                    call()

            for mode, fn in (("graph", lambda: [graph.replay() for _ in range(3)]), ("eager", eager)):
                ev = kernel_events(torch, fn)
                got, period = per_call(ev, a.copies, origin)
                if got is None:
                    print(f"{mode} N={n_ctx} B={batch}: {period}")
                    continue
                print(f"\n{mode} N={n_ctx} B={batch}: {len(got)} kernels, call {period:.1f} us "
                      f"(median of {got[0]['calls']} calls)")
                print(f"  {'#':>2} {'kernel':<40} {'start':>8} {'end':>8} {'dur':>8} {'adds':>8}")
                for r in got:
                    print(f"  {r['index']:>2} {r['kernel'][:40]:<40} {r['start_us']:8.1f} {r['end_us']:8.1f} "
                          f"{r['dur_us']:8.1f} {r['adds_us']:8.1f}")
                    rows.append(dict(mode=mode, N=n_ctx, batch=batch, call_us=round(period, 2), **r))
            del graph
            cache.close()
            torch.cuda.empty_cache()
    CM.write_csv(a.csv, rows, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
