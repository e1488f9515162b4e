#!/usr/bin/env bash
# The "Calibrated init (SmolLM2-135M, CPU)" table of docs/BENCHMARKS.md: a fresh 3:1 hybrid of SmolLM2-135M-Instruct,
# uncalibrated and calibrated (`convert --calibrate`), each scored against the teacher on two held-out splits.
#
#   benchmarks/calibrate_smollm2.sh GGUF TRAIN.jsonl VAL.jsonl HOLDOUT.jsonl RUNS
#
# GGUF: ../shared/models/fetch_smollm2.sh; the splits: `hybridize corpus` (train / val / holdout). Knobs (env):
# EVAL_TOKENS (default 32768), CALIBRATE (extra convert flags, e.g. "--calibrate-steps 0"), PYTHON.
set -euo pipefail
gguf=$1 train=$2 val=$3 holdout=$4 runs=$5
eval_tokens=${EVAL_TOKENS:-32768}
py=${PYTHON:-python3}
hz() { "$py" -m hybridize "$@"; }
mkdir -p "$runs"
[ -d "$runs/plain" ] || hz convert "$gguf" "$runs/plain" > "$runs/plain.json"
if ! [ -d "$runs/calibrated" ]; then
  # shellcheck disable=SC2086  # CALIBRATE is a list of flags
  /usr/bin/time -v "$py" -m hybridize convert "$gguf" "$runs/calibrated" --calibrate "$train" ${CALIBRATE:-} \
    > "$runs/calibrated.json" 2> "$runs/calibrated.time"
fi
for model in plain calibrated; do
  for split in val holdout; do
    data=$([ "$split" = val ] && echo "$val" || echo "$holdout")
    out="$runs/eval_${model}_${split}.json"
    [ -s "$out" ] || hz eval "$runs/$model" --teacher "$gguf" --data "$data" --max-tokens "$eval_tokens" \
      --no-progress > "$out"
  done
done
"$py" - "$runs" <<'PY'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
cal = json.loads((runs / "calibrated.json").read_text())["calibration"]
print(f"calibration: {cal['seconds']} s on {cal['device']}, {cal['windows']} x {cal['seq_len']} tokens, "
      f"mean per-layer relative error {cal['mean_rel_err']}")
print("| model | split | perplexity | teacher | ratio | KL |")
print("|---|---|---:|---:|---:|---:|")
for model in ("plain", "calibrated"):
    for split in ("val", "holdout"):
        r = json.loads((runs / f"eval_{model}_{split}.json").read_text())
        ppl, teacher = r["perplexity"], r["teacher_perplexity"]
        print(f"| {model} | {split} | {ppl:,.2f} | {teacher:.2f} | {ppl / teacher:,.1f}x | {r.get('kl', float('nan')):.3f} |")
PY
