#!/usr/bin/env bash
# MTP heads trained on corpus text against heads trained on the backbone's own greedy text, the same number of
# tokens, acceptance measured by `bench --speculative` (CPU). The backbone is SmolLM2-135M-Instruct exactly (an
# all-attention conversion), so the heads' targets are a real model's greedy choices.
#
#   benchmarks/mtp_selfdata_cpu.sh GGUF CORPUS OUT        # CORPUS: benchmarks/build_corpus.sh's folder
#
# ~35 minutes on the 2-core CPU machine. Results: OUT/spec-{corpus,greedy}.json.
set -euo pipefail
gguf=${1:?usage: mtp_selfdata_cpu.sh GGUF CORPUS OUT} corpus=${2:?} out=${3:?}
h="${PYTHON:-python3} -m hybridize"
mkdir -p "$out"
[ -d "$out/hyb" ] || $h convert "$gguf" "$out/hyb" --pattern "" --dtype float32 --no-progress
[ -f "$out/greedy.jsonl" ] || $h sample "$out/hyb" "$out/greedy.jsonl" --temperature 0 --prompts "$corpus/train.jsonl" \
  --tokens 120k --batch-size 32 --max-new-tokens 128 --device cpu --no-progress
for arm in corpus greedy; do
  data=$corpus/train.jsonl; [ $arm = greedy ] && data=$out/greedy.jsonl
  [ -d "$out/mtp-$arm" ] || $h train-mtp "$out/hyb" --data "$data" --out "$out/mtp-$arm" --steps 60 --batch-size 8 \
    --seq-len 256 --lr 1e-3 --save-every 0 --device cpu --no-progress
  $h bench "$out/mtp-$arm" --speculative --data "$corpus/val.jsonl" --decode-batches 1 --draft-tokens 3 --prompts 8 \
    --new-tokens 64 --json "$out/spec-$arm.json"
done
