#!/usr/bin/env python3
"""Long-context retrieval (passkey): runs the harness's passkey mode over models and contexts, then tables.

usage: scripts/quality/passkey.py --bin llama_cpp_eval --models-dir DIR --out OUT
                                  [--runs smollm2:4096,gemma3:32768:1,...] [--depths 0.1,0.3,0.5,0.7,0.9]
                                  [--keys 2] [--seed 1] [--configs LIST] [--jobs N] [--threads T] [--parts N]
                                  [--csv FILE] [--markdown FILE] [--rows FILE] [--report-only] [-- EVAL_ARGS...]

Each run (model:context, or model:context:keys[:seed] to override --keys and --seed) is split into
--parts jobs by prompt (prompt i goes to part i mod N); a job is one evaluator process: for each of its
prompts one dense prefill, then every method decodes the last prompt token and the answer
(llama_cpp_eval --passkey-depths). Jobs write OUT/<model>_<context>_<i>of<N>.rows.csv (one row per prompt
and method; <model>_<context>_s<seed>_... for a seed other than 1), .csv (per method) and .log; a job whose
.csv exists is skipped, so an interrupted run resumes. The tables come from the .rows.csv files of OUT:
accuracy (exact match of the answer's first digit run with the key) per method, budget, model and context,
counting only prompts that every method of the job finished.
"""
import argparse
import csv
import glob
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

MODELS = {"smollm2": "SmolLM2-135M-Instruct.f32.gguf", "gemma3": "gemma-3-270m.f32.gguf"}
MODEL_LABEL = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma 3 270M"}
# Gemma runs with llama.cpp's flash attention: without it the prefill computes the whole score matrix of
# every sliding-window layer (15 of 18) and masks it afterwards; flash attention skips the masked blocks.
MODEL_ARGS = {"gemma3": ["--flash-attn"]}
# Above 16K the prefill goes in ubatches of 8192 tokens: llama.cpp reserves logits for every token of a
# ubatch (32K x Gemma's 262K vocabulary: 34 GB).
CHUNK_ABOVE, CHUNK = 16384, 8192
DEFAULT_CONFIGS = ("llama,dense," + ",".join(
    f"{m}@{b}" for m in ["sikv_2+1", "sikv_4+1", "sikv_16+1", "oracle_topk", "quest", "sink_window"]
    for b in ["1/32", "1/16"]))
METHOD_ORDER = ["llama", "dense", "sikv_2+1", "sikv_4+1", "sikv_16+1", "oracle_topk", "quest", "sink_window"]
JOB_RE = re.compile(r"^(?P<model>[a-z0-9]+)_(?P<ctx>\d+)_(?:s\d+_)?(?P<i>\d+)of(?P<n>\d+)\.rows\.csv$")


def jobs_of(args):
    jobs = []
    for run in args.runs.split(","):
        model, ctx, *more = run.split(":")
        keys = int(more[0]) if more else args.keys
        seed = int(more[1]) if len(more) > 1 else args.seed
        for i in range(1, args.parts + 1):
            jobs.append((model, int(ctx), keys, seed, i, args.parts))
    return jobs  # in the order of --runs: the first runs finish first


def run_job(args, extra, job):
    model, ctx, keys, seed, i, n = job
    tag = "" if seed == 1 else f"s{seed}_"  # another seed: other keys, other files
    base = os.path.join(args.out, f"{model}_{ctx}_{tag}{i}of{n}")
    if os.path.exists(base + ".csv") and os.path.getsize(base + ".csv") > 0:
        return base, 0, 0.0
    for suffix in (".csv", ".rows.csv"):
        if os.path.exists(base + suffix):
            os.remove(base + suffix)
    cmd = [args.bin, "--model", os.path.join(args.models_dir, MODELS[model]), "--context", str(ctx),
           "--passkey-depths", args.depths, "--passkey-keys", str(keys), "--passkey-seed", str(seed),
           "--passkey-part", f"{i}/{n}", "--configs", args.configs, "--threads", str(args.threads), "--no-recall",
           "--passkey-csv", base + ".rows.csv", "--csv", base + ".csv"] + MODEL_ARGS.get(model, []) + \
        (["--prefill-chunk", str(CHUNK)] if ctx > CHUNK_ABOVE else []) + extra
    t0 = time.time()
    with open(base + ".log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_WAIT_POLICY="passive"))
    return base, rc, time.time() - t0


def collect(out):
    """(model, context, method, budget) -> the rows of every prompt of OUT's job files that every method of
    its job has finished (an interrupted job leaves its last prompt incomplete: left out)."""
    cells = defaultdict(lambda: {"rows": []})
    for path in sorted(glob.glob(os.path.join(out, "*.rows.csv"))):
        m = JOB_RE.match(os.path.basename(path))
        if not m:
            continue
        rows = list(csv.DictReader(open(path)))
        methods = {(r["method"], r["budget"]) for r in rows}
        done = defaultdict(set)
        for r in rows:
            done[r["prompt"]].add((r["method"], r["budget"]))
        for r in rows:
            if done[r["prompt"]] != methods:
                continue
            key = (m["model"], int(r["context"]), r["method"], r["budget"])
            cells[key]["profile"] = r["profile"]
            cells[key]["rows"].append(r)
    return cells


def method_key(method, budget):
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    b = {"full": 0, "1/16": 1, "1/32": 2}.get(budget, 3)
    return (order, method, b)


def summarise(cells):
    rows = []
    for (model, ctx, method, budget), c in cells.items():
        rs = c["rows"]
        dense = cells.get((model, ctx, "llama", "full"), {"rows": []})["rows"]
        f = lambda col: [float(r[col]) for r in rs if r[col] not in ("", "nan")]
        rel = f("attn_rel_err")
        rows.append({
            "method": method, "profile": c["profile"], "budget": budget, "context": ctx, "model": MODEL_LABEL.get(model, model),
            "prompts": len(rs), "correct": sum(int(r["correct"]) for r in rs),
            "accuracy": sum(int(r["correct"]) for r in rs) / len(rs),
            "digit_accuracy": sum(f("digit_accuracy")) / len(rs),
            "dense_accuracy": (sum(int(r["correct"]) for r in dense) / len(dense)) if dense else "",
            "prompt_tokens": sum(f("prompt_tokens")) / len(rs),
            "attn_rel_err": (sum(rel) / len(rel)) if rel else "",
            "decode_ms_per_token": sum(f("decode_ms_per_token")) / len(rs),
            "prefill_s": sum(f("prefill_s")) / len(rs),
            "_model": model,
        })
    rows.sort(key=lambda r: (list(MODELS).index(r["_model"]) if r["_model"] in MODELS else 9, r["context"],
                             method_key(r["method"], r["budget"])))
    return rows


def markdown(rows):
    cols = sorted({(r["_model"], r["context"]) for r in rows},
                  key=lambda c: (list(MODELS).index(c[0]) if c[0] in MODELS else 9, c[1]))
    by = {(r["_model"], r["context"], r["method"], r["budget"]): r for r in rows}
    methods = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda mb: method_key(*mb))
    head = "| method | budget | " + " | ".join(f"{MODEL_LABEL.get(m, m)} {c}" for m, c in cols) + " |"
    lines = [head, "|---|---|" + "---|" * len(cols)]
    for m, b in methods:
        cells = []
        for mc in cols:
            r = by.get((mc[0], mc[1], m, b))
            cells.append(f"{r['correct']}/{r['prompts']} ({r['digit_accuracy']:.2f})" if r else "")
        lines.append(f"| `{m}` | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows, path):
    fields = ["method", "profile", "budget", "context", "model", "prompts", "correct", "accuracy", "digit_accuracy",
              "dense_accuracy", "prompt_tokens", "attn_rel_err", "decode_ms_per_token", "prefill_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            out = []
            for k in fields:
                v = r[k]
                if isinstance(v, float):
                    v = f"{v:.3e}" if k == "attn_rel_err" else f"{v:.4f}" if k.endswith("accuracy") else f"{v:.2f}"
                out.append(v)
            w.writerow(out)


def write_rows(cells, path):
    import gzip
    out = [(k[0], r) for k, c in cells.items() for r in c["rows"]]
    out.sort(key=lambda x: (x[0], int(x[1]["context"]), int(x[1]["prompt"]), method_key(x[1]["method"], x[1]["budget"])))
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        fields = list(out[0][1].keys())
        w.writerow(["model"] + fields)
        for model, r in out:
            w.writerow([MODEL_LABEL.get(model, model)] + [r[k] for k in fields])


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin")
    ap.add_argument("--models-dir")
    ap.add_argument("--out", required=True)
    # the committed table's runs: 10 prompts (2 keys x 5 depths), 5 for SmolLM2 at 8K and Gemma at 32K
    ap.add_argument("--runs", default="smollm2:4096,gemma3:4096,smollm2:8192:1,gemma3:8192,gemma3:16384,gemma3:32768:1")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--keys", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", type=int, default=5, help="jobs per run (prompts split by index)")
    ap.add_argument("--csv", help="write the per-method table here (e.g. docs/quality/passkey.csv)")
    ap.add_argument("--markdown", help="write the markdown table here")
    ap.add_argument("--rows", help="write every prompt's row of every job (complete prompts), a model column first; "
                                   ".gz: gzipped (e.g. docs/quality/passkey_rows.csv.gz)")
    ap.add_argument("--report-only", action="store_true", help="only tabulate what OUT holds")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    failed = 0
    if not args.report_only:
        if not args.bin or not args.models_dir:
            ap.error("--bin and --models-dir are needed to run")
        jobs = jobs_of(args)
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for base, rc, dt in pool.map(lambda j: run_job(args, extra, j), jobs):
                print(f"{os.path.basename(base)}: {'ok' if rc == 0 else f'exit {rc}'} in {dt:.0f} s", flush=True)
                failed += rc != 0
        print(f"all jobs: {time.time() - t0:.0f} s", flush=True)

    rows = summarise(collect(args.out))
    if not rows:
        print("no results in", args.out)
        return 1
    table = markdown(rows)
    print(table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.markdown:
        open(args.markdown, "w").write(table)
    if args.rows:
        write_rows(collect(args.out), args.rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
