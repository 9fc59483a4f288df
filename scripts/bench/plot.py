#!/usr/bin/env python3
"""Speedup of the library's decode step over dense baselines vs context length, one line per
(baseline, batch), from a CSV of kernel-level step timings (one row per context and batch).

The column names are options, so the same script reads any table that has a context column,
a batch column, the step's time and one or more baseline times, e.g. the default
    N,batch,step_us,cudnn_us
speedup = baseline time / step time (> 1: the library is faster). Rows with a missing or
non-positive time are skipped.

Usage: plot.py --csv PATH [--out speedup.png] [--x N] [--batch-col batch] [--step step_us]
               [--baselines cudnn_us[,flash_us]] [--batches 1,8] [--title TEXT]
"""
import argparse
import csv
import math
import sys


def load(path, x, bcol, step, baselines, batches):
    """{(baseline, batch): [(x, speedup), ...]} sorted by x."""
    series = {}
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        missing = [c for c in [x, bcol, step] + baselines if c not in (r.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(r.fieldnames or [])})")
        for row in r:
            try:
                b = int(float(row[bcol]))
                n = float(row[x])
                s = float(row[step])
            except (TypeError, ValueError):
                continue
            if b not in batches or not (s > 0):
                continue
            for base in baselines:
                try:
                    t = float(row[base])
                except (TypeError, ValueError):
                    continue
                if t > 0 and math.isfinite(t):
                    series.setdefault((base, b), []).append((n, t / s))
    for k in series:
        series[k].sort()
    return series


def main(argv=None):
    ap = argparse.ArgumentParser(description="speedup vs context length PNG")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", default="speedup.png")
    ap.add_argument("--x", default="N", help="context-length column")
    ap.add_argument("--batch-col", default="batch")
    ap.add_argument("--step", default="step_us", help="the library's step time column")
    ap.add_argument("--baselines", default="cudnn_us", help="comma list of baseline time columns")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--title", default="libselfindexkv decode step: speedup over dense SDPA")
    a = ap.parse_args(argv)
    baselines = [c for c in a.baselines.split(",") if c]
    batches = [int(b) for b in a.batches.split(",")]
    series = load(a.csv, a.x, a.batch_col, a.step, baselines, batches)
    if not series:
        print(f"plot: no usable rows in {a.csv} for batches {batches}")
        return 1
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib unavailable (pip install matplotlib; the CSV is enough to plot elsewhere)")
        return 0
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = "osd^v<>"
    for i, ((base, b), pts) in enumerate(sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0]))):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=f"B={b} vs {base}")
        for xv, yv in pts:
            ax.annotate(f"{yv:.2f}x", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    xt = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(xt)
    ax.set_xticklabels([f"{int(v) // 1024}K" if v >= 1024 and int(v) % 1024 == 0 else f"{v:g}" for v in xt])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"context length ({a.x})")
    ax.set_ylabel(f"speedup = baseline / {a.step}")
    ax.set_title(a.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"wrote {a.out} ({len(series)} series)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
