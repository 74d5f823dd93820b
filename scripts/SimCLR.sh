#!/usr/bin/env bash
# SimCLR (Chen et al. 2020) as run by the PIC release (its scripts/SimCLR.sh, flag for flag; the recipe is
# SimCLR's own, contrast/models/simclr.py, and this script adds the release's scale and data): MLP head,
# tau 0.1, NT-Xent over the global batch (4 x 64 = 256), LARS at base lr 0.3, weight decay 1e-6,
# SimCLR augmentation (crop 0.08), cosine lr with warm-up = epochs / 40, batch norm over all GPUs,
# mixed precision (--amp-opt-level auto = O1 on CUDA), ResNet-50; linear evaluation at lr 0.1, weight
# decay 1e-6. PIC paper, 2x200 (the default; two views per image): 66.6 top-1.
#
#   bash scripts/SimCLR.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh. The release wrote every SimCLR
# run to ./output/SimCLR; here the epoch count is part of the folder (so --auto-resume never
# continues a run of another length).
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}
OUTPUT_DIR=${OUTPUT_DIR:-./output/SimCLR/epoch-${epochs}}

run_recipe SimCLR "${epochs}" --model SimCLR --cache-mode part \
    -- --cache-mode part --learning-rate 0.1 --weight-decay 1e-6
