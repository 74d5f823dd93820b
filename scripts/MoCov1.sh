#!/usr/bin/env bash
# MoCo v1 (He et al. 2020) as run by the PIC release (its scripts/MoCov1.sh, flag for flag; the recipe is
# `--model MoCo`'s own, contrast/models/moco.py, and this script adds the release's scale and data): linear
# head, tau 0.07, queue 65536, key-encoder momentum 0.999, InstDisc augmentation (crop 0.2), step
# schedule (x0.1 at epochs 120 and 160, the release's --lr-decay-epochs default) with warm-up =
# epochs / 40, mixed precision (--amp-opt-level auto = O1 on CUDA), ResNet-50, 4 x 64 images.
# No PIC-paper number for this script.
#
#   bash scripts/MoCov1.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}
OUTPUT_DIR=${OUTPUT_DIR:-./output/MoCov1/epoch-${epochs}}

run_recipe MoCov1 "${epochs}" --model MoCo --cache-mode part -- --cache-mode part
