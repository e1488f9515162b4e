#!/usr/bin/env bash
# The benchmark jobs of a GPU session, in order, for at most SECONDS; each job resumes where a previous call
# stopped (state in /tmp/jobs: NAME.done), so the same command, repeated, works through the queue. JOBS="a b"
# picks jobs. The small results (JSON, logs) go to $OUT/results.tgz, Triton's cache to $OUT/triton.tar.xz.
#
#   bash benchmarks/gpu/queue.sh SECONDS
#
# The default order (JOBS), with the device time each took or is expected to take on an H200 (the session has
# ~30 minutes, unpacking ~2); SECONDS includes 30 s kept back for packing the results:
# samples    only with MIX=samples: 5M tokens of text sampled from the teacher (`hybridize sample`, 512-token
#            documents from EOS, batch 512); the eighth session's run had not finished after 7 min (no progress
#            lines then; since then one a batch in samples.log)
# heal       the kl+passkey layers, seed ${SEED:-0}, TOKENS (default 15M), all evaluations (PASSKEY=0: no passkey
#            evaluation), on the corpus alone (MIX=none, the default; SEED=1 is docs/BENCHMARKS.md's "Both scans at
#            once" second seed) or on the corpus plus the samples (MIX=samples: does the teacher's own text close its
#            holdout gap?); the GPU tests run alongside (tiny shapes) (~15 min on a fresh machine: 3 of them Triton
#            autotuning, 2 converting; 5M tokens reached step 106 of 153 in 8 min, autotuning included)
# after      MTP heads (train-mtp, 16.4M tokens, ~3 min; MTP=0 skips them) and the ETD arms
#            (benchmarks/etd_smollm2.py) side by side
# spec       bench --speculative on val and code, batch 1 and 8 (~3 min)
# trainnone  the SmolLM2 training step without FSDP (bench --train --sharding none)
# verify8b   Qwen3-8B shapes, random weights: decode, 2- and 4-token verify steps, the graphed rollback (2 min 11 s)
# mtpself    (not in the default list) heads trained on the healed hybrid's own greedy text (`hybridize sample
#            --temperature 0` from the teacher samples' openings), then bench --speculative as `spec` does
set -u
source benchmarks/gpu/env.sh
budget=$(( ${1:?usage: queue.sh SECONDS} - 30 )) t0=$(date +%s) seed=${SEED:-0} mix=${MIX:-none} tokens=${TOKENS:-15M}
left() { echo $(( budget - ($(date +%s) - t0) )); }
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ ! -s $C/train_tokens.npy ]; then
  xz -dc ${PARTS:-.carry}/c4/train_tokens.npy.xz > $C/train_tokens.npy.tmp && mv $C/train_tokens.npy.tmp $C/train_tokens.npy
fi
name=klpk-$mix-$seed; [ "$tokens" = 15M ] || name+=-$tokens
model=$R/$name/final
data=($C/train_tokens.npy); [ "$mix" = samples ] && data+=($C/samples.jsonl)
if [ -s ${PARTS:-.carry}/c4/triton.tar.xz ] && [ ! -d $TRITON_CACHE_DIR ]; then
  mkdir -p $TRITON_CACHE_DIR && tar xJf ${PARTS:-.carry}/c4/triton.tar.xz -C $TRITON_CACHE_DIR
fi

job_samples() {
  [ "$mix" = samples ] || return 0
  timeout "$(left)" python3 -m hybridize sample $G $C/samples.jsonl --tokens 5M --batch-size 512 \
    --max-new-tokens 512 --no-progress > $R/samples.json 2>> $R/samples.log \
    && head -n 20 $C/samples.jsonl > $R/samples_head.jsonl  # what the samples read like, for the docs
}
job_heal() {
  if [ ! -f $J/gputests.started ]; then touch $J/gputests.started
    (timeout 1200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_static.py tests/test_gpu_fused.py \
      tests/test_gpu_model.py > $R/gputests.log 2>&1; echo "rc=$?" >> $R/gputests.log) &
  fi
  local run=$R/$name resume=() passkey=(); [ -d $run ] && resume=(--resume)
  [ "${PASSKEY:-1}" = 1 ] && passkey=(--eval-passkey 1k,2k,4k,8k --passkey-trials 5)
  timeout "$(left)" python3 -m hybridize heal $G $run --data "${data[@]}" \
    --eval-data $C/val.jsonl $C/holdout.jsonl --tokens $tokens --seq-len 2048 --batch-size 16 --save-every 50 \
    --eval-every 100 --eval-tokens 131072 "${passkey[@]}" --seed $seed \
    --weights-dtype bfloat16 --attention-layers 0,1,16,18,19,20,24 --no-progress "${resume[@]}" \
    > $R/$name.json 2>> $R/$name.log
}
job_after() {
  local resume=(); [ -d $R/mtp.partial ] && resume=(--resume)
  [ "${MTP:-1}" = 1 ] || touch $J/mtp.done  # MTP=0: the ETD arms alone
  if [ ! -f $J/mtp.done ]; then
    (timeout "$(left)" python3 -m hybridize train-mtp $model --data $C/train_tokens.npy --out $R/mtp --steps 1000 \
      --batch-size 16 --seq-len 1024 --save-every 100 --no-progress "${resume[@]}" > $R/mtp.json 2>> $R/mtp.log \
      && touch $J/mtp.done) &
  fi
  timeout "$(left)" python3 benchmarks/etd_smollm2.py $model --teacher $G --data $C/train_tokens.npy \
    --eval-data $C/val.jsonl --out $R/etd --tokens 2M --iterations 1,2,3 --router-steps 60 --json $R/etd.json \
    >> $R/etd.log 2>&1
  local rc=$?; wait; [ $rc = 0 ] && [ -f $J/mtp.done ]
}
job_spec() {
  timeout "$(left)" python3 -m hybridize bench $R/mtp --speculative --data $C/val.jsonl $C/code.jsonl \
    --decode-batches 1,8 --draft-tokens 3 --prompts 16 --new-tokens 128 --json $R/spec.json > $R/spec.txt 2>&1
}
job_mtpself() {
  timeout "$(left)" python3 -m hybridize sample $model $C/greedy.jsonl --temperature 0 --prompts $C/samples.jsonl \
    --tokens 3M --batch-size 512 --max-new-tokens 256 --no-progress > $R/greedy.json 2>> $R/greedy.log || return 1
  local resume=(); [ -d $R/mtp-self.partial ] && resume=(--resume)
  timeout "$(left)" python3 -m hybridize train-mtp $model --data $C/greedy.jsonl --out $R/mtp-self --steps 1000 \
    --batch-size 16 --seq-len 1024 --save-every 100 --no-progress "${resume[@]}" > $R/mtp-self.json \
    2>> $R/mtp-self.log || return 1
  timeout "$(left)" python3 -m hybridize bench $R/mtp-self --speculative --data $C/val.jsonl $C/code.jsonl \
    --decode-batches 1,8 --draft-tokens 3 --prompts 16 --new-tokens 128 --json $R/spec-self.json > $R/spec-self.txt 2>&1
}
job_verify8b() {
  timeout "$(left)" python3 -m hybridize bench --shape qwen3-8b --prefill-lengths 4k --decode-batches 1 \
    --decode-contexts 1k --new-tokens 64 --repeats 1 --verify-tokens 2,4 --against none --no-dynamic \
    --json $R/verify8b.json > $R/verify8b.txt 2>&1
}
job_trainnone() {
  timeout "$(left)" python3 -m hybridize bench --train --shape smollm2 --seq-len 2048 --batch-size 16 \
    --sharding none --against none --checkpointing off --json $R/trainnone.json > $R/trainnone.txt 2>&1
}

for job in ${JOBS:-samples heal after spec trainnone verify8b}; do
  [ -f $J/$job.done ] && continue
  [ "$(left)" -lt 20 ] && break
  echo "== $job $(date -u +%T), ${budget}s budget, $(left)s left"
  if job_$job; then touch $J/$job.done; echo "== $job done $(date -u +%T)"
  else echo "== $job stopped (rc $?) $(date -u +%T)"; break; fi
done
# one archive: the device tool brings back few files
(cd $R && find . -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.txt' \) -size -4M \
   -not -path '*/final/*' -not -path '*/hybrid/*' -not -path '*/checkpoint*' -not -name 'tokenizer*' -print0 \
   | tar czf "$out/results.tgz" --null -T -)
# fast compression, and a name that says "incomplete" (.tmp) if the call's time limit cuts it short
[ -d $TRITON_CACHE_DIR ] && tar cf - -C $TRITON_CACHE_DIR . 2> /dev/null | xz -T0 -1 > "$out/triton.tar.xz.tmp" \
  && mv "$out/triton.tar.xz.tmp" "$out/triton.tar.xz"
ls $J; tail -n 3 $R/*.log 2>/dev/null | cut -c1-240
