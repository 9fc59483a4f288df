#!/usr/bin/env python3
"""The whole quality study: every context, method and budget, run as parallel evaluator jobs.

usage: scripts/quality/study.py --bin llama_cpp_eval --model M.gguf --text T.txt --out DIR
                                [--contexts 2048,4096,7680] [--decode 512] [--budgets 1/32,1/16,1/8]
                                [--methods LIST] [--jobs N] [--threads T] [--part I/N] [--dry-run]
                                [-- EVAL_ARGS...]

Each job is one evaluator process over one context: it prefills once and decodes its share of the
(method, budget) configurations, so the configurations of a context are split into jobs of about equal
estimated cost (longest first). `llama` (the dense reference) runs in every context. `--part I/N` runs
only the I-th of N equal slices of the job list (to spread the study over several calls or machines);
the slices together are the whole study. Every job writes DIR/<job>.csv, .layers.csv, .nll.csv and .log;
`report.py DIR` turns them into tables, the results CSV and the plot. Jobs whose CSV already holds a row
for every configuration are skipped, so an interrupted study resumes.
"""
import argparse
import csv
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BASELINES = ["oracle_topk", "quest", "sink_window"]
LIBRARY = ["sikv_2+1", "sikv_4+1", "sikv_16+1", "sikv_1stage_16+1", "sikv_signsign", "sikv_oracle_2+1",
           "sikv_oracle_4+1"]
UNBUDGETED = {"llama", "dense", "sikv_parity"}


def cost(method, context):
    """Rough seconds per decode token with 2 threads: llama.cpp's own step plus the method's work."""
    scale = context / 8192
    base = 0.05 + 0.3 * scale
    extra = {"llama": 0.1, "dense": 0.1, "oracle_topk": 0.05, "quest": 0.08, "sink_window": 0.0,
             "sikv_parity": 0.3, "sikv_16+1": 0.25, "sikv_1stage_16+1": 0.15, "sikv_signsign": 0.15,
             "sikv_oracle_2+1": 0.35, "sikv_oracle_4+1": 0.35}.get(method, 0.45)
    return base + extra * scale


def plan(args):
    methods = args.methods.split(",") if args.methods else ["llama"] + BASELINES + LIBRARY + ["sikv_parity"]
    budgets = args.budgets.split(",")
    jobs = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        units = []
        for m in methods:
            for b in ([""] if m in UNBUDGETED else budgets):
                units.append((cost(m, ctx), m, b))
        units.sort(key=lambda u: (-u[0], u[1], u[2]))
        total = sum(u[0] for u in units)
        n = max(1, min(len(units), round(total * args.decode / args.job_seconds)))
        bins = [[0.0, []] for _ in range(n)]
        for u in units:
            tgt = min(bins, key=lambda x: x[0])
            tgt[0] += u[0]
            tgt[1].append(u)
        for i, (_, us) in enumerate(bins):
            # llama first: the job's rows then carry the dense perplexity as soon as they are written
            us.sort(key=lambda u: u[1] != "llama")
            pairs = [m if not b else f"{m}@{b}" for _, m, b in us]
            jobs.append((f"p{ctx}_j{i:02d}", ctx, pairs, sum(u[0] for u in us) * args.decode))
    return jobs


def done(path, pairs):
    if not os.path.exists(path):
        return False
    have = {(r["method"], r["budget"]) for r in csv.DictReader(open(path))}
    want = set()
    for p in pairs:
        m, _, b = p.partition("@")
        want.add((m, b or ("full" if m in ("llama", "dense") else "k=100")))
    return want <= have


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="2048,4096,7680")
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--budgets", default="1/32,1/16,1/8")
    ap.add_argument("--methods", default="")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--job-seconds", type=float, default=900.0, help="target estimated seconds per job")
    ap.add_argument("--part", default="1/1")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    jobs = plan(args)
    i, n = (int(x) for x in args.part.split("/"))
    jobs = [j for k, j in enumerate(jobs) if k % n == i - 1]
    for name, ctx, pairs, est in jobs:
        print(f"{name}: context {ctx}, ~{est / 60:.0f} min at 2 threads: {','.join(pairs)}", flush=True)
    if args.dry_run:
        return 0

    env = dict(os.environ, OMP_WAIT_POLICY="passive")

    def run(job):
        name, ctx, pairs, _ = job
        base = os.path.join(args.out, name)
        if done(base + ".csv", pairs):
            return name, 0, 0.0
        for suffix in (".csv", ".layers.csv", ".nll.csv"):
            if os.path.exists(base + suffix):
                os.remove(base + suffix)
        cmd = [args.bin, "--model", args.model, "--text", args.text, "--context", str(ctx), "--decode",
               str(args.decode), "--threads", str(args.threads), "--configs", ",".join(pairs), "--csv",
               base + ".csv", "--layer-csv", base + ".layers.csv", "--nll-file", base + ".nll.csv"] + extra
        t0 = time.time()
        with open(base + ".log", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return name, rc, time.time() - t0

    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, rc, dt in pool.map(run, jobs):
            print(f"{name}: {'ok' if rc == 0 else f'exit {rc}'} in {dt:.0f} s", flush=True)
            failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
