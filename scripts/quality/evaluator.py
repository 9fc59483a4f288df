"""What the quality sweeps share: the evaluator's common options, one evaluator process per job
(its command logged beside its outputs), the jobs run side by side, and the paired comparison of
two methods on the same tokens."""
import csv
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import report


def add_common_args(ap, jobs):
    """The options every sweep takes: the evaluator binary and its inputs, the output directory,
    the context and decode lengths, how many evaluators run at once and their threads."""
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=jobs)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true")


def run_evaluator(args, base, configs, extra=()):
    """One evaluator process: `configs` (its --configs list) with `extra` options, results to
    base.csv and base.nll.csv (stale ones removed first), its output and command to base.log.
    Returns the exit status."""
    cmd = [args.bin, "--model", args.model, "--text", args.text, "--context", str(args.context), "--decode",
           str(args.decode), "--threads", str(args.threads), "--recall-every", "8", *extra, "--configs", configs,
           "--csv", base + ".csv", "--nll-file", base + ".nll.csv"]
    for suffix in (".csv", ".nll.csv"):
        if os.path.exists(base + suffix):
            os.remove(base + suffix)
    with open(base + ".log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_WAIT_POLICY="passive"))


def run_jobs(jobs, run, items):
    """run(item) -> (name, exit status) for every item, `jobs` at a time; a line per job as it ends."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, rc in pool.map(run, items):
            print(f"{name}: {'ok' if rc == 0 else f'exit {rc}'}", flush=True)


def paired(toks, ref):
    """(delta, lo, hi): exp(mean NLL difference) - 1 on the same tokens and its block-bootstrap
    interval (report.py), or None when `ref` is missing or scored other tokens."""
    if ref is None or set(toks) != set(ref):
        return None
    diffs = {t: toks[t] - ref[t] for t in toks}
    delta = math.expm1(sum(diffs.values()) / len(diffs))
    lo, hi = report.block_bootstrap(diffs)
    return delta, lo, hi


def fmt(v, ci=True):
    """A paired change (d, lo, hi) as a percentage with its interval; a dash for none."""
    if v is None:
        return "—"
    d, lo, hi = v
    return f"{100 * d:+.2f} %" + (f" [{100 * lo:+.2f}, {100 * hi:+.2f}]" if ci else "")


def write_outputs(args, cols, rows, nll):
    """--csv: the summary rows under `cols`; --nll: every token's NLL, one line per token with the
    run's key (its last field the method), budget ("full" for llama), context, window start, step."""
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)
    if args.nll:
        with open(args.nll, "w", newline="") as f:
            w = csv.writer(f)
            for key, toks in sorted(nll.items()):
                budget = args.budget if key[-1] != "llama" else "full"
                for (start, step), v in sorted(toks.items()):
                    w.writerow([*key, budget, args.context, start, step, f"{v:.9f}"])
