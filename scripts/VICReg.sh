#!/usr/bin/env bash
# VICReg (Bardes, Ponce, LeCun, ICLR 2022): invariance (MSE, x25) + variance (hinge on the std, x25) +
# covariance (x1) of the two views' embeddings, variance and covariance over the global batch; 8192-8192-8192
# expander, LARS (biases and BN out of decay and adaptation). ResNet-50, 1000 epochs at batch 2048: 73.2 top-1
# (facebookresearch/vicreg README).
#
#   bash scripts/VICReg.sh [EPOCHS=1000]
#
# The recipe is the official main_vicreg.py's (contrast/models/vicreg.py, `--model VICReg` alone; docs/methods.md
# cites each line); the official 1000-epoch run is 4 nodes x 8 GPUs x 64 = 2048 (README). The default here is
# NPROC=4 x 64 = 256 on one node (EXTRA_ARGS="--batch-size 256" NPROC=8 gives 2048); the lr is
# --base-learning-rate x total batch / 256.
# Linear evaluation as the official evaluate.py with its README's --lr-head 0.02: 100 epochs, batch 256, SGD,
# weight decay 1e-6, cosine.
# Differences from the official code (docs/methods.md): warm-up from lr / 1e6, cosine floor 1e-6 instead of
# 0.001 x the peak.
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-1000}

run_recipe VICReg "${epochs}" --model VICReg \
    -- --learning-rate 0.02 --weight-decay 1e-6 --epochs 100 --warmup-epoch 0
