#!/usr/bin/env bash
# The README's Fashion-MNIST comparison: every registered method (its scripts/configs/fmnist recipe) and
# the raw-pixel and random-network baselines, SEEDS seeds, BUDGET images seen per run, kNN and the
# cached linear probe (docs/comparison.md). Resumable: run it again to continue after a stop.
#
#   bash scripts/compare_fashion_mnist.sh   # the README's table (~1.3 h of run time over its 30 runs on 2 cores)
#   VIT=1 METHODS="PIC MoCov3 DINO" bash scripts/compare_fashion_mnist.sh   # vit_tiny, patch 4, 32 px
#
# Data: pretraining on the first PRETRAIN images of the training set (the kNN monitor on the first 500
# test images); kNN memory and probe training on the first EVAL_TRAIN training images, scored on the
# first EVAL_VAL test images. TUNE=1 scores on the last TUNE_VAL (1 000) training images instead (the
# split the recipes are tuned on; never the test set). Every setting is a variable; EXTRA (words quoted as
# on a command line: --set PIC-lars '--optimizer lars --base-learning-rate 4.8') goes to python -m contrast.compare.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SRC=${SRC:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-output/compare_fmnist}
DATA=${DATA:-$OUT/data}
METHODS=${METHODS:-"PIC InstDisc MoCo MoCov2 SimCLR BYOL SwAV MoCov3 SimSiam BarlowTwins VICReg DINO NNCLR"}
SEEDS=${SEEDS:-"0 1"}
BUDGET=${BUDGET:-6000}
PRETRAIN=${PRETRAIN:-2000}
EVAL_TRAIN=${EVAL_TRAIN:-5000}
EVAL_VAL=${EVAL_VAL:-1000}
TUNE=${TUNE:-0}
TUNE_VAL=${TUNE_VAL:-1000}
VIT=${VIT:-0}
WORKERS=${WORKERS:-1}
tune=()
[ "$TUNE" = 1 ] && tune=(--val-from-train "$TUNE_VAL")
prepare() {  # folder, training images, val images
    [ -f "$1/val_map.txt" ] || $PY tools/prepare_fashion_mnist.py --src "$SRC" --out "$1" --layout zip \
        --limit-train "$2" --limit-val "$3" "${tune[@]}"
}
split=$([ "$TUNE" = 1 ] && echo tune || echo test)
prepare "$DATA/pretrain-$split" "$PRETRAIN" 500
prepare "$DATA/eval-$split" "$EVAL_TRAIN" "$EVAL_VAL"
if [ "$VIT" = 1 ]; then   # each method's ViT recipe at this scale: 1 warm-up epoch, 16 px small crops
    recipes=()
    vit=(--pretrain-args "--arch vit_tiny --patch-size 4 --image-size 32 --val-crop-fraction 1.0 --batch-size 128 --warmup-epoch 1")
    [[ " $METHODS " == *" PIC "* ]] && vit+=(--set PIC "--image-size2 16")
    [[ " $METHODS " == *" DINO "* ]] && vit+=(--set DINO "--aug BYOL --crop 0.2 --feature-dim 4096 --contrast-momentum 0.99 --dino-warmup-teacher-temp-epochs 1")
else
    recipes=(--recipes scripts/configs/fmnist)
    vit=()
fi
eval "extra=(${EXTRA:-})"
set -x   # the comparison's command, to rerun or extend by hand
# shellcheck disable=SC2086
$PY -m contrast.compare --out "$OUT" --data-dir "$DATA/pretrain-$split" --eval-data-dir "$DATA/eval-$split" \
    --zip --cache-mode full --methods $METHODS "${recipes[@]}" "${vit[@]}" --budget-images "$BUDGET" --seeds $SEEDS \
    --eval knn probe --probe-epochs 30 --device cpu --num-workers "$WORKERS" --monitor-points 2 "${extra[@]}"
