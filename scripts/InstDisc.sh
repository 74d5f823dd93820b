#!/usr/bin/env bash
# InstDisc (Wu et al. 2018) as run by the PIC release (its scripts/InstDisc.sh, flag for flag; the recipe is
# InstDisc's own, contrast/models/instdisc.py, and this script adds the release's scale and data): memory
# bank of 65536 random negatives, bank momentum 0.5, tau 0.07, MLP head, InstDisc augmentation
# (crop 0.2), cosine lr with warm-up = epochs / 40, mixed precision (--amp-opt-level auto = O1 on CUDA),
# ResNet-50, 4 x 64 images. PIC paper, 1x200 (the default): 60.6 top-1.
#
#   bash scripts/InstDisc.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh. Deviations from the release
# (e.g. the bank is updated from all GPUs' features): docs/deviations.md.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}
OUTPUT_DIR=${OUTPUT_DIR:-./output/InstDisc/epoch-${epochs}}

run_recipe InstDisc "${epochs}" --model InstDisc --cache-mode part -- --cache-mode part
