#!/usr/bin/env bash
# The real distillation run of docs/BENCHMARKS.md: SmolLM2-135M-Instruct (GGUF) → 3:1 hybrid → KD on real text.
#
#   benchmarks/distill_smollm2.sh GGUF TRAIN.jsonl VAL.jsonl RUNS [STAGE ...]
#
# Stages (default: all, in order; each one skips work already done, so the script can be re-run after a timeout):
#   prep    convert the GGUF into RUNS/student (3:1, bfloat16); eval the fresh student vs the teacher → eval_before.json
#   one     distill on 1 GPU for TOKENS (default 20M) tokens → RUNS/one (resumes a stopped run)
#   two     the same command on 2 GPUs of this host (torchrun), first STEPS2 (default 50) steps → RUNS/two
#   after   eval RUNS/one/final vs the teacher → eval_after.json; loss curves → RUNS/one/curves.png
#   report  benchmarks/distill_report.py: perplexity ratios, KL, agreement, tok/s, MFU, 1- vs 2-GPU losses
# GGUF: ../shared/models/fetch_smollm2.sh; TRAIN/VAL: ../shared/data/build_corpus.sh. Smaller smoke runs: set SEQ,
# BATCH, TOKENS, STEPS2, EVAL_TOKENS (defaults 2048, 16, 20M, 50, 262144); ACCUM the 1-GPU micro-steps (default 1);
# LIMIT caps the 1-GPU stage in seconds.
set -euo pipefail
gguf=$1 train=$2 val=$3 runs=$4
shift 4
stages=${*:-prep one two after report}
tokens=${TOKENS:-20M} steps2=${STEPS2:-50} seq=${SEQ:-2048} batch=${BATCH:-16} eval_tokens=${EVAL_TOKENS:-262144}
accum=${ACCUM:-1}  # micro-steps on 1 GPU: 1 is 1.9x faster than 2 on an H200 (docs/BENCHMARKS.md); the 2026-11-27 run used 2
py=${PYTHON:-python3}
hz() { "$py" -m hybridize "$@"; }
common=(--teacher "$gguf" --student "$runs/student" --data "$train" --seq-len "$seq" --batch-size "$batch"
        --tokens "$tokens" --lr 5e-4 --min-lr 5e-5 --warmup 50 --save-every 100 --eval-data "$val" --eval-every 100
        --eval-tokens $((eval_tokens / 2)) --no-progress)
evalargs=(--teacher "$gguf" --data "$val" --seq-len "$seq" --max-tokens "$eval_tokens" --batch-size 8 --no-progress)
mkdir -p "$runs"
for stage in $stages; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    prep)
      [ -d "$runs/student" ] || hz convert "$gguf" "$runs/student" --dtype bfloat16 > "$runs/convert.json"
      [ -s "$runs/eval_before.json" ] || hz eval "$runs/student" "${evalargs[@]}" > "$runs/eval_before.json"
      cat "$runs/eval_before.json" ;;
    one)
      if [ ! -d "$runs/one/final" ]; then
        resume=(); [ -d "$runs/one/checkpoints" ] && resume=(--resume)
        # LIMIT seconds (0 = none): SIGTERM makes the run checkpoint and stop; re-running this stage resumes it
        CUDA_VISIBLE_DEVICES=0 timeout -s TERM "${LIMIT:-0}" "$py" -m hybridize distill "${common[@]}" --grad-accum "$accum" \
          --out "$runs/one" "${resume[@]}" > "$runs/one.json" || { rc=$?; [ $rc -eq 124 ] || exit $rc
          echo "LIMIT reached: checkpointed; run this stage again to resume"; }
      fi
      tail -n 1 "$runs/one/metrics.jsonl" ;;
    two)
      if [ "$(wc -l < "$runs/two/metrics.jsonl" 2>/dev/null || echo 0)" -lt "$steps2" ]; then
        rm -rf "$runs/two"
        "$py" -m torch.distributed.run --nproc-per-node 2 -m hybridize distill "${common[@]}" --grad-accum 1 \
          --stop-at "$steps2" --out "$runs/two" > "$runs/two.json"
      fi
      tail -n 1 "$runs/two/metrics.jsonl" ;;
    after)
      [ -s "$runs/eval_after.json" ] || hz eval "$runs/one/final" "${evalargs[@]}" > "$runs/eval_after.json"
      cat "$runs/eval_after.json"
      hz plot "$runs/one" || echo "(no matplotlib here: run hybridize plot $runs/one elsewhere)" ;;
    report)
      "$py" "$(dirname "$0")/distill_report.py" --runs "$runs" --teacher "$gguf" --seq-len "$seq" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
