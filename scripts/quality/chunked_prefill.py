#!/usr/bin/env python3
"""Chunked prefill over the compressed cache (issue #15): calibrate on the first chunk, prefill the rest of the
prompt through the library, then decode; against calibrating on the whole (dense) prompt.

usage: scripts/quality/chunked_prefill.py --bin llama_cpp_eval --model M.gguf --text T.txt --out DIR
                                          [--context 7680] [--decode 512] [--budget 1/16] [--profiles 2+1]
                                          [--chunks 1024,2048] [--no-whole] [--jobs 1] [--threads 1]
                                          [--summary-only] [--csv OUT.csv] [--nll OUT_NLL.csv]

Jobs, one evaluator process each: `whole` (the prompt prefilled densely in one ubatch, every method calibrated
on all of it: `llama`, the dense reference, and `sikv_<profile>@<budget>` per profile; --prefill-nll-file
records the dense prefill's own next-token NLL at every prompt position) and `chunk<N>` per chunk size
(--chunked-prefill N: the library methods calibrate on the first N tokens and take the rest N per
llama_decode, their rows attended over the compressed cache; each chunked position's NLL recorded).
--no-whole skips the `whole` job (its files in DIR are read as they are). The summary pairs, on the same
tokens with report.py's block bootstrap: each chunked run's decode against the whole-prompt run of its
profile and against `llama`, and its prefill NLL over the chunked positions (N..P-1, and the positions
every chunk size shares) against the dense prefill's. --csv / --nll write the summary rows and every
token's NLL (lines part,chunk,method,budget,context,window_start,step,nll; part is decode or prefill,
step the decode step or the prompt position whose logits are scored, chunk 0 the whole-prompt run).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluator  # noqa: E402
import report  # noqa: E402


def jobs(args):
    """(name, --configs, extra options) of every job, in run order."""
    lib = [f"sikv_{p}@{args.budget}" for p in args.profiles]
    out = [] if args.no_whole else [("whole", ",".join(["llama", *lib]), [])]
    for n in args.chunks:
        out.append((f"chunk{n}", ",".join(lib), ["--chunked-prefill", str(n)]))
    return out


def run_job(args, job):
    name, configs, extra = job
    base = os.path.join(args.out, name)
    # the evaluator appends, and run_evaluator clears only its own two files
    if os.path.exists(base + ".prefill.csv"):
        os.remove(base + ".prefill.csv")
    return name, evaluator.run_evaluator(args, base, configs, [*extra, "--prefill-nll-file", base + ".prefill.csv"])


def load(args):
    """{(part, chunk, method): {(window_start, step): nll}} of the jobs run so far (chunk 0: whole prompt)."""
    out = {}
    for chunk in [0, *args.chunks]:
        base = os.path.join(args.out, "whole" if chunk == 0 else f"chunk{chunk}")
        for part, suffix in (("decode", ".nll.csv"), ("prefill", ".prefill.csv")):
            if os.path.exists(base + suffix):
                for (ctx, method, budget), toks in report.read_nll([base + suffix]).items():
                    out[part, chunk, method] = toks
    return out


def ppl(toks):
    return math.exp(sum(toks.values()) / len(toks))


def positions(toks, lo):
    return {t: v for t, v in toks.items() if t[1] >= lo}


COLS = ["part", "method", "profile", "budget", "context", "decode_tokens", "chunk", "first_position", "perplexity",
        "dense_perplexity", "vs_dense_pct", "dense_ci_low_pct", "dense_ci_high_pct", "vs_whole_pct",
        "whole_ci_low_pct", "whole_ci_high_pct", "scored_tokens"]


def row(args, part, method, chunk, lo, toks, dense_toks, vs_dense, vs_whole):
    pct = lambda v, i: "" if v is None else f"{100 * v[i]:+.4f}"
    profile = method[len("sikv_"):] if method.startswith("sikv_") else "fp32"
    return [part, method, profile, args.budget if method != "llama" else "full", args.context, args.decode, chunk, lo,
            f"{ppl(toks):.6f}", f"{ppl(dense_toks):.6f}" if dense_toks else "", pct(vs_dense, 0), pct(vs_dense, 1),
            pct(vs_dense, 2), pct(vs_whole, 0), pct(vs_whole, 1), pct(vs_whole, 2), len(toks)]


def summarise(args, nll):
    """Markdown tables on stdout; the CSV rows of the summary."""
    out = []
    dense = nll.get(("decode", 0, "llama"))
    print(f"\ncontext {args.context}, budget {args.budget}, {args.decode} decode tokens\n")
    print("Decode after the prefill:\n")
    print("| profile | prefill | perplexity | vs dense [95% CI] | vs whole prompt [95% CI] |")
    print("|---|---|---|---|---|")
    if dense:
        print(f"| dense (`llama`) | whole prompt | {ppl(dense):.6f} | — | — |")
        out.append(row(args, "decode", "llama", 0, args.context, dense, None, None, None))
    for p in args.profiles:
        m = f"sikv_{p}"
        whole = nll.get(("decode", 0, m))
        for chunk in [0, *args.chunks]:
            toks = nll.get(("decode", chunk, m))
            label = "whole prompt" if chunk == 0 else f"chunks of {chunk}"
            if toks is None:
                print(f"| {p} | {label} | (not run) | | |")
                continue
            vs_dense = evaluator.paired(toks, dense)
            vs_whole = evaluator.paired(toks, whole) if chunk else None
            print(f"| {p} | {label} | {ppl(toks):.6f} | {evaluator.fmt(vs_dense)} | {evaluator.fmt(vs_whole)} |")
            out.append(row(args, "decode", m, chunk, args.context, toks, dense, vs_dense, vs_whole))

    # The prefill's own loss: the chunked positions of each chunk size, then the positions every chunk size
    # shares, so that the chunk sizes compare on the same tokens too.
    ref = nll.get(("prefill", 0, "llama"))
    common = max(args.chunks) if args.chunks else None
    print("\nThe prefill's next-token loss over the chunked positions (dense: llama.cpp's whole-prompt prefill):\n")
    print("| profile | chunk | positions | perplexity | dense | vs dense [95% CI] |")
    print("|---|---|---|---|---|---|")
    for p in args.profiles:
        m = f"sikv_{p}"
        for lo_of in ("own", "common"):
            for chunk in args.chunks:
                toks = nll.get(("prefill", chunk, m))
                lo = chunk if lo_of == "own" else common
                if lo_of == "common" and (chunk == common or len(args.chunks) < 2):
                    continue
                if not toks:
                    print(f"| {p} | {chunk} | {lo}.. | (not run) | | |")
                    continue
                toks = positions(toks, lo)
                d = positions(ref, lo) if ref else None
                vs = evaluator.paired(toks, d)
                print(f"| {p} | {chunk} | {lo}..{args.context - 1} | {ppl(toks):.6f} | "
                      f"{ppl(d) if d else float('nan'):.6f} | {evaluator.fmt(vs)} |")
                out.append(row(args, "prefill", m, chunk, lo, toks, d, vs, None))

    # Where along the prompt the loss goes: the same positions in spans of --span, from the smallest chunk on.
    if ref and args.chunks:
        lo = min(args.chunks)
        spans = [(a, min(a + args.span, args.context)) for a in range(lo, args.context, args.span)]
        runs = [(p, c) for p in args.profiles for c in args.chunks if ("prefill", c, f"sikv_{p}") in nll]
        print(f"\nThe prefill's perplexity by position (spans of {args.span}; —: prefilled densely or not run):\n")
        print("| positions | dense | " + " | ".join(f"{p}, chunks of {c}" for p, c in runs) + " |")
        print("|---|---|" + "---|" * len(runs))
        for a, b in spans:
            span = lambda t: {k: v for k, v in t.items() if a <= k[1] < b}
            cells = []
            for p, c in runs:
                toks = span(nll["prefill", c, f"sikv_{p}"])
                cells.append(f"{ppl(toks):.3f}" if toks else "—")  # before the chunk (dense), or not run
            print(f"| {a}..{b - 1} | {ppl(span(ref)):.3f} | " + " | ".join(cells) + " |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluator.add_common_args(ap, jobs=1)
    ap.set_defaults(context=7680)
    ap.add_argument("--budget", default="1/16")
    ap.add_argument("--profiles", default="2+1")
    ap.add_argument("--chunks", default="1024,2048")
    ap.add_argument("--span", type=int, default=1024, help="positions per span of the by-position table")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-prompt job (read its files as they are)")
    ap.add_argument("--csv", help="write the summary rows here")
    ap.add_argument("--nll", help="write every token's NLL here (part,chunk,method,budget,context,window_start,step,nll)")
    args = ap.parse_args()
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    os.makedirs(args.out, exist_ok=True)
    if not args.summary_only:
        evaluator.run_jobs(args.jobs, lambda j: run_job(args, j), jobs(args))
    nll = load(args)
    evaluator.write_outputs(args, COLS, summarise(args, nll), nll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
