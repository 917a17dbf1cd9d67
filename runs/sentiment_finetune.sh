#!/usr/bin/env bash
# MODEL_CARD.md's "Chinese sentiment, after cloze fine-tune" row, reproduced: the embedded default model
# fine-tuned as a cloze classifier ("{text}总之很[MASK]。", 好 / 差) on the 13,840 training reviews of the
# default corpus's sentiment set, scored on all 3,523 test reviews.
#
#   bash runs/sentiment_finetune.sh [OUT_DIR]     (default: ~/glm-run/sentiment-ft; must not exist yet)
#
# Measured on the 2-core development machine (2026-11-29): 1,730 steps (2 epochs) in 26 min at ~0.9 s a
# step with --group-by-length (1.6 s without it), plus two evaluations of ~2.5 min; 78.4% after the first
# epoch, 80.5% at the end.
set -euo pipefail
OUT=${1:-$HOME/glm-run/sentiment-ft}
GLMKIT=${GLMKIT:-glmkit}
PYTHON=${PYTHON:-python}
$GLMKIT data build                                          # -> ~/.cache/glmkit/corpus (eval/ included)
DATA=${GLMKIT_CACHE:-$HOME/.cache/glmkit}/corpus/eval/sentiment_zh.jsonl
MODEL=$($PYTHON -c "from glmkit.convert import default_model_path; print(default_model_path())")
$GLMKIT finetune --task cloze --preset sentiment_zh --model "$MODEL" \
    --train "$DATA" --train-split train --eval "$DATA" --eval-split test --out "$OUT" \
    --steps 1730 --batch-size 16 --lr 1e-3 --warmup 40 --max-len 128 --group-by-length \
    --eval-every 865 --log-every 50
