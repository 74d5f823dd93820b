#!/usr/bin/env bash
# MoCo v2 (Chen et al. 2020): MLP head, MoCov2 augmentation, temperature 0.2, cosine. 2x100: 64.6 top-1.
#
#   bash scripts/MoCov2.sh [EPOCHS=100]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-100}

run_recipe MoCov2 "${epochs}" \
    --model MoCo --aug MoCov2 --crop 0.2 --mlp-head \
    --contrast-temperature 0.2 --contrast-momentum 0.999 --contrast-num-negative 65536
