#!/usr/bin/env bash
# PIC with multi-crop (1 x 160 px + 3 x 96 px crops per image), sliding window. 1x400: 70.3 top-1.
#
#   bash scripts/PIC_multicrop.sh [EPOCHS=400]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-400}

run_recipe PIC_multicrop "${epochs}" \
    --model PIC --aug MultiCrop --mlp-head --contrast-temperature 0.2 \
    --image-size 160 --image-size2 96 --crop 0.08 --crop2 0.14 --num-crop2 3 \
    --use-sliding-window-sampler
