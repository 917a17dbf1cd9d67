#!/usr/bin/env bash
# Short recipe ablations for the default model (MODEL_CARD.md, "Recipe ablations"): four arms continued from the
# same checkpoint (the previous default model) for the same 120 steps x 8 x 512 tokens, the same learning-rate
# schedule and seed, one change each; then held-out loss per objective (standard blanks) and the cloze suites.
#
#   bash runs/recipe_ablations.sh SHARDS_DIR OUT_DIR [START_CHECKPOINT]
#
# The arms run side by side, one thread each (2 cores here: ~25 min wall for all four).
set -euo pipefail
SHARDS=$1; OUT=$2; START=${3:-$(python -c "import glmkit, pathlib; print(pathlib.Path(glmkit.__file__).parent / 'assets/default')")}
GLMKIT=${GLMKIT:-glmkit}
mkdir -p "$OUT"
common=(--model "$START" --data "$SHARDS" --seq-len 512 --batch-size 8 --steps 120 --lr 3e-4 --min-lr 3e-5 --warmup 20
        --precision bf16 --eval-every 120 --eval-batches 4 --eval-docs 16 --save-every 120 --keep 1 --log-every 10
        --no-progress)
declare -A arms=(
  [A_baseline]="--mixture 0.5 0.3 0.2"
  [B_gmask]="--mixture 0.25 0.25 0.5"
  [C_gmask_zh]="--mixture 0.25 0.25 0.5 --domain-weights zh_classical=2 zh_modern=2 en=0.5 code=0.5"
  [D_gmask_cov30]="--mixture 0.25 0.25 0.5 --infill coverage=0.3"
)
for arm in "${!arms[@]}"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 $GLMKIT pretrain "${common[@]}" --out "$OUT/$arm" ${arms[$arm]} > "$OUT/$arm.log" 2>&1 &
done
wait
for arm in "${!arms[@]}"; do
  ck=$(ls -d "$OUT/$arm"/checkpoints/step-* | tail -1)
  OMP_NUM_THREADS=2 $GLMKIT eval --model "$ck" --suite tang300,chengyu,sentiment_zh --limit 200 --out "$OUT/$arm.eval.json" \
    > "$OUT/$arm.eval.log" 2>&1
done
