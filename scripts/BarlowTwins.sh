#!/usr/bin/env bash
# Barlow Twins (Zbontar et al., ICML 2021): cross-correlation of the two views' batch-normalised embeddings
# over the global batch pushed to the identity (lambda 0.0051 off the diagonal), 8192-8192-8192 projector,
# LARS (biases and BN at their own lr, out of decay and adaptation). ResNet-50, 1000 epochs at batch 2048:
# 73.5 top-1 (facebookresearch/barlowtwins README; the paper: 73.2).
#
#   bash scripts/BarlowTwins.sh [EPOCHS=1000]
#
# The recipe is the official main.py's (contrast/models/barlow_twins.py, `--model BarlowTwins` alone; docs/methods.md
# cites each line). The official batch is 2048 on 16 GPUs; the default here is NPROC=4 x 64 = 256 on one node
# (EXTRA_ARGS="--batch-size 128" NPROC=16 gives 2048); the lrs follow the total batch (x B / 256).
# Linear evaluation as the official evaluate.py: 100 epochs, batch 256, SGD lr 0.3, weight decay 1e-6, cosine.
# Differences from the official code (docs/methods.md): gradients do not depend on the number of processes
# (the official code's are 1/world_size of ours); warm-up from lr / 1e6, cosine floor 1e-6 instead of
# 0.001 x the peak.
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-1000}

run_recipe BarlowTwins "${epochs}" --model BarlowTwins \
    -- --learning-rate 0.3 --weight-decay 1e-6 --epochs 100 --warmup-epoch 0
