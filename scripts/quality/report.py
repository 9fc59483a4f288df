#!/usr/bin/env python3
"""Tables, results CSV, per-layer recall and the plot of a quality study (the output of study.py).

usage: scripts/quality/report.py DIR [DIR2 ...] [--results OUT.csv] [--layers OUT_LAYERS.csv]
                                 [--plot OUT.png] [--markdown OUT.md] [--model NAME]

Reads every evaluator file in the directories (a file may also be named directly): <job>.csv (one row per
configuration), <job>.layers.csv (per-layer recall) and <job>.nll.csv (every scored token's NLL, no header).
CSVs with another header (e.g. an earlier --results written into DIR) are skipped with a note.

The per-token NLLs are the primary data. For each (context, method, budget):
  perplexity   exp(mean NLL) over its scored tokens;
  delta        perplexity / dense - 1, where dense is the `llama` method of the same context, on exactly the same
               (window_start, step) tokens, so delta = exp(mean of the per-token NLL difference) - 1;
  95% CI       paired block bootstrap of that difference: blocks of 32 consecutive steps of one window,
               2000 resamples, fixed seed, percentile interval of exp(mean difference) - 1.
recall (sikv_*: the library's attention-mass ratio; baselines: recall@k), attended_tokens, attn_rel_err and
decode_ms_per_token come from the job CSVs, weighted by scored tokens where a configuration has several rows
(e.g. windows run separately); attn_max_rel_err is their maximum.

Errors (exit 1) rather than a silently wrong table: a context without `llama`, a token scored twice for one
configuration (the same job or directory read twice), CSV rows whose token counts disagree with the NLL files,
a configuration whose tokens differ from llama's, or a KV cache / flash-attention setting that differs from
llama's in the same context.

Prints one markdown table per context (perplexity and delta per budget) and a compact one (recall / attended);
--markdown writes the same text to a file. --results writes one row per configuration:
method,profile,budget,context,decode_tokens,perplexity,dense_perplexity,recall,delta_pct,ci_low_pct,ci_high_pct,
attended_tokens,attn_rel_err,attn_max_rel_err,scored_tokens,decode_ms_per_token.
--layers writes method,profile,budget,context,layer,recall,samples (samples-weighted over files).
--plot needs matplotlib; without it the plot is skipped with a message.
"""
import argparse
import csv
import glob
import math
import os
import random
import sys
from fractions import Fraction

METHOD_ORDER = ["llama", "dense", "oracle_topk", "quest", "sink_window", "sikv_signsign", "sikv_parity",
                "sikv_oracle_2+1", "sikv_oracle_4+1", "sikv_2+1", "sikv_4+1", "sikv_16+1", "sikv_1stage_2+1",
                "sikv_1stage_16+1"]
BUDGET_ORDER = ["1/32", "1/16", "1/8"]
REFERENCE = "llama"
JOB_COLS = ["method", "profile", "budget", "context", "decode_tokens", "perplexity", "dense_perplexity", "recall",
            "budget_tokens", "n_sink", "n_window", "windows", "attended_tokens", "attn_rel_err", "attn_max_rel_err",
            "prefill_s", "decode_ms_per_token", "kv_cache", "flash_attn"]
LAYER_COLS = ["method", "profile", "budget", "context", "decode_tokens", "layer", "recall", "samples"]
RESULT_COLS = ["method", "profile", "budget", "context", "decode_tokens", "perplexity", "dense_perplexity", "recall",
               "delta_pct", "ci_low_pct", "ci_high_pct", "attended_tokens", "attn_rel_err", "attn_max_rel_err",
               "scored_tokens", "decode_ms_per_token"]
LAYER_OUT_COLS = ["method", "profile", "budget", "context", "layer", "recall", "samples"]
BLOCK = 32
RESAMPLES = 2000
SEED = 20251129
# The title names the model the evaluator ran (--model; the default is the study's first model).
TITLE_MODEL = "SmolLM2-135M-Instruct"


def title():
    return f"{TITLE_MODEL}, llama.cpp, decode-mode perplexity"
MISSING = "—"


class ReportError(Exception):
    pass


# ---------------------------------------------------------------- ordering


def method_key(m):
    return (0, METHOD_ORDER.index(m), "") if m in METHOD_ORDER else (1, 0, m)


def budget_fraction(b):
    try:
        f = Fraction(b)
    except (ValueError, ZeroDivisionError):
        return None
    return f if 0 < f <= 1 else None


def budget_key(b):
    if b in BUDGET_ORDER:
        return (0, BUDGET_ORDER.index(b), 0, "")
    f = budget_fraction(b)
    # Other fractions keep their natural order ahead of labels such as `full` and `k=100`.
    return (1, 0, f, "") if f is not None else (2, 0, 0, b)


def config_key(key):
    ctx, method, budget = key
    return (ctx, method_key(method), budget_key(budget))


# ---------------------------------------------------------------- reading


def classify(paths):
    """Evaluator files under the given directories (or named directly), by kind."""
    found = []
    for p in paths:
        if os.path.isdir(p):
            found += sorted(glob.glob(os.path.join(p, "*.csv")))
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise ReportError(f"{p}: no such directory or file")
    # The same directory given twice is one set of files, not duplicated data.
    seen, files = set(), {"job": [], "layers": [], "nll": []}
    for f in found:
        real = os.path.realpath(f)
        if real in seen:
            continue
        seen.add(real)
        kind = "nll" if f.endswith(".nll.csv") else "layers" if f.endswith(".layers.csv") else "job"
        files[kind].append(f)
    if not files["nll"]:
        raise ReportError("no *.nll.csv files found (run the evaluator with --nll-file, as study.py does)")
    return files


def read_header_csv(path, cols):
    """Rows of a CSV with the expected header, or None (with a note) for any other CSV."""
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        if rd.fieldnames is None:
            return []
        if rd.fieldnames[:len(cols)] != cols:
            print(f"note: skipping {path} (not an evaluator file: unexpected header)", file=sys.stderr)
            return None
        return [dict(r, _file=path) for r in rd]


def read_nll(paths):
    """{(context, method, budget): {(window_start, step): nll}}, refusing a token seen twice."""
    tokens, origin = {}, {}
    for path in paths:
        with open(path, newline="") as f:
            for n, rec in enumerate(csv.reader(f), 1):
                if not rec:
                    continue
                try:
                    method, budget, ctx, start, step, nll = rec
                    key, tok, val = (int(ctx), method, budget), (int(start), int(step)), float(nll)
                except ValueError:
                    raise ReportError(f"{path}:{n}: expected method,budget,context,window_start,step,nll, "
                                      f"got {','.join(rec)!r}") from None
                have = tokens.setdefault(key, {})
                if tok in have:
                    raise ReportError(f"{describe(key)} appears twice: window {tok[0]} step {tok[1]} is in both "
                                      f"{origin[key, tok]} and {path}:{n}")
                have[tok] = val
                origin[key, tok] = f"{path}:{n}"
    return tokens


def read_jobs(paths):
    """{(context, method, budget): [rows]} from the job CSVs."""
    rows = {}
    for path in paths:
        for r in read_header_csv(path, JOB_COLS) or []:
            try:
                key = (int(r["context"]), r["method"], r["budget"])
            except ValueError:
                raise ReportError(f"{path}: bad context {r['context']!r}") from None
            rows.setdefault(key, []).append(r)
    return rows


def read_layers(paths):
    """Per-layer recall merged over files: samples-weighted mean, samples summed."""
    acc = {}
    for path in paths:
        for r in read_header_csv(path, LAYER_COLS) or []:
            key = (int(r["context"]), r["method"], r["budget"], r["profile"], int(r["layer"]))
            s = int(r["samples"])
            a = acc.setdefault(key, [0.0, 0])
            a[0] += float(r["recall"]) * s
            a[1] += s
    out = []
    for (ctx, method, budget, profile, layer), (wsum, s) in acc.items():
        out.append(dict(method=method, profile=profile, budget=budget, context=ctx, layer=layer,
                        recall=wsum / s if s else None, samples=s))
    out.sort(key=lambda r: (config_key((r["context"], r["method"], r["budget"])), r["profile"], r["layer"]))
    return out


def describe(key):
    ctx, method, budget = key
    return f"context {ctx}: {method} @ {budget}"


# ---------------------------------------------------------------- statistics


def number(s):
    """A CSV cell as a float, or None where the evaluator wrote nothing or a NaN."""
    if s is None or s.strip() == "":
        return None
    try:
        v = float(s)
    except ValueError:
        raise ReportError(f"not a number: {s!r}") from None
    return None if math.isnan(v) or math.isinf(v) else v


def weighted(rows, col, weights, transform=lambda v: v):
    vals = [(w, number(r[col])) for r, w in zip(rows, weights)]
    vals = [(w, transform(v)) for w, v in vals if v is not None]
    total = sum(w for w, _ in vals)
    return sum(w * v for w, v in vals) / total if total else None


def quantile(sorted_vals, q):
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def block_bootstrap(diffs, block=BLOCK, resamples=RESAMPLES, seed=SEED, level=0.95):
    """Percentile CI of exp(mean diff) - 1, resampling blocks of `block` consecutive steps of one window.

    Blocks keep the serial correlation of neighbouring tokens' NLLs, which an i.i.d. token bootstrap would
    ignore and so give too narrow an interval. A fresh generator per call keeps every configuration's interval
    independent of which other configurations are in the report."""
    blocks = {}
    for (start, step), d in diffs.items():
        b = blocks.setdefault((start, step // block), [0.0, 0])
        b[0] += d
        b[1] += 1
    stats = list(blocks.values())
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        pick = rng.choices(stats, k=len(stats))
        # A ratio of sums, as a window's last block may be shorter than the others.
        means.append(sum(s for s, _ in pick) / sum(n for _, n in pick))
    means.sort()
    alpha = (1.0 - level) / 2.0
    return math.expm1(quantile(means, alpha)), math.expm1(quantile(means, 1.0 - alpha))


# ---------------------------------------------------------------- combining


def merge_rows(key, rows, n_tokens):
    """One configuration's CSV rows as one record, checked against its NLL token count."""
    if not rows:
        raise ReportError(f"{describe(key)} has {n_tokens} NLL tokens but no row in a job CSV "
                          "(an interrupted job? rerun it: study.py resumes)")
    weights = [int(r["decode_tokens"]) * int(r["windows"]) for r in rows]
    if sum(weights) != n_tokens:
        files = ", ".join(sorted({r["_file"] for r in rows}))
        raise ReportError(f"{describe(key)}: job CSV rows ({files}) account for {sum(weights)} scored tokens, the "
                          f"NLL files hold {n_tokens}; the configuration appears twice or a file is incomplete")
    for col in ("profile", "decode_tokens", "kv_cache", "flash_attn"):
        vals = sorted({r[col] for r in rows})
        if len(vals) > 1:
            raise ReportError(f"{describe(key)}: rows disagree on {col} ({', '.join(vals)})")
    maxes = [v for v in (number(r["attn_max_rel_err"]) for r in rows) if v is not None]
    # Perplexities combine through their logs: exp of the token-weighted mean NLL.
    log_ppl = weighted(rows, "perplexity", weights, math.log)
    first = rows[0]
    return dict(profile=first["profile"], decode_tokens=int(first["decode_tokens"]), kv_cache=first["kv_cache"],
                flash_attn=first["flash_attn"], csv_perplexity=None if log_ppl is None else math.exp(log_ppl),
                recall=weighted(rows, "recall", weights), attended_tokens=weighted(rows, "attended_tokens", weights),
                attn_rel_err=weighted(rows, "attn_rel_err", weights),
                attn_max_rel_err=max(maxes) if maxes else None,
                decode_ms_per_token=weighted(rows, "decode_ms_per_token", weights))


def check_tokens(key, toks, ref):
    if toks.keys() == ref.keys():
        return
    missing = sorted(ref.keys() - toks.keys())
    extra = sorted(toks.keys() - ref.keys())
    detail = []
    if missing:
        detail.append(f"{len(missing)} of llama's tokens missing (first: window {missing[0][0]} step {missing[0][1]})")
    if extra:
        detail.append(f"{len(extra)} tokens llama lacks (first: window {extra[0][0]} step {extra[0][1]})")
    raise ReportError(f"{describe(key)} is not scored on llama's tokens: {len(toks)} vs {len(ref)}; "
                      + "; ".join(detail))


def check_settings(key, rec, ref):
    for col in ("kv_cache", "flash_attn"):
        if rec[col] != ref[col]:
            raise ReportError(f"{describe(key)} ran with {col} {rec[col]}, llama with {ref[col]}: "
                              "the paired comparison would mix two engines")


def summarize(tokens, rows):
    """One result per (context, method, budget), sorted for output."""
    for key in rows:
        if key not in tokens:
            raise ReportError(f"{describe(key)} has a job CSV row but no NLL tokens "
                              "(run the evaluator with --nll-file, as study.py does)")
    contexts = sorted({k[0] for k in tokens})
    refs = {}
    for ctx in contexts:
        rk = (ctx, REFERENCE, "full")
        if rk not in tokens:
            present = sorted(f"{m}@{b}" for c, m, b in tokens if c == ctx)
            raise ReportError(f"context {ctx} has no {REFERENCE} (dense reference) tokens; the job that runs "
                              f"{REFERENCE} is missing or incomplete (present: {', '.join(present)})")
        refs[ctx] = (tokens[rk], merge_rows(rk, rows.get(rk, []), len(tokens[rk])))

    results = []
    for key in sorted(tokens, key=config_key):
        ctx, method, budget = key
        toks = tokens[key]
        ref_toks, ref_rec = refs[ctx]
        check_tokens(key, toks, ref_toks)
        rec = merge_rows(key, rows.get(key, []), len(toks))
        check_settings(key, rec, ref_rec)
        diffs = {t: toks[t] - ref_toks[t] for t in toks}
        mean_nll = math.fsum(toks.values()) / len(toks)
        ref_nll = math.fsum(ref_toks.values()) / len(ref_toks)
        lo, hi = block_bootstrap(diffs)
        ppl = math.exp(mean_nll)
        if rec["csv_perplexity"] is not None and abs(rec["csv_perplexity"] / ppl - 1) > 1e-4:
            print(f"warning: {describe(key)}: job CSV perplexity {rec['csv_perplexity']:.6f} differs from the NLL "
                  f"files' {ppl:.6f}", file=sys.stderr)
        delta = math.expm1(math.fsum(diffs.values()) / len(diffs))
        results.append(dict(rec, method=method, budget=budget, context=ctx, perplexity=ppl,
                            dense_perplexity=math.exp(ref_nll), delta=delta, ci_low=lo, ci_high=hi,
                            scored_tokens=len(toks), windows=len({s for s, _ in toks})))
    return results


# ---------------------------------------------------------------- output


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def write_results(results, path):
    with open(path, "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(RESULT_COLS)
        for r in results:
            wr.writerow([r["method"], r["profile"], r["budget"], r["context"], r["decode_tokens"],
                         fmt(r["perplexity"], ".6f"), fmt(r["dense_perplexity"], ".6f"), fmt(r["recall"], ".6f"),
                         fmt(100 * r["delta"], ".4f"), fmt(100 * r["ci_low"], ".4f"), fmt(100 * r["ci_high"], ".4f"),
                         fmt(r["attended_tokens"], ".1f"), fmt(r["attn_rel_err"], ".3e"),
                         fmt(r["attn_max_rel_err"], ".3e"), r["scored_tokens"], fmt(r["decode_ms_per_token"], ".2f")])


def write_layers(layers, path):
    with open(path, "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(LAYER_OUT_COLS)
        for r in layers:
            wr.writerow([r["method"], r["profile"], r["budget"], r["context"], r["layer"], fmt(r["recall"], ".6f"),
                         r["samples"]])


def ppl_cell(r):
    if r["method"] == REFERENCE:
        return f"{r['perplexity']:.4f} (reference)"
    return (f"{r['perplexity']:.4f} ({100 * r['delta']:+.2f}% "
            f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}])")


def stats_cell(r):
    if r["recall"] is None and r["attended_tokens"] is None:
        return MISSING
    return f"{fmt(r['recall'], '.3f') or MISSING} / {fmt(r['attended_tokens'], '.1f') or MISSING}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def columns(results):
    """(label, budgets) per table column: one per budget fraction, the unbudgeted ones (full, k=100) pooled.

    Pooling keeps llama, dense and sikv_parity from each taking a column that is empty on every other row; it
    falls back to one column per label should a method ever have two unbudgeted configurations."""
    budgets = sorted({r["budget"] for r in results}, key=budget_key)
    fractions = [b for b in budgets if budget_fraction(b) is not None]
    others = [b for b in budgets if budget_fraction(b) is None]
    per_method = {}
    for r in results:
        if r["budget"] in others:
            per_method[r["method"]] = per_method.get(r["method"], 0) + 1
    cols = [(b, [b]) for b in fractions]
    if others and max(per_method.values()) == 1:
        cols.append(("unbudgeted", others))
    else:
        cols += [(b, [b]) for b in others]
    return cols


def cells(methods, cols, by, cell):
    rows = []
    for m in methods:
        row = [f"`{m}`"]
        for label, budgets in cols:
            hit = [b for b in budgets if (m, b) in by]
            text = cell(by[m, hit[0]]) if hit else MISSING
            # A pooled column names the budget unless it is the plain dense `full`.
            pooled = hit and len(budgets) > 1 and hit[0] != "full" and text != MISSING
            row.append(f"{hit[0]}: {text}" if pooled else text)
        rows.append(row)
    return rows


def context_tables(ctx, results):
    by = {(r["method"], r["budget"]): r for r in results}
    methods = sorted({r["method"] for r in results}, key=method_key)
    cols = columns(results)
    ref = by[(REFERENCE, "full")]
    lines = [f"## Context {ctx}", "",
             f"{ref['scored_tokens']} scored tokens ({ref['windows']} window(s) of {ref['decode_tokens']} decode "
             f"tokens); dense ({REFERENCE}) perplexity {ref['perplexity']:.4f}. Δ vs dense with a 95% paired "
             f"block-bootstrap CI ({BLOCK}-step blocks, {RESAMPLES} resamples).", ""]
    lines += table(["method"] + [f"{label}: ppl (Δ vs dense [95% CI])" for label, _ in cols],
                   cells(methods, cols, by, ppl_cell))
    lines += ["", "recall / attended tokens per KV head and step (recall: sikv_* = the library's attention-mass "
              "ratio, baselines = recall@k of the exact top-k):", ""]
    profiles = {m: "/".join(sorted({r["profile"] for r in results if r["method"] == m})) for m in methods}
    rows = cells(methods, cols, by, stats_cell)
    lines += table(["method", "profile"] + [label for label, _ in cols],
                   [[row[0], profiles[m]] + row[1:] for m, row in zip(methods, rows)])
    return lines


def markdown(results):
    lines = [f"# {title()}", ""]
    for ctx in sorted({r["context"] for r in results}):
        lines += context_tables(ctx, [r for r in results if r["context"] == ctx]) + [""]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)", file=sys.stderr)
        return False
    contexts = sorted({r["context"] for r in results})
    budgeted = [r for r in results if budget_fraction(r["budget"]) is not None]
    methods = sorted({r["method"] for r in budgeted}, key=method_key)
    # One colour and marker per method across all panels, so a line can be followed from one context to the next.
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>pPX*h"
    style = {m: (cmap(i % 20), markers[i % len(markers)]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.8), squeeze=False, sharey=False)
    handles = {}
    for ax, ctx in zip(axes[0], contexts):
        fracs = set()
        for m in methods:
            pts = sorted(((float(budget_fraction(r["budget"])), r) for r in budgeted
                          if r["context"] == ctx and r["method"] == m), key=lambda p: p[0])
            if not pts:
                continue
            # Nudge each method sideways (in log2 units) so that overlapping error bars stay readable.
            nudge = 2 ** (0.03 * (methods.index(m) - (len(methods) - 1) / 2))
            x = [p * nudge for p, _ in pts]
            y = [100 * r["delta"] for _, r in pts]
            err = [[100 * (r["delta"] - r["ci_low"]) for _, r in pts],
                   [100 * (r["ci_high"] - r["delta"]) for _, r in pts]]
            color, marker = style[m]
            handles[m] = ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=3, linewidth=1.2,
                                     markersize=5, label=m)
            fracs.update(p for p, _ in pts)
        handles["dense"] = ax.axhline(0.0, color="black", linestyle="--", linewidth=1, label="dense (llama)")
        ax.set_xscale("log", base=2)
        ticks = sorted(fracs)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(Fraction(t).limit_denominator(1 << 16)) for t in ticks])
        ax.minorticks_off()
        if ticks:
            ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
        ax.set_title(f"context {ctx}")
        ax.set_xlabel("budget (fraction of the context)")
        ax.set_ylabel("perplexity vs dense, Δ %")
        ax.grid(True, alpha=0.3)
    order = ["dense"] + [m for m in methods if m in handles]
    fig.legend([handles[k] for k in order], ["dense (llama)"] + order[1:], loc="lower center",
               ncol=min(len(order), 5), frameon=False)
    fig.suptitle(f"{title()}: Δ vs dense attention (95% block-bootstrap CI)")
    rows_of_legend = math.ceil(len(order) / 5)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend, 1, 0.95))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--results", metavar="OUT.csv")
    ap.add_argument("--layers", metavar="OUT_LAYERS.csv")
    ap.add_argument("--plot", metavar="OUT.png")
    ap.add_argument("--markdown", metavar="OUT.md")
    ap.add_argument("--model", metavar="NAME", default=TITLE_MODEL, help="the model named in the title")
    return ap.parse_args(argv)


def run(args):
    global TITLE_MODEL
    TITLE_MODEL = args.model
    files = classify(args.dirs)
    results = summarize(read_nll(files["nll"]), read_jobs(files["job"]))
    text = markdown(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.results:
        write_results(results, args.results)
    if args.layers:
        write_layers(read_layers(files["layers"]), args.layers)
    if args.plot:
        plot(results, args.plot)
    return results


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
