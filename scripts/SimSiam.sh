#!/usr/bin/env bash
# SimSiam (Chen, He, CVPR 2021), ResNet-50: projector (3 layers, BN) and bottleneck predictor, symmetric negative
# cosine with stop-gradient, no negatives and no momentum encoder; SGD, global batch norm, MoCo v2's augmentation,
# predictor at a fixed lr. ResNet-50 at batch 512, 100 epochs: 68.1 top-1 (facebookresearch/simsiam README.md;
# the paper's Table 4 gives 68.1 at 100 epochs, 71.3 at 800).
#
#   bash scripts/SimSiam.sh [EPOCHS=100]
#
# The recipe is SimSiam's own (contrast/models/simsiam.py, `--model SimSiam` alone): main_simsiam.py's defaults
# with the README's --fix-pred-lr: base lr 0.05 per 256 images, weight decay 1e-4, momentum 0.9, cosine without
# warm-up. The official batch is 512 (8 GPUs x 64); the default here is NPROC=4 x 64 = 256 on one node
# (NPROC=8 gives 512). Linear evaluation: 90 epochs, lr 0.1 x batch / 256, no weight decay, as main_lincls.py
# (which uses LARS at batch 4096: ours is SGD, the only linear optimiser of main_linear.py).
# Differences from the official code (docs/methods.md): the cosine is stepped per iteration (the official per
# epoch) and ends at 1e-6 instead of its last epoch's value.
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-100}

run_recipe SimSiam "${epochs}" --model SimSiam \
    -- --learning-rate 0.1 --weight-decay 0 --epochs 90 --warmup-epoch 0
