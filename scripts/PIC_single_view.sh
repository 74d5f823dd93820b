#!/usr/bin/env bash
# PIC with ONE 224 px view per image (SimCLR augmentation), sliding window. NOT the paper's recipe
# and no published number: every PIC row of the paper (68.6, 70.3, 70.8) is the multi-crop recipe of
# scripts/PIC.sh, the only PIC recipe the release ran. This is the plain single-view ablation (the
# release could not run it: its PIC model expects stacked crops), with PIC.sh's other settings
# (MLP head, tau 0.2, window 131072 / stride 16384 with --shuffle-per-epoch, warm-up = epochs / 40).
#
#   bash scripts/PIC_single_view.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}
OUTPUT_DIR=${OUTPUT_DIR:-./output/PIC_single_view/epoch-${epochs}}

# PIC's recipe (contrast/models/pic.py) with one 224 px SimCLR view instead of the multi-crop
run_recipe PIC_single_view "${epochs}" --model PIC --aug SimCLR --image-size 224 --cache-mode part --arch resnet50 \
    -- --cache-mode part --arch resnet50
