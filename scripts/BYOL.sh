#!/usr/bin/env bash
# BYOL (Grill et al., NeurIPS 2020): online network + predictor, EMA target (cosine tau_base -> 1), symmetric
# normalised MSE, no negatives; LARS, global batch norm, asymmetric BYOL augmentation. ResNet-50 at batch 4096:
# 300 epochs 72.5 top-1, 1000 epochs 74.3.
#
#   bash scripts/BYOL.sh [EPOCHS=300]
#
# The recipe is BYOL's own (contrast/models/byol.py, `--model BYOL` alone): the 1000-epoch configuration of
# deepmind-research/byol/configs/byol.py (base lr 0.2 per 256 images, weight decay 1.5e-6, tau_base 0.996, the
# paper's Sec. 3.3). Its presets for shorter runs are scale, so this script passes them (base lr, weight decay,
# tau_base): 40: 0.45, 1e-6, 0.97; 100: 0.45, 1e-6, 0.99; 300: 0.3, 1e-6, 0.99. The lr is --base-learning-rate
# x total batch / 256, as BYOL's.
# The paper's batch is 4096 (e.g. 8 nodes x 8 GPUs x 64); the default here is NPROC=4 x 64 = 256 on one node
# (EXTRA_ARGS="--batch-size 512" NPROC=8 gives 4096). Linear evaluation: 80 epochs, lr 0.2 x batch / 256, no
# weight decay, as BYOL's eval config (which uses Nesterov momentum; ours is plain momentum).
# Differences from the reference code: the warm-up starts at lr / 1e6 instead of 0 and the cosine ends at 1e-6
# instead of 0; ColorJitter has torchvision's semantics (BYOL's TF code adds the brightness delta).
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-300}
case "${epochs}" in
    40) preset=(--base-learning-rate 0.45 --weight-decay 1e-6 --contrast-momentum 0.97) ;;
    100) preset=(--base-learning-rate 0.45 --weight-decay 1e-6 --contrast-momentum 0.99) ;;
    1000) preset=() ;;   # the recipe
    *) preset=(--base-learning-rate 0.3 --weight-decay 1e-6 --contrast-momentum 0.99) ;;   # 300, and any other count
esac

run_recipe BYOL "${epochs}" --model BYOL "${preset[@]}" \
    -- --learning-rate 0.2 --weight-decay 0 --epochs 80 --warmup-epoch 0
