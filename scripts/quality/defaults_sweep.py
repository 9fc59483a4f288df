#!/usr/bin/env python3
"""Sweep of the library's dense-set defaults at a fixed number of attended tokens.

usage: scripts/quality/defaults_sweep.py --bin llama_cpp_eval --model M.gguf --text T.txt --out DIR
                                         [--context 4096] [--decode 512] [--method sikv_4+1] [--jobs 2]
                                         [--threads 1] [--variants reference,window_128,...] [--summary-only]

Every variant attends the same number of tokens per KV head and step, sinks + window + b with
b = P/16 at the reference point (4 sinks, 64-token window, heavy = b/4 charged to b, median centre),
so a variant only moves tokens between the sinks, the window, the heavy set and the selection, or
changes the centre. Each variant is one evaluator process (its own prefill); the reference run also
decodes `llama`. The summary is the paired perplexity change of each variant against the reference
on the same tokens, with the block-bootstrap interval of report.py. --variants runs (and summarises) only the
named variants, in the order given; the summary needs the reference's files in DIR (run with it or before it).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluator  # noqa: E402
import report  # noqa: E402


def variants(b):
    """name -> (evaluator options, budget tokens); every row attends 4 + 64 + b tokens."""
    return {
        "reference": ([], b),
        "heavy_0": (["--sikv-heavy-frac", "0"], b),
        "heavy_128": (["--sikv-heavy", "128", "--sikv-heavy-frac", "0.5"], b),
        "window_32": (["--window", "32"], b + 32),
        "window_96": (["--window", "96"], b - 32),
        "window_128": (["--window", "128"], b - 64),
        "window_192": (["--window", "192"], b - 128),
        "window_256": (["--window", "256"], b - 192),
        "window_128_heavy_0": (["--window", "128", "--sikv-heavy-frac", "0"], b - 64),
        "sinks_0": (["--sinks", "0"], b + 4),
        "sinks_16": (["--sinks", "16"], b - 12),
        "centre_mean": (["--sikv-centre", "mean"], b),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluator.add_common_args(ap, jobs=2)
    ap.add_argument("--method", default="sikv_4+1")
    ap.add_argument("--variants", help="comma list of variant names (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    b = args.context // 16
    vs = variants(b)
    if args.variants:
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in vs]
        if unknown:
            ap.error(f"unknown variants {unknown}; known: {', '.join(vs)}")
        vs = {v: vs[v] for v in names}
    short = [v for v, (_, budget) in vs.items() if budget < 1]
    if short:  # the long windows need b > 192, i.e. a context above 3072
        print(f"skipped at context {args.context} (no budget left): {', '.join(short)}", file=sys.stderr)
        vs = {v: o for v, o in vs.items() if v not in short}

    def run(item):
        name, (opts, budget) = item
        configs = f"{args.method}@{budget}" + (",llama" if name == "reference" else "")
        return name, evaluator.run_evaluator(args, os.path.join(args.out, name), configs, opts)

    if not args.summary_only:
        evaluator.run_jobs(args.jobs, run, vs.items())

    nll = {}
    for name in dict.fromkeys(["reference", *vs]):
        path = os.path.join(args.out, name + ".nll.csv")
        if os.path.exists(path):
            for (ctx, method, budget), toks in report.read_nll([path]).items():
                nll[name if method != "llama" else "llama"] = toks
    if "reference" not in nll or "llama" not in nll:
        print("the reference run is missing", file=sys.stderr)
        return 1
    ref, dense = nll["reference"], nll["llama"]
    print(f"\ncontext {args.context}, {args.method}, {len(ref)} scored tokens, attended 4 + 64 + {b} per KV head\n")
    print("| variant | perplexity | vs dense | vs reference [95% CI] |")
    print("|---|---|---|---|")
    for name in vs:
        toks = nll.get(name)
        if toks is None or set(toks) != set(ref):
            print(f"| {name} | — | — | — |")
            continue
        ppl = math.exp(sum(toks.values()) / len(toks))
        vs_dense = math.exp(sum(toks[t] - dense[t] for t in toks) / len(toks)) - 1
        delta, lo, hi = evaluator.paired(toks, ref)
        print(f"| {name} | {ppl:.4f} | {100 * vs_dense:+.2f}% | {100 * delta:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
