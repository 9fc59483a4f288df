#!/usr/bin/env python3
"""Summarises Nsight Compute CSV output (--csv --page details) of scripts/gpu_check.sh's profile
step: one line per profiled kernel (file, name, grid, block, registers, duration, achieved
occupancy, memory and compute throughput) and its largest warp stall reasons (cycles per
issued instruction)."""
import csv
import io
import os
import sys

STALL = "smsp__average_warps_issue_stalled_"


def rows(path):
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        return []
    return list(csv.DictReader(io.StringIO(text[start:])))


def main():
    for path in sys.argv[1:]:
        kernels = {}
        for r in rows(path):
            k = kernels.setdefault(r["ID"], {"name": r["Kernel Name"], "grid": r["Grid Size"], "block": r["Block Size"], "m": {}})
            k["m"][r["Metric Name"]] = (r["Metric Value"], r.get("Metric Unit", ""))
        print(f"# {os.path.basename(path)}")
        if not kernels:
            print("  (no kernels profiled)")
            continue
        for _, k in sorted(kernels.items(), key=lambda kv: int(kv[0])):
            m = k["m"]
            g = lambda name: "".join(m.get(name, ("?", ""))).replace(" ", "")
            stalls = []
            for name, (val, _) in m.items():
                if name.startswith(STALL) and name.endswith("_per_issue_active.ratio"):
                    try:
                        stalls.append((float(val.replace(",", "")), name[len(STALL):-len("_per_issue_active.ratio")]))
                    except ValueError:
                        pass
            stalls.sort(reverse=True)
            top = " ".join(f"{n}={v:.1f}" for v, n in stalls[:4])
            print(
                f"  {k['name'][:28]:<28} grid={k['grid']:<14} blk={k['block']:<10} regs={g('Registers Per Thread'):<4}"
                f" dur={g('Duration'):<10} occ={g('Achieved Occupancy'):<7} mem%={g('Memory Throughput'):<7}"
                f" sm%={g('Compute (SM) Throughput'):<7} cpi={g('Warp Cycles Per Issued Instruction'):<7} {top}"
            )


if __name__ == "__main__":
    main()
