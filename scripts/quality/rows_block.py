#!/usr/bin/env python3
"""Several query rows per call (issue #15): teacher-forced decode blocks against one-by-one decode.

usage: scripts/quality/rows_block.py --bin llama_cpp_eval --model M.gguf --text T.txt --out DIR
                                     [--context 4096] [--decode 512] [--budget 1/16] [--profiles 2+1,4+1]
                                     [--blocks 1,4,8] [--llama-blocks LIST] [--jobs 1] [--threads 1] [--summary-only]
                                     [--csv OUT.csv] [--nll OUT_NLL.csv]

One evaluator process per block size N (`--decode-block N`): it prefills once and decodes the same 512
tokens N per llama_decode with `llama` (llama.cpp's own attention, the dense reference) and, per profile,
the library selecting per row (`sikv_<profile>`, one sikv_attend_rows call per layer and block) and once
per block from the rows' mean query (`sikv_<profile>_meanq`, SIKV_FLAG_ROWS_MEAN_QUERY); --llama-blocks
limits `llama` to the listed blocks (it is the same at every block size; block 1's then serves). Block 1 is the
one-by-one decode (sikv_attend; the two selections are the same there, so it runs per row only). The
summary pairs every configuration against block 1 of the same profile on the same tokens, with the
block-bootstrap interval of report.py; --csv / --nll write the rows and every token's NLL with a leading
`block` column (the CSV: results.csv's leading columns, then block and selection).
"""
import argparse
import csv
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluator  # noqa: E402
import report  # noqa: E402


def configs(block, profiles, budget, with_llama=True):
    """The evaluator's --configs for one block size: llama first, then per profile per row (and mean query)."""
    out = ["llama"] if with_llama else []
    for p in profiles:
        out.append(f"sikv_{p}@{budget}")
        if block > 1:
            out.append(f"sikv_{p}_meanq@{budget}")
    return out


def run_block(args, block):
    configs_ = ",".join(configs(block, args.profiles, args.budget, block in args.llama_blocks))
    base = os.path.join(args.out, f"block{block}")
    return f"block {block}", evaluator.run_evaluator(args, base, configs_, ["--decode-block", str(block)])


def load(args):
    """{(block, method): {(window_start, step): nll}} and {(block, method): csv row} of the blocks run so far."""
    nll, rows = {}, {}
    for block in args.blocks:
        base = os.path.join(args.out, f"block{block}")
        if os.path.exists(base + ".nll.csv"):
            for (ctx, method, budget), toks in report.read_nll([base + ".nll.csv"]).items():
                nll[block, method] = toks
        if os.path.exists(base + ".csv"):
            for r in csv.DictReader(open(base + ".csv")):
                rows[block, r["method"]] = r
    return nll, rows


def summarise(args, nll, rows):
    """Markdown table on stdout; the CSV of the summary rows (leading `block`)."""
    out = []
    print(f"\ncontext {args.context}, budget {args.budget}, {args.decode} decode tokens\n")
    print("| profile | block | selection | perplexity | vs dense | vs block 1 [95% CI] | vs per row, same block [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for block in args.blocks:
        if (block, "llama") in nll:
            d = nll[block, "llama"]
            ppl = math.exp(sum(d.values()) / len(d))
            # llama.cpp's own attention at N rows per call against one: float noise only, so the
            # difference is shown to its size rather than as a rounded percentage
            vs1 = evaluator.paired(d, nll.get((1, "llama"))) if block > 1 else None
            shown = "—" if vs1 is None else f"{vs1[0]:+.1e} (max token NLL diff {max_diff(d, nll[1, 'llama']):.1e})"
            print(f"| dense (`llama`) | {block} | — | {ppl:.6f} | — | {shown} | — |")
            out.append(row(args, block, "llama", "", ppl, None, vs1, None, rows, len(d)))
    for p in args.profiles:
        base = nll.get((1, f"sikv_{p}"))
        for block in args.blocks:
            for sel, m in (("per row", f"sikv_{p}"), ("mean query", f"sikv_{p}_meanq")):
                if block == 1 and sel == "mean query":
                    continue
                toks = nll.get((block, m))
                if toks is None:
                    print(f"| {p} | {block} | {sel} | (not run) | | | |")
                    continue
                ppl = math.exp(sum(toks.values()) / len(toks))
                # llama.cpp's own attention gives the same figure at every block size (float noise:
                # the table's llama rows), so block 1's stands in where a block ran without it
                dense = evaluator.paired(toks, nll.get((block, "llama"), nll.get((1, "llama"))))
                vs1 = evaluator.paired(toks, base) if block > 1 else None
                vsrow = evaluator.paired(toks, nll.get((block, f"sikv_{p}"))) if sel == "mean query" else None
                print(f"| {p} | {block} | {sel} | {ppl:.6f} | {evaluator.fmt(dense, ci=False)} | {evaluator.fmt(vs1)} | {evaluator.fmt(vsrow)} |")
                out.append(row(args, block, m, p, ppl, dense, vs1, vsrow, rows, len(toks)))
    return out


def max_diff(toks, ref):
    return max(abs(toks[t] - ref[t]) for t in toks)


# The leading columns of results.csv, then the block and the selection.
COLS = ["method", "profile", "budget", "context", "decode_tokens", "perplexity", "block", "selection", "vs_dense_pct",
        "vs_block1_pct", "ci_low_pct", "ci_high_pct", "vs_per_row_pct", "per_row_ci_low_pct", "per_row_ci_high_pct",
        "attn_rel_err", "decode_ms_per_token", "scored_tokens"]


def row(args, block, method, profile, ppl, dense, vs1, vsrow, rows, n):
    r = rows.get((block, method), {})
    pct = lambda v, i: "" if v is None else f"{100 * v[i]:+.4f}"
    selection = "" if not profile else ("mean_query" if method.endswith("_meanq") else "per_row")
    return [method, profile or "fp32", args.budget if profile else "full", args.context, args.decode, f"{ppl:.6f}",
            block, selection, pct(dense, 0), pct(vs1, 0), pct(vs1, 1), pct(vs1, 2), pct(vsrow, 0), pct(vsrow, 1),
            pct(vsrow, 2), r.get("attn_rel_err", ""), r.get("decode_ms_per_token", ""), n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluator.add_common_args(ap, jobs=1)
    ap.add_argument("--budget", default="1/16")
    ap.add_argument("--profiles", default="2+1,4+1")
    ap.add_argument("--blocks", default="1,4,8")
    ap.add_argument("--llama-blocks", help="blocks that also decode `llama` (default: every block)")
    ap.add_argument("--csv", help="write the summary rows here")
    ap.add_argument("--nll", help="write every token's NLL here (block,method,budget,context,window_start,step,nll)")
    args = ap.parse_args()
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    args.llama_blocks = [int(b) for b in args.llama_blocks.split(",") if b] if args.llama_blocks else args.blocks
    os.makedirs(args.out, exist_ok=True)
    if not args.summary_only:
        evaluator.run_jobs(args.jobs, lambda b: run_block(args, b), args.blocks)
    nll, rows = load(args)
    evaluator.write_outputs(args, COLS, summarise(args, nll, rows), nll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
