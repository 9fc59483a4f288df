#!/usr/bin/env python3
"""Summarises the per-instruction source page of an Nsight Compute report (`ncu -i REP --page
source --csv --print-source sass`, written by scripts/gpu_check.sh's `profile_sass` step): for
each kernel, the SASS instructions with the most warp-stall samples and the largest stall
reasons at each, so that a latency chain can be read off without the GUI. The column names
differ between Nsight Compute versions, so they are matched loosely; the raw CSV stays in
$OUT for anything this leaves out."""
import csv
import io
import sys


def blocks(text):
    """Splits the export into one CSV table per kernel (each starts at a "Kernel Name" row)."""
    out, cur, name = [], [], None
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            if cur:
                out.append((name, cur))
            name, cur = line.strip(), []
            continue
        cur.append(line)
    if cur:
        out.append((name, cur))
    return out


def summarise(name, lines, top):
    start = next((i for i, l in enumerate(lines) if l.startswith('"') and ("Source" in l or "Address" in l)), None)
    if start is None:
        return
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    if not rows:
        return
    cols = list(rows[0].keys())
    total_col = next((c for c in cols if "Warp Stall Sampling (All" in c), None)
    if total_col is None:
        total_col = next((c for c in cols if "Sampling" in c), None)
    src_col = next((c for c in cols if c.strip('"') in ("Source", "# Source")), cols[min(1, len(cols) - 1)])
    addr_col = next((c for c in cols if "Address" in c), cols[0])
    # Per-reason samples (stall_*); their "(Not Issued)" halves repeat them.
    stall_cols = [c for c in cols if c.startswith("stall_") and "Not Issued" not in c]

    def num(v):
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return 0.0

    samples = sum(num(r.get(total_col, 0)) for r in rows) if total_col else 0.0
    print(f"# {name}  ({len(rows)} instructions, {samples:.0f} stall samples, column '{total_col}')")
    # Dynamic instruction mix (warp-level instructions executed, by opcode).
    exec_col = next((c for c in cols if c.strip() == "Instructions Executed"), None)
    if exec_col:
        mix = {}
        for r in rows:
            words = str(r.get(src_col, "")).split()
            if words and words[0].startswith("@"):
                words = words[1:]
            op = words[0].split(".")[0] if words else "?"
            mix[op] = mix.get(op, 0.0) + num(r.get(exec_col, 0))
        tot = sum(mix.values())
        if tot > 0:
            parts = ", ".join(f"{op} {100 * v / tot:.0f}%" for op, v in sorted(mix.items(), key=lambda x: -x[1])[:10])
            print(f"  executed: {tot:.3g} warp instructions; {parts}")
    if not total_col or samples <= 0:
        return
    for r in sorted(rows, key=lambda r: -num(r.get(total_col, 0)))[:top]:
        n = num(r[total_col])
        reasons = sorted(((num(r[c]), c) for c in stall_cols if num(r.get(c, 0)) > 0), reverse=True)[:3]
        why = ", ".join(f"{c.replace('stall_', '')}={v:.0f}" for v, c in reasons)
        print(f"  {100 * n / samples:5.1f}%  {r.get(addr_col, '')}  {r.get(src_col, '')[:70]:<70}  {why}")


def main():
    top = 25
    for path in sys.argv[1:]:
        seen = set()
        for name, lines in blocks(open(path, errors="replace").read()):
            key = (name, len(lines), lines[1] if len(lines) > 1 else "")
            if key in seen:  # the export repeats a kernel's table
                continue
            seen.add(key)
            summarise(name, lines, top)


if __name__ == "__main__":
    main()
