#!/usr/bin/env bash
# SimCLR (Chen et al. 2020): MLP head, NT-Xent over the global batch, LARS, cross-rank BN. 2x100: 64.7 top-1.
#
#   bash scripts/SimCLR.sh [EPOCHS=100]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-100}

run_recipe SimCLR "${epochs}" \
    --model SimCLR --aug SimCLR --crop 0.08 --mlp-head --contrast-temperature 0.1 \
    --optimizer lars --base-learning-rate 0.3 --weight-decay 1e-6 \
    -- --learning-rate 0.1 --weight-decay 1e-6
