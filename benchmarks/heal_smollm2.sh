#!/usr/bin/env bash
# The tokens-versus-quality matrix of issue 8 on SmolLM2-135M-Instruct (GGUF): one `hybridize heal` run per
# {zero init, calibrated} x {uniform 3:1, selected attention layers} x seed, then one table.
#
#   benchmarks/heal_smollm2.sh GGUF CORPUS RUNS [VARIANT ...]
#
# CORPUS: a `hybridize corpus` folder (benchmarks/build_corpus.sh): train.jsonl for training and calibration,
# val.jsonl and holdout.jsonl (a whole source never trained on) for evaluation. VARIANT: init-layers-seed, e.g.
# zero-uniform-0 calibrated-selected-1, layers one of uniform (the 3:1 pattern), selected (LAYERS, else kl), or
# kl / passkey / kl+passkey / proxy (`hybridize select-layers --method ...` on train.jsonl, on the GPU, cached in RUNS)
# [default: the four variants with seed 0, then calibrated-uniform-1]. Each
# run evaluates KL every EVAL_EVERY steps (the tokens-versus-quality curve) and passkey retrieval at the end;
# re-running the script resumes unfinished runs and skips finished ones. On a 2-GPU host, GPU=0 and GPU=1 run two
# variants at once (CUDA_VISIBLE_DEVICES); CONCURRENT=1 runs all the variants at once instead, as separate processes
# on the same GPU (one SmolLM2 run leaves most of an H200 idle: its step is bound by kernel launches). Env: TOKENS
# (50M), SEQ (2048), BATCH (16), EVAL_EVERY (50), EVAL_TOKENS (262144), PASSKEY (1k,2k,4k,8k), TRIALS (5),
# SAVE_EVERY (100), LAYERS (the selected attention layers, from `hybridize select-layers --method kl`). The
# optimizer settings are `hybridize heal`'s defaults (lr 3e-4 -> 3e-5 cosine, 50 warmup steps, clip 1.0).
set -euo pipefail
gguf=$1 corpus=$2 runs=$3
shift 3
variants=${*:-zero-uniform-0 calibrated-uniform-0 zero-selected-0 calibrated-selected-0 calibrated-uniform-1}
py=${PYTHON:-python3}
mkdir -p "$runs"
selected() {  # METHOD -> the 7 layers `select-layers --method METHOD` keeps (cached in RUNS/select-METHOD.json)
  local json=$runs/select-$1.json extra=()
  case $1 in *passkey) extra=(--seq-len 1024 --batch-size 1) ;; esac  # heal's own settings for the passkey scan
  [ -s "$json" ] || "$py" -m hybridize select-layers "$gguf" --data "$corpus/train.jsonl" --keep 7 --method "$1" \
      "${extra[@]}" --json "$json" --no-progress > /dev/null
  "$py" -c "import json, sys; print(','.join(map(str, json.load(open(sys.argv[1]))['attention_layers'])))" "$json"
}
for variant in $variants; do
  IFS=- read -r init layers seed <<< "$variant"
  case $layers in
    uniform) ;;
    selected) LAYERS=${LAYERS:-$(selected kl)} ;;
    kl|passkey|kl+passkey|proxy) ;;
    *) echo "unknown layers '$layers' in $variant: uniform, selected, kl, passkey, kl+passkey or proxy" >&2; exit 2 ;;
  esac
  out=$runs/$variant
  if [ -f "$out/final/config.json" ] && grep -q '"eval"' "$out/heal.json"; then echo "== $variant: done"; continue; fi
  args=(--data "$corpus/train.jsonl" --eval-data "$corpus/val.jsonl" "$corpus/holdout.jsonl"
        --tokens "${TOKENS:-50M}" --seq-len "${SEQ:-2048}" --batch-size "${BATCH:-16}"
        --save-every "${SAVE_EVERY:-100}" --eval-every "${EVAL_EVERY:-50}" --eval-tokens "${EVAL_TOKENS:-262144}"
        --eval-passkey "${PASSKEY:-1k,2k,4k,8k}" --passkey-trials "${TRIALS:-5}" --seed "$seed"
        --weights-dtype bfloat16 --no-progress)
  [ "$init" = calibrated ] || args+=(--no-calibrate)
  case $layers in
    uniform) args+=(--select-layers none) ;;  # heal's default selects with kl+passkey
    selected) args+=(--attention-layers "$LAYERS") ;;
    kl|passkey|kl+passkey|proxy) args+=(--attention-layers "$(selected "$layers")") ;;
  esac
  [ -d "$out" ] && args+=(--resume)
  echo "== $variant $(date -u +%T)"
  if [ -n "${CONCURRENT:-}" ]; then
    CUDA_VISIBLE_DEVICES=${GPU:-0} "$py" -m hybridize heal "$gguf" "$out" "${args[@]}" > "$out.json" 2> "$out.log" &
  else
    CUDA_VISIBLE_DEVICES=${GPU:-0} "$py" -m hybridize heal "$gguf" "$out" "${args[@]}" > "$out.json"
  fi
done
wait
"$py" "$(dirname "$0")/heal_report.py" "$runs"/*/
