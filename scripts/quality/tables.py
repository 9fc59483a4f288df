#!/usr/bin/env python3
"""Markdown tables (one per budget) and the committed results CSV from evaluator CSVs.

usage: scripts/quality/tables.py RUN.csv [RUN2.csv ...] [--results OUT.csv]

Several CSVs (e.g. one per window, from runs with --windows 1 --offset w*(P+D+1)) are merged per
(method, profile, budget, context, decode_tokens): perplexities by their scored tokens
(exp of the token-weighted mean of log perplexity, which is exact), recall, attended tokens and attn_rel_err
by the same weights. Prints, per budget, each method's perplexity, its delta vs dense (llama.cpp's own
attention), recall and attended tokens. --results writes the required columns
(method, profile, budget, context, decode_tokens, perplexity, dense_perplexity, recall) to OUT.csv.
"""
import csv
import math
import sys

COLS = ["method", "profile", "budget", "context", "decode_tokens", "perplexity", "dense_perplexity", "recall"]


def merge(files):
    groups, order = {}, []
    for f in files:
        for r in csv.DictReader(open(f)):
            key = (r["method"], r["profile"], r["budget"], r["context"], r["decode_tokens"])
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(r)
    out = []
    for key in order:
        rs = groups[key]
        w = [int(r["decode_tokens"]) * int(r["windows"]) for r in rs]
        tw = sum(w)

        def wmean(col, log=False):
            vals = [(x, r[col]) for x, r in zip(w, rs) if r.get(col, "") not in ("", "nan")]
            if not vals:
                return None
            s = sum(x for x, _ in vals)
            m = sum(x * (math.log(float(v)) if log else float(v)) for x, v in vals) / s
            return math.exp(m) if log else m

        out.append(dict(method=key[0], profile=key[1], budget=key[2], context=key[3], decode_tokens=key[4],
                        windows=sum(int(r["windows"]) for r in rs), scored=tw,
                        perplexity=wmean("perplexity", True), dense_perplexity=wmean("dense_perplexity", True),
                        recall=wmean("recall"), attended=wmean("attended_tokens"), attn_rel_err=wmean("attn_rel_err")))
    return out


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    results = None
    if "--results" in argv:
        i = argv.index("--results")
        results = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    rows = merge(argv)
    if results:
        with open(results, "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(COLS)
            for r in rows:
                wr.writerow([r["method"], r["profile"], r["budget"], r["context"], r["decode_tokens"],
                             f'{r["perplexity"]:.6f}', f'{r["dense_perplexity"]:.6f}',
                             "" if r["recall"] is None else f'{r["recall"]:.6f}'])
    budgets = []
    for r in rows:
        if r["budget"] not in budgets:
            budgets.append(r["budget"])
    for b in budgets:
        print(f"\nbudget {b}:\n")
        print("| method | profile | windows | attended / KV head | perplexity | vs dense | recall | attn_rel_err |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["budget"] != b:
                continue
            rec = "" if r["recall"] is None else f'{r["recall"]:.3f}'
            att = "" if r["attended"] is None else f'{r["attended"]:.1f}'
            print(f'| `{r["method"]}` | {r["profile"]} | {r["windows"]} | {att} | {r["perplexity"]:.5f} | '
                  f'{100 * (r["perplexity"] / r["dense_perplexity"] - 1):+.2f}% | {rec} | {r["attn_rel_err"]:.3g} |')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
