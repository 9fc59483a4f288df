#!/usr/bin/env bash
# Real-model smoke test: builds everything run.sh builds (downloads on first use), decodes 64 tokens after a
# 1K prefill and checks that
#   - with a budget covering the whole context, libselfindexkv (16+1: fp16 keys and values) attends every
#     token and reproduces llama.cpp's attention to fp16 rounding and its perplexity within 0.5 %,
#   - the exact top-k baseline at that budget reproduces llama.cpp's attention to float rounding,
#   - at a 1/16 budget the library attends about 1/16 of the context and its perplexity stays finite.
# usage: scripts/quality/smoke.sh   (EVAL_DIR as for run.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EVAL_DIR="${EVAL_DIR:-$ROOT/.eval}"
CSV="$EVAL_DIR/results/smoke.csv"
mkdir -p "$EVAL_DIR/results"
rm -f "$CSV"
P=1024
# SIKV_LIB: a prebuilt libselfindexkv.a (the test passes the one it was built with); else run.sh builds it
LIB_ARGS=()
[[ -n "${SIKV_LIB:-}" ]] && LIB_ARGS=(--sikv-include "$ROOT/include" --sikv-lib "$SIKV_LIB")
bash "$ROOT/scripts/quality/run.sh" --context $P --decode 64 --csv "$CSV" "${LIB_ARGS[@]}" -- \
  --configs "llama,oracle_topk@$P,sikv_16+1@$P,sikv_2+1@1/16" --recall-every 16
python3 - "$CSV" $P <<'EOF'
import csv, sys
rows = {r["method"] + "@" + r["budget"]: r for r in csv.DictReader(open(sys.argv[1]))}
P = int(sys.argv[2])
fails = []
def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        fails.append(what)
dense = float(rows["llama@full"]["perplexity"])
full_oracle, full_lib, sparse = rows[f"oracle_topk@{P}"], rows[f"sikv_16+1@{P}"], rows["sikv_2+1@1/16"]
rel = lambda r: abs(float(r["perplexity"]) / dense - 1)
check(rel(full_oracle) < 1e-4, f"exact top-k, whole context: perplexity {full_oracle['perplexity']} vs dense {dense}")
check(float(full_oracle["attn_rel_err"]) < 1e-5, f"exact top-k, whole context: attention rel. error {full_oracle['attn_rel_err']} < 1e-5")
check(rel(full_lib) < 5e-3, f"library 16+1, whole context: perplexity {full_lib['perplexity']} within 0.5% of {dense}")
check(float(full_lib["attn_rel_err"]) < 5e-3, f"library 16+1, whole context: attention rel. error {full_lib['attn_rel_err']} < 5e-3")
# attended is sampled on the recall steps (0, 16, 32, 48): every token then is P + step + 1, mean P + 25
check(float(full_lib["attended_tokens"]) >= P + 25 - 0.5,
      f"library 16+1, whole context: attends every token ({full_lib['attended_tokens']} on average over the sampled steps)")
att = float(sparse["attended_tokens"])
check(att <= 4 + 64 + P / 16 + 0.5, f"library 2+1 at 1/16: attends {att} tokens per KV head and step")
check(float(sparse["perplexity"]) < 2 * dense, f"library 2+1 at 1/16: perplexity {sparse['perplexity']} (dense {dense})")
sys.exit(1 if fails else 0)
EOF
