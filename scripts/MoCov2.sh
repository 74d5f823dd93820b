#!/usr/bin/env bash
# MoCo v2 (Chen et al. 2020) as run by the PIC release (its scripts/MoCov2.sh, flag for flag; the recipe is
# `--model MoCov2`'s own, contrast/models/moco.py, the release's `--model MoCo` with these flags): MLP head,
# tau 0.2, queue 65536, key-encoder momentum 0.999, MoCov2 augmentation (crop 0.2), cosine lr with
# warm-up = epochs / 40, mixed precision (--amp-opt-level auto = O1 on CUDA), ResNet-50, 4 x 64 images.
# PIC paper, 2x200 (the default; two views per image): 67.9 top-1.
#
#   bash scripts/MoCov2.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}
OUTPUT_DIR=${OUTPUT_DIR:-./output/MoCo/epoch-${epochs}}

run_recipe MoCov2 "${epochs}" --model MoCov2 --cache-mode part -- --cache-mode part
