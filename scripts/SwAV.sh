#!/usr/bin/env bash
# SwAV (Caron et al., NeurIPS 2020): prototypes, Sinkhorn-Knopp codes (3 iterations, eps 0.05) over the global
# batch, swapped prediction, multi-crop 2 x 224 + 6 x 96 with codes from the large crops, queue, LARS.
# This is facebookresearch/swav's scripts/swav_200ep_bs256_pretrain.sh (one node, batch 256: 72.7 top-1 in
# its model zoo): queue 3840 from epoch 15, prototypes frozen for 5005 iterations, lr 0.6, no warm-up.
#
#   bash scripts/SwAV.sh [EPOCHS=200]
#
# The paper's 800-epoch batch-4096 run (75.3) is swav_800ep_pretrain.sh: 64 GPUs x 64, base_lr 4.8 (0.3 per 256
# images here), 10 warm-up epochs from 0.3 (= 4.8 / 16), prototypes frozen for 313 iterations, no queue (it
# passes --queue_length 0), final lr 0.0048:
#   EXTRA_ARGS="--base-learning-rate 0.3 --warmup-epoch 10 --warmup-multiplier 16 --swav-queue-length 0
#               --swav-freeze-prototypes-iters 313" with 64 processes of --batch-size 64.
# Where this differs from swav's code (docs/methods.md): the cosine ends at 1e-6, not at final_lr (0.0006 here,
# 0.0048 at 800 epochs); LARS (--lars-form release, trust 0.001) leaves biases and batch-norm parameters
# unadapted and without weight decay, and divides by ||g + wd w||, where swav's apex LARC (clip=False) adapts
# every tensor and divides by ||g|| + wd ||w||; batch norm is synchronised over all ranks (the 800-epoch run
# used apex groups of 8 GPUs). Linear evaluation: swav's eval_linear.py defaults (lr 0.3, wd 1e-6, 100 epochs,
# cosine, batch 256).
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}

run_recipe SwAV "${epochs}" \
    --model SwAV --aug MultiCrop --image-size 224 --image-size2 96 --crop 0.05 --crop2 0.14 --num-crop2 6 \
    --mlp-head --feature-dim 128 --mlp-hidden-dim 2048 --view-batching joint --contrast-temperature 0.1 \
    --swav-num-prototypes 3000 --swav-epsilon 0.05 --swav-sinkhorn-iterations 3 \
    --swav-queue-length 3840 --swav-queue-start-epoch 15 --swav-freeze-prototypes-iters 5005 \
    --optimizer lars --base-learning-rate 0.6 --weight-decay 1e-6 --warmup-epoch 0 --lr-scheduler cosine \
    -- --learning-rate 0.3 --weight-decay 1e-6 --epochs 100 --warmup-epoch 0
