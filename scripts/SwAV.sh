#!/usr/bin/env bash
# SwAV (Caron et al., NeurIPS 2020): prototypes, Sinkhorn-Knopp codes (3 iterations, eps 0.05) over the global
# batch, swapped prediction, multi-crop 2 x 224 + 6 x 96 with codes from the large crops, queue, LARS.
# This is facebookresearch/swav's scripts/swav_200ep_bs256_pretrain.sh (one node, batch 256: 72.7 top-1 in
# its model zoo): queue 3840 from epoch 15, prototypes frozen for 5005 iterations, lr 0.6, no warm-up; these
# small-batch settings are what the script adds to SwAV's recipe.
#
#   bash scripts/SwAV.sh [EPOCHS=200]
#
# The recipe itself (contrast/models/swav.py, `--model SwAV` alone) is the paper's 800-epoch batch-4096 run
# (75.3), swav_800ep_pretrain.sh: 64 GPUs x 64, base_lr 4.8 (0.3 per 256 images here), 10 warm-up epochs from
# 0.3 (= 4.8 / 16), prototypes frozen for 313 iterations, no queue (it passes --queue_length 0), final lr 0.0048:
#   python -m contrast.launch --nproc_per_node=8 main_pretrain.py --model SwAV --epochs 800 --batch-size 64 ...
#   on 8 nodes.
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

run_recipe SwAV "${epochs}" --model SwAV \
    --swav-queue-length 3840 --swav-queue-start-epoch 15 --swav-freeze-prototypes-iters 5005 \
    --base-learning-rate 0.6 --warmup-epoch 0 \
    -- --learning-rate 0.3 --weight-decay 1e-6 --epochs 100 --warmup-epoch 0
