#!/usr/bin/env bash
# DINO (Caron et al., ICCV 2021): student and EMA teacher (cosine 0.996 -> 1), cross-entropy between the
# teacher's centred, sharpened softmax (T 0.04, center momentum 0.9) of the 2 global crops and the student's
# softmax (T 0.1) of every other crop, 2 x 224 + 8 x 96 crops, 65536-way weight-normalised head.
# ResNet-50, 100 epochs, 8 GPUs x 64: 67.5 k-NN, 75.3 linear top-1 (facebookresearch/dino README, the ResNet-50
# rows of its model zoo and its ResNet-50 training command).
#
#   bash scripts/DINO.sh [EPOCHS=100]
#
# The recipe is DINO's own (contrast/models/dino.py, `--model DINO` alone): the README's ResNet-50 command
# (--optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
# --local_crops_scale 0.05 0.14) over main_dino.py's defaults (clip_grad 3.0, freeze_last_layer 1, 10 warm-up
# epochs, lr x B / 256). The README's run is one node with 8 GPUs (NPROC=8 x --batch-size 64 = 512), the default
# here. Linear evaluation: eval_linear.py's defaults (100 epochs, lr 0.001 x B / 256, no weight decay, cosine to 0,
# no warm-up); the released ResNet-50 linear run's own arguments are not in the repository.
# Differences from the reference code: docs/methods.md, "DINO".
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-100}
export NPROC=${NPROC:-8}

run_recipe DINO "${epochs}" --model DINO \
    -- --learning-rate 0.001 --weight-decay 0 --epochs 100 --warmup-epoch 0
