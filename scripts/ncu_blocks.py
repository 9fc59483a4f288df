#!/usr/bin/env python3
"""Warp-stall samples of one kernel per basic block, from the source page of an Nsight Compute
report (`ncu -i REP --page source --csv --print-source sass`): consecutive instructions with the
same execution count form a block; the blocks with the most samples are printed with their size,
execution count (warps that ran them), share of samples, leading stall reasons and most frequent
opcodes, then the kernel's stall reasons overall. Where ncu_sass_top.py names single
instructions, this says which stretch of code (init, a tile loop, finish) holds the time.

Usage: ncu_blocks.py SOURCE.csv [TOP] (every kernel of the export in turn)"""
import collections
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def tables(lines):
    """(kernel name, rows) of each kernel in the export: a "Kernel Name" line starts each."""
    out, name, cur = [], "", []
    for line in lines:
        if line.startswith('"Kernel Name"'):
            if cur:
                out.append((name, cur))
            name, cur = line.split(",")[1].strip('"'), []
        else:
            cur.append(line)
    if cur:
        out.append((name, cur))
    return out


def summarise(name, lines, top):
    start = next((i for i, l in enumerate(lines) if l.startswith('"Address"')), None)
    if start is None:
        return
    rows = list(csv.reader(lines[start:]))
    ix = {n: k for k, n in enumerate(rows[0])}
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    blocks, cur = [], None
    for r in rows[1:]:
        if len(r) < len(rows[0]):
            continue
        ex = num(r[ix["Instructions Executed"]])
        if cur is None or ex != cur["ex"]:
            cur = {"ex": ex, "at": r[0], "n": 0, "samples": 0.0, "stalls": collections.Counter(), "ops": collections.Counter()}
            blocks.append(cur)
        words = r[1].split()
        op = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "?")
        cur["n"] += 1
        cur["samples"] += num(r[ix["Warp Stall Sampling (All Samples)"]])
        cur["ops"][op] += 1
        for c in reasons:
            cur["stalls"][c] += num(r[ix[c]])
    total = sum(b["samples"] for b in blocks) or 1.0
    print(f"# {name}: {total:.0f} samples, {sum(b['ex'] * b['n'] for b in blocks):.0f} warp instructions")
    for b in sorted(blocks, key=lambda b: -b["samples"])[:top]:
        s = b["samples"] or 1.0
        st = ", ".join(f"{c[6:]} {v / s * 100:.0f}%" for c, v in b["stalls"].most_common(4) if v > 0)
        ops = " ".join(f"{o}x{n}" for o, n in b["ops"].most_common(5))
        print(f"{b['at'][-6:]} n={b['n']:4d} warps={b['ex']:7.0f} {b['samples'] / total * 100:5.1f}% | {st} | {ops}")
    overall = collections.Counter()
    for b in blocks:
        overall.update(b["stalls"])
    print("overall: " + ", ".join(f"{c[6:]} {v / total * 100:.1f}%" for c, v in overall.most_common(8)))


def main():
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    for name, lines in tables(open(sys.argv[1]).read().splitlines()):
        summarise(name, lines, top)


if __name__ == "__main__":
    main()
