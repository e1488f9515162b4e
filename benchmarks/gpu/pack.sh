#!/usr/bin/env bash
# Pack what a benchmark session on an offline GPU host needs into parts that each fit one transfer (≤ 60 MiB with
# the wheels beside them): the teacher GGUF in three pieces, the evaluation text, the training tokens.
#
#   [TRITON_CACHE=triton.tar.xz] benchmarks/gpu/pack.sh GGUF CORPUS [OUT]    (OUT default .carry; from the repo root)
#
# CORPUS: a `hybridize corpus` folder (benchmarks/build_corpus.sh). The training split is tokenized here once with
# the GGUF's tokenizer (uint16 when the vocabulary allows) so the GPU host reads token ids, not 62 MB of text. Then,
# on the GPU host, in this order (the wheels from ../shared/gpu/fetch_wheels.sh):
#   part 1  carry .whl2 OUT/c1   bash benchmarks/gpu/unpack.sh 1
#   part 2  carry .whl  OUT/c2   bash benchmarks/gpu/unpack.sh 2
#   part 3  carry OUT/c3         bash benchmarks/gpu/unpack.sh 3
#   jobs    carry OUT/c4         bash benchmarks/gpu/queue.sh SECONDS     (repeat: it resumes)
set -euo pipefail
gguf=${1:?usage: pack.sh GGUF CORPUS [OUT]} corpus=${2:?usage: pack.sh GGUF CORPUS [OUT]} out=${3:-.carry}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"/c1 "$out"/c2 "$out"/c3 "$out"/c4
dd if="$gguf" of="$out/c1/gguf.aa" bs=1M count=32 status=none
dd if="$gguf" of="$out/c2/gguf.ab" bs=1M skip=32 count=8 status=none
dd if="$gguf" of="$out/c3/gguf.ac" bs=1M skip=40 status=none
cat "$out"/c1/gguf.aa "$out"/c2/gguf.ab "$out"/c3/gguf.ac | cmp -s - "$gguf" || { echo "pack: split check failed" >&2; exit 1; }
for split in val holdout; do xz -T2 -c "$corpus/$split.jsonl" > "$out/c3/$split.jsonl.xz"; done
"$py" -m pip download -q gguf --no-deps -d "$out/c3"
# code.jsonl: the project's own sources, text no training source has (speculative decoding on code)
"$py" - "$out/c3/code.jsonl" <<'PY'
import json, pathlib, sys
with open(sys.argv[1], "w") as f:
    for p in sorted(pathlib.Path("src/hybridize").rglob("*.py")):
        text = p.read_text()
        if len(text) > 2000:
            f.write(json.dumps({"text": text}) + "\n")
PY
"$py" - "$gguf" "$corpus/train.jsonl" "$out/c4/train_tokens.npy" <<'PY'
import sys
import numpy as np
from hybridize.train.data import first_windows
ids = first_windows(sys.argv[1], [sys.argv[2]], 10**12, 1).flatten().numpy()
np.save(sys.argv[3], ids.astype(np.uint16 if ids.max() < 2**16 else np.uint32))
print(f"pack: {len(ids):,} training tokens")
PY
xz -T2 -f "$out/c4/train_tokens.npy"
# a previous session's Triton cache (queue.sh's $OUT/triton.tar.xz), when TRITON_CACHE=that file: no re-tuning
if [ -n "${TRITON_CACHE:-}" ]; then cp "$TRITON_CACHE" "$out/c4/triton.tar.xz"; fi
du -sh "$out"/c*
