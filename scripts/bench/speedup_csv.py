#!/usr/bin/env python3
"""Speedup table of the default crossover's path against SDPA, from one GPU-check run.

Reads gpu_check's gpu_bench.csv (our stages) and sdpa_baseline.csv (PyTorch SDPA), both timed the
same way (--time: `graph`, the default, a call's share of a replayed CUDA graph of back-to-back
calls; `cold`, the same after a 128 MiB write before each call; `median`, events around one eager
call, mostly host launch time at short contexts),
and writes N,batch,auto_path,auto_us,sparse_us,dense_us,cudnn_us,flash_us: auto_path is the path
the AUTO rule (dense when the call's summed tokens are at most its batch's band's bound) gives,
auto_us that path's measured time. Plot it with plot.py --step auto_us.

usage: speedup_csv.py --bench gpu_bench.csv --sdpa sdpa_baseline.csv --out speedup.csv
                      [--time graph|cold|median] [--auto-bands MOST:TOKENS,MOST:TOKENS,...]
(the bands: by default config.rs DENSE_AUTO_TOKENS of this checkout, read as crossover_check.py
reads them; give them for a run of another build, each the most sequences of a band and its
bound, e.g. 1:86016,3:118784,31:147456,63:348160,4294967295:524288)
"""
import argparse
import csv

from crossover_check import bands as config_bands, bound


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True)
    ap.add_argument("--sdpa", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--auto-bands")
    ap.add_argument("--time", choices=("graph", "cold", "median"), default="graph")
    a = ap.parse_args(argv)
    col = f"{a.time}_us"
    if a.auto_bands:
        bands = sorted(tuple(int(x) for x in band.split(":")) for band in a.auto_bands.split(","))
    else:
        bands = config_bands()

    ours = {}
    with open(a.bench) as f:
        for r in csv.DictReader(f):
            if r.get(col):
                ours[(r["kernel"], int(r["N"]), int(r["batch"]))] = float(r[col])
    sdpa = {}
    with open(a.sdpa) as f:
        for r in csv.DictReader(f):
            if r.get(col):
                sdpa[(r["backend"], int(r["N"]), int(r["batch"]))] = float(r[col])
    rows = []
    for n, b in sorted({(n, b) for (k, n, b) in ours if k == "step"}):
        sparse, dense = ours[("step", n, b)], ours.get(("dense_ours", n, b))
        if dense is None:
            continue
        path = "dense" if n * b <= bound(bands, b) else "sparse"
        auto = dense if path == "dense" else sparse
        cu, fl = sdpa.get(("cudnn", n, b)), sdpa.get(("flash", n, b))
        rows.append([n, b, path, f"{auto:.2f}", f"{sparse:.2f}", f"{dense:.2f}",
                     "" if cu is None else f"{cu:.2f}", "" if fl is None else f"{fl:.2f}"])
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N", "batch", "auto_path", "auto_us", "sparse_us", "dense_us", "cudnn_us", "flash_us"])
        w.writerows(rows)
    for r in rows:
        print(",".join(str(x) for x in r))


if __name__ == "__main__":
    main()
