#!/usr/bin/env python3
"""Times several gpu_bench builds against each other in alternating rounds: each round runs
every build once with the same arguments (the order turned by one build each round, so no
build always runs first on a cold device), and the rows are collected into one CSV with the
build's name and the round. The table prints each row's graph / cold µs per build and round,
then the median graph time of each build over the first's (below 1: faster).

usage: ab_rounds.py --build main=.gpu/gpu_bench --build new=.gpu_var/x/gpu_bench
                    [--rounds 2] [--csv OUT.csv] [--timeout 120] -- GPU_BENCH_ARGS...
       ab_rounds.py --from-csv OUT.csv (the table again, from a CSV already taken)
Exit status: 0 when every run succeeded; 1 when a build failed or timed nothing.
"""
import argparse
import csv
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gpu_bench_rows, write_csv  # noqa: E402


def run_round(builds, args, rnd, timeout):
    """One run of every build, the order turned by `rnd`; [(build, round, row)], failures."""
    order = builds[rnd % len(builds):] + builds[:rnd % len(builds)]
    rows, failed = [], []
    for name, path in order:
        got, why = gpu_bench_rows(path, args, timeout)
        if why or not got:
            print(f"ab_rounds: {name} ({path}): {why or 'no rows'}", file=sys.stderr)
            failed.append(name)
        rows += [(name, rnd + 1, row) for row in got]
    return rows, failed


def write_rounds_csv(path, rows):
    if rows:
        fields = ["build", "round"] + list(rows[0][2].keys())
        write_csv(path, [{"build": name, "round": rnd, **row} for name, rnd, row in rows], fields)


def read_csv(path):
    with open(path) as f:
        return [(r.pop("build"), int(r.pop("round")), r) for r in csv.DictReader(f)]


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def fmt(x):
    return f"{x:.1f}" if x == x else "-"


def table(rows):
    builds = list(dict.fromkeys(name for name, _, _ in rows))
    by = {}
    for name, rnd, r in rows:
        key = (r["kernel"], int(r["N"]), int(r["batch"]))
        by.setdefault(key, {}).setdefault(name, []).append((rnd, num(r.get("graph_us")), num(r.get("cold_us"))))
    print("kernel N B | " + " | ".join(f"{b}: graph / cold per round" for b in builds) + " | median graph over " + builds[0])
    for key in sorted(by):
        cells, med = [], {}
        for b in builds:
            t = sorted(by[key].get(b, []))
            cells.append(", ".join(f"{fmt(g)} / {fmt(c)}" for _, g, c in t) or "-")
            gs = [g for _, g, _ in t if g == g]
            med[b] = statistics.median(gs) if gs else float("nan")
        base = med[builds[0]]
        ratios = " ".join(f"{b} {med[b] / base:.3f}" for b in builds[1:]) if base == base and base > 0 else "-"
        print(f"{key[0]} {key[1]} {key[2]} | " + " | ".join(cells) + f" | {ratios}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="append", default=[], help="NAME=PATH of a gpu_bench binary")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--csv")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for one build's run")
    ap.add_argument("--from-csv")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.from_csv:
        table(read_csv(a.from_csv))
        return 0
    builds = []
    for spec in a.build:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--build {spec!r}: expected NAME=PATH")
        builds.append((name, path))
    if len(builds) < 2:
        ap.error("two or more --build NAME=PATH to compare")
    args = a.bench_args[1:] if a.bench_args[:1] == ["--"] else a.bench_args
    rows, failed = [], []
    for rnd in range(max(1, a.rounds)):
        got, bad = run_round(builds, args, rnd, a.timeout)
        rows += got
        failed += bad
        # After every round, so that a run cut short keeps the rounds it finished.
        if a.csv:
            write_rounds_csv(a.csv, rows)
    if rows:
        table(rows)
    if failed:
        print("ab_rounds: failed runs: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
