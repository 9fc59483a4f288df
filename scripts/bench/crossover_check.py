#!/usr/bin/env python3
"""Checks the default crossover's bounds (config.rs DENSE_AUTO_TOKENS) against the device: for
each band's batch, the dense decode and the sparse step at summed token counts around the
band's bound (75 % to 125 % of it), graph and cold timings from gpu_bench, and for each point
the faster path against the one the bound picks. What a refit on another GPU starts from.

The bands are read from src/config.rs, so the check follows the build it runs with.

usage: crossover_check.py --bench .gpu/gpu_bench --csv OUT.csv [--batches 1,2,4,8,16,32]
       crossover_check.py --from-csv A.csv[,B.csv] (report on gpu_bench CSVs already taken)
Exit status: 0, also when some point disagrees (the report says where); 1 when nothing could
be timed (no device, or the bench failed).
"""
import argparse
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gpu_bench_rows, write_csv  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
U32_MAX = 0xFFFF_FFFF


def bands(config_rs=os.path.join(ROOT, "src", "config.rs")):
    """[(most sequences, tokens)] of DENSE_AUTO_TOKENS, in order."""
    text = open(config_rs).read()
    m = re.search(r"pub const DENSE_AUTO_TOKENS: \[\(u32, u64\); \d+\]\s*=\s*\[(.*?)\];", text, re.S)
    if not m:
        raise SystemExit("crossover_check: DENSE_AUTO_TOKENS not found in src/config.rs")
    out = []
    for most, tokens in re.findall(r"\(\s*([\w:]+)\s*,\s*(\d+)\s*\)", m.group(1)):
        out.append((U32_MAX if most == "u32::MAX" else int(most), int(tokens)))
    return out


def bound(bs, batch):
    """The bound of the band that holds `batch` sequences (the last band's past them all)."""
    return next((t for most, t in bs if batch <= most), bs[-1][1])


FACTORS = (0.75, 0.875, 1.0, 1.125, 1.25)


def points(bs, batch, factors=FACTORS):
    """Per-sequence lengths (multiples of 1024) whose summed tokens span the bound."""
    b = bound(bs, batch)
    ns = set()
    for f in factors:
        n = int(b * f / batch) // 1024 * 1024
        if n >= 1024:
            ns.add(n)
    return sorted(ns)


def run_bench(bench, batches, bs, csv_path, factors=FACTORS):
    rows = []
    for b in batches:
        ns = ",".join(str(n) for n in points(bs, b, factors))
        got, why = gpu_bench_rows(bench, ["--only", "dense_ours,step", "--n", ns, "--batch", str(b)])
        if why:
            print(f"crossover_check: batch {b}: {why}", file=sys.stderr)
        rows += got
    if rows:
        write_csv(csv_path, rows, list(rows[0].keys()))
    return rows


def report(rows, bs):
    t = {}
    for r in rows:
        if r["kernel"] in ("dense_ours", "step") and r.get("graph_us"):
            cold = float(r["cold_us"]) if r.get("cold_us") else float("nan")
            t[(int(r["batch"]), int(r["N"]), r["kernel"])] = (float(r["graph_us"]), cold)
    bad = 0
    print("batch      N   tokens  bound   dense g/c       step g/c       faster  picked  loss(g)")
    for b, n in sorted({(k[0], k[1]) for k in t}):
        d, s = t.get((b, n, "dense_ours")), t.get((b, n, "step"))
        if d is None or s is None:
            continue
        tok, lim = b * n, bound(bs, b)
        faster = "dense" if d[0] <= s[0] else "sparse"
        picked = "dense" if tok <= lim else "sparse"
        loss = (d[0] if picked == "dense" else s[0]) - min(d[0], s[0])
        bad += picked != faster
        flag = "" if picked == faster else "  <-"
        print(f"{b:5d} {n:7d} {tok:8d} {lim:7d}  {d[0]:6.1f}/{d[1]:6.1f}  {s[0]:6.1f}/{s[1]:6.1f}"
              f"  {faster:6s}  {picked:6s}  {loss:5.1f}{flag}")
    print(f"crossover check: {bad} point(s) where the bound picks the slower path (graph)")
    break_even(t)
    return len(t) > 0


def break_even(t):
    """Per batch, the summed tokens where dense and sparse (graph) are even, interpolated
    linearly between the measured points on either side of the first change of sign; what a
    refit of DENSE_AUTO_TOKENS starts from (rounded down to a multiple of 4096 there)."""
    for b in sorted({k[0] for k in t}):
        ns = sorted(n for (bb, n, k) in t if bb == b and k == "dense_ours" and (b, n, "step") in t)
        diffs = [(b * n, t[(b, n, "dense_ours")][0] - t[(b, n, "step")][0]) for n in ns]
        if not diffs:
            continue
        even = None
        for (x0, d0), (x1, d1) in zip(diffs, diffs[1:]):
            if d0 <= 0 < d1:
                even = x0 + (x1 - x0) * (-d0) / (d1 - d0)
                break
        if even is not None:
            print(f"break-even batch {b}: {even:.0f} tokens")
        elif diffs[-1][1] <= 0:
            print(f"break-even batch {b}: above {diffs[-1][0]} tokens (dense faster at every point)")
        else:
            print(f"break-even batch {b}: below {diffs[0][0]} tokens (sparse faster at every point)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench")
    ap.add_argument("--csv", default="crossover_gpu_bench.csv")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--from-csv")
    ap.add_argument("--factors", default=",".join(str(f) for f in FACTORS),
                    help="the points, as fractions of each band's bound (a refit widens them)")
    a = ap.parse_args(argv)
    bs = bands()
    print("bands (most sequences: tokens):", ", ".join(f"{m}: {t}" for m, t in bs))
    if a.from_csv:
        rows = [r for p in a.from_csv.split(",") for r in csv.DictReader(open(p))]
    elif a.bench:
        factors = [float(f) for f in a.factors.split(",")]
        rows = run_bench(a.bench, [int(b) for b in a.batches.split(",")], bs, a.csv, factors)
    else:
        ap.error("--bench or --from-csv")
    return 0 if report(rows, bs) else 1


if __name__ == "__main__":
    sys.exit(main())
