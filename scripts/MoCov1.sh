#!/usr/bin/env bash
# MoCo v1 (He et al. 2019): linear head, InstDisc augmentation, step schedule at 60% and 80% of training.
#
#   bash scripts/MoCov1.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}

run_recipe MoCov1 "${epochs}" \
    --model MoCo --aug InstDisc --crop 0.2 \
    --contrast-temperature 0.07 --contrast-momentum 0.999 --contrast-num-negative 65536 \
    --lr-scheduler step --lr-decay-epochs $((epochs * 3 / 5)) $((epochs * 4 / 5))
