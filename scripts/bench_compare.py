#!/usr/bin/env python3
"""Side-by-side graph times (us) of gpu_bench CSVs from one GPU run: one column per CSV, one
row per (kernel, N, batch). Usage: bench_compare.py NAME=PATH [NAME=PATH ...] [--kernels a,b]"""
import argparse
import csv

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("runs", nargs="+", metavar="NAME=PATH")
ap.add_argument("--kernels", type=lambda v: v.split(","), default=None)
opts = ap.parse_args()
kernels = opts.kernels
cols = []
for a in opts.runs:
    name, path = a.split("=", 1)
    t = {}
    for r in csv.DictReader(open(path)):
        g = r.get("graph_us") or ""
        t[(r["kernel"], int(r["N"]), int(r["batch"]))] = float(g) if g else float(r["median_us"])
    cols.append((name, t))
keys = sorted({k for _, t in cols for k in t}, key=lambda k: (k[1], k[2], k[0]))
print(f"{'kernel':<11} {'N':>7} {'B':>2} " + " ".join(f"{n:>9}" for n, _ in cols))
for k in keys:
    if kernels and k[0] not in kernels:
        continue
    vals = [t.get(k) for _, t in cols]
    print(f"{k[0]:<11} {k[1]:>7} {k[2]:>2} " + " ".join(f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in vals))
