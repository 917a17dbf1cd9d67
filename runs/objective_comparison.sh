#!/usr/bin/env bash
# What the GLM objective buys (MODEL_CARD.md, "GLM objective vs causal LM"): the default model's shape (glm-tiny)
# trained from the same random init on the same windows, same steps, learning rate and seed, three ways:
#   glm     the GLM mixture (0.5 [MASK] / 0.3 [sMASK] / 0.2 [gMASK])
#   gmask   [gMASK] only (a prefix LM: 50-100% of a document generated from the rest)
#   causal  a plain causal LM in GLM's format (--infill whole_window=1: the whole window one span, left to right)
# then each evaluated with the cloze suites: the GLM models with the candidate in the blank, the causal model with
# --scoring lm (the text with each candidate in place, read left to right: all a causal LM can do); sentiment
# zero-shot is the blank pattern for all three.
#
#   bash runs/objective_comparison.sh SHARDS_DIR OUT_DIR [STEPS]
set -euo pipefail
SHARDS=$1; OUT=$2; STEPS=${3:-400}
GLMKIT=${GLMKIT:-glmkit}
mkdir -p "$OUT"
common=(--model glm-tiny --data "$SHARDS" --seq-len 512 --batch-size 8 --steps "$STEPS" --lr 2e-3 --min-lr 2e-4
        --warmup 40 --precision bf16 --eval-every "$STEPS" --eval-batches 4 --eval-docs 16 --save-every "$STEPS"
        --keep 1 --log-every 10 --no-progress)
declare -A arms=([glm]="--mixture 0.5 0.3 0.2" [gmask]="--mixture 0 0 1" [causal]="--infill whole_window=1")
for arm in "${!arms[@]}"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 $GLMKIT pretrain "${common[@]}" --out "$OUT/$arm" ${arms[$arm]} > "$OUT/$arm.log" 2>&1 &
done
wait
for arm in "${!arms[@]}"; do
  ck=$(ls -d "$OUT/$arm"/checkpoints/step-* | tail -1)
  scoring=blank; [ "$arm" = causal ] && scoring=lm
  $GLMKIT eval --model "$ck" --suite tang300,chengyu --limit 200 --scoring $scoring \
    --out "$OUT/$arm.$scoring.eval.json" > "$OUT/$arm.$scoring.eval.log" 2>&1
  $GLMKIT eval --model "$ck" --suite sentiment_zh --limit 200 --out "$OUT/$arm.sentiment.eval.json" > "$OUT/$arm.sentiment.eval.log" 2>&1
done
