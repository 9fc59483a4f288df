#!/usr/bin/env python3
"""2+1 storage variants, emulated in the harness, against the library's own 2-bit storage (issue #14 item 4).

usage: scripts/quality/storage_variants.py --bin llama_cpp_eval --model M.gguf --text T.txt --out DIR
                                           [--context 4096] [--decode 512] [--budget 1/16]
                                           [--variants emul2_lloyd,emul2_vchan,...] [--no-library]
                                           [--one-job [--job-name variants]] [--skip-existing] [--jobs 1] [--threads 1] [--summary-only]
                                           [--csv FILE] [--nll FILE]

Every method attends 4 sinks + a 64-token window + the exact top-b (b = budget) of the other tokens by q̄·k over
the exact keys; they differ only in how the selected tokens are stored (the harness's emul2_* methods,
methods.h). The reference job decodes llama (dense), oracle_topk (no storage loss), emul2_uniform (the
library's 2+1 storage, emulated); the library job, unless --no-library, sikv_oracle_2+1 (the library's own
stored bits, the check of the emulation); each variant is a job of its own (its own prefill), or all of them
one job with --one-job. --skip-existing leaves out a job whose results are all in DIR already. The summary
reads every job's files in DIR, pairs every method with dense and with emul2_uniform on the same tokens
(report.py's block bootstrap), gives the share of the storage loss each removes (emul2_uniform's mean NLL above
oracle_topk's, the exact top-k attended in full precision, taken as 100 %) and the bytes each stores per token
and KV head (head_dim 64).
"""
import argparse
import csv
import gzip
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluator  # noqa: E402
import report  # noqa: E402

VARIANTS = ["emul2_lloyd", "emul2_lloydk", "emul2_lloydv", "emul2_vchan", "emul2_outlier1", "emul2_outlier3", "emul2_voutlier1", "emul2_voutlier3",
            "emul2_vchan_outlier3", "emul2_lloyd_outlier3", "emul2_lloyd_vchan_outlier3"]
KEEP_LINE = re.compile(r"window \d+ (\S+)\s+layer 0 kept in fp16: (\d+) prompt token-heads, (\d+) of (\d+) decode")


def bytes_per_token(method, d, kept):
    """Bytes per token and KV head of one layer: the 2+1 row (signs d/8, key magnitudes and value codes d/4
    each, an fp16 (delta, zero) pair per 32 channels for keys and for values), plus, for tokens kept apart,
    fp16 k and v and a 4-byte position, times the share kept. Lloyd's level tables (8 fp16 per layer and KV
    head) and vchan's per-channel pairs (4 bytes per channel per 32 tokens, the same 1 bit per value) add
    nothing per token."""
    base = d // 8 + d // 4 + d // 4 + 2 * (d // 32) * 4
    if method in ("llama", "oracle_topk"):
        return 4 * d  # fp16 k and v
    if method.startswith("emul2_") and "outlier" in method:
        return base + kept.get(method, 0.0) * (4 * d + 4)
    return base


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluator.add_common_args(ap, jobs=1)
    ap.add_argument("--budget", default="1/16")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of emul2_* methods")
    ap.add_argument("--no-library", action="store_true", help="no sikv_oracle_2+1 (harness built without the library)")
    ap.add_argument("--one-job", action="store_true", help="every variant in one evaluator job (one prefill)")
    ap.add_argument("--job-name", default="variants", help="with --one-job: the variants job's file names in DIR")
    ap.add_argument("--skip-existing", action="store_true", help="skip jobs whose every method is in DIR already")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--csv", help="write the summary rows here (results.csv's columns, then the comparisons)")
    ap.add_argument("--nll", help="write every token's NLL here (gzip when it ends in .gz)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if not v.startswith("emul2_")]
    if bad:
        ap.error(f"not emulation methods: {bad}")
    b = args.budget
    jobs = {"reference": ["llama", f"oracle_topk@{b}", f"emul2_uniform@{b}"]}
    if not args.no_library:
        jobs["library"] = [f"sikv_oracle_2+1@{b}"]
    if args.one_job:
        jobs[args.job_name] = [f"{v}@{b}" for v in variants]
    else:
        jobs.update({v: [f"{v}@{b}"] for v in variants})

    def done():
        """Methods with a result row in any job's CSV in DIR."""
        have = set()
        for f in os.listdir(args.out):
            if f.endswith(".csv") and not f.endswith(".nll.csv"):
                with open(os.path.join(args.out, f), newline="") as fh:
                    have.update(r["method"] for r in csv.DictReader(fh))
        return have

    if args.skip_existing:
        have = done()
        for name in list(jobs):
            if all(c.split("@")[0] in have for c in jobs[name]):
                print(f"{name}: in {args.out} already", flush=True)
                del jobs[name]

    def run(item):
        name, configs = item
        return name, evaluator.run_evaluator(args, os.path.join(args.out, name), ",".join(configs))

    if not args.summary_only:
        evaluator.run_jobs(args.jobs, run, jobs.items())

    nll, rows_csv, kept = {}, {}, {}
    for name in sorted({f[: -len(".log")] for f in os.listdir(args.out) if f.endswith(".log")}):
        base = os.path.join(args.out, name)
        if os.path.exists(base + ".nll.csv"):
            for (ctx, method, budget), toks in report.read_nll([base + ".nll.csv"]).items():
                nll[method] = toks
        if os.path.exists(base + ".csv"):
            with open(base + ".csv", newline="") as f:
                for r in csv.DictReader(f):
                    rows_csv[r["method"]] = r
        if os.path.exists(base + ".log"):
            with open(base + ".log") as f:
                for line in f:
                    m = KEEP_LINE.search(line)
                    if m:  # share of layer 0's token-heads kept in fp16 (prompt + decode)
                        total = args.context * args.kv_heads + int(m.group(4))
                        kept[m.group(1)] = (int(m.group(2)) + int(m.group(3))) / total
    if "llama" not in nll or "emul2_uniform" not in nll:
        print("the reference job is missing", file=sys.stderr)
        return 1
    dense, uni = nll["llama"], nll["emul2_uniform"]
    first = ["llama", "oracle_topk", "sikv_oracle_2+1", "emul2_uniform", *VARIANTS]
    order = [m for m in first if m in nll] + sorted(m for m in nll if m not in first)
    d = args.head_dim
    print(f"\ncontext {args.context}, budget {b}, {len(dense)} scored tokens; bytes per token and KV head at d = {d}\n")
    # the storage loss: emul2_uniform's mean NLL above the exact top-k's (no storage loss), on the same tokens
    exact = nll.get("oracle_topk")
    loss = sum(uni[t] - exact[t] for t in uni) / len(uni) if exact and set(exact) == set(uni) else None
    print("| method | perplexity | vs dense [95 % CI] | vs emul2_uniform [95 % CI] | storage loss removed | bytes/token | kept in fp16 |")
    print("|---|---|---|---|---|---|---|")
    out_rows, out_nll = [], {}
    for m in order:
        toks = nll.get(m)
        if toks is None or set(toks) != set(dense):
            print(f"| {m} | — | — | — | — | — | — |")
            continue
        out_nll[m] = toks
        ppl = math.exp(sum(toks.values()) / len(toks))
        vd = evaluator.paired(toks, dense) if m != "llama" else None
        vu = evaluator.paired(toks, uni) if m not in ("llama", "emul2_uniform") else None
        nb = bytes_per_token(m, d, kept)
        share = f"{100 * kept[m]:.2f} %" if m in kept else ""
        removed = (sum(uni[t] - toks[t] for t in uni) / len(uni) / loss) if loss and m.startswith("emul2_") and m != "emul2_uniform" else None
        rem = f"{100 * removed:.0f} %" if removed is not None else ""
        print(f"| `{m}` | {ppl:.6f} | {evaluator.fmt(vd)} | {evaluator.fmt(vu)} | {rem} | {nb:.1f} | {share} |")
        r = rows_csv.get(m, {})
        pct = lambda v, i: f"{100 * v[i]:.4f}" if v else ""  # noqa: E731
        out_rows.append([m, r.get("profile", ""), r.get("budget", b if m != "llama" else "full"), args.context,
                         args.decode, f"{ppl:.6f}", f"{math.exp(sum(dense.values()) / len(dense)):.6f}",
                         r.get("recall", ""), pct(vd, 0) if vd else "0.0000", pct(vd, 1) if vd else "0.0000",
                         pct(vd, 2) if vd else "0.0000", r.get("attended_tokens", ""), r.get("attn_rel_err", ""),
                         r.get("attn_max_rel_err", ""), len(toks), r.get("decode_ms_per_token", ""),
                         pct(vu, 0), pct(vu, 1), pct(vu, 2), f"{100 * removed:.1f}" if removed is not None else "",
                         f"{nb:.2f}", f"{kept[m]:.5f}" if m in kept else ""])
    if "sikv_oracle_2+1" in nll and set(nll["sikv_oracle_2+1"]) == set(uni):
        lib = nll["sikv_oracle_2+1"]
        diff = max(abs(uni[t] - lib[t]) for t in uni)
        ppl_l = math.exp(sum(lib.values()) / len(lib))
        ppl_u = math.exp(sum(uni.values()) / len(uni))
        print(f"\nemul2_uniform against the library's sikv_oracle_2+1: {ppl_u:.6f} vs {ppl_l:.6f} "
              f"({100 * (ppl_u / ppl_l - 1):+.4f} %), largest per-token NLL difference {diff:.2e}")
    if args.csv:
        cols = ["method", "profile", "budget", "context", "decode_tokens", "perplexity", "dense_perplexity", "recall",
                "delta_pct", "ci_low_pct", "ci_high_pct", "attended_tokens", "attn_rel_err", "attn_max_rel_err",
                "scored_tokens", "decode_ms_per_token", "vs_uniform_pct", "vs_uniform_ci_low_pct",
                "vs_uniform_ci_high_pct", "storage_loss_removed_pct", "bytes_per_token_kv_head", "kept_share"]
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(out_rows)
    if args.nll:
        opener = gzip.open if args.nll.endswith(".gz") else open
        with opener(args.nll, "wt", newline="") as f:
            w = csv.writer(f)
            for m, toks in out_nll.items():
                budget = "full" if m == "llama" else b
                for (start, step), v in sorted(toks.items()):
                    w.writerow([m, budget, args.context, start, step, f"{v:.9f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
