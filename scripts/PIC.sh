#!/usr/bin/env bash
# PIC (Cao et al., NeurIPS 2020): 1 view per iteration, sliding-window data scheduler. 1x200: 68.6 top-1.
#
#   bash scripts/PIC.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}

run_recipe PIC "${epochs}" \
    --model PIC --aug SimCLR --crop 0.08 --mlp-head --contrast-temperature 0.2 \
    --use-sliding-window-sampler
