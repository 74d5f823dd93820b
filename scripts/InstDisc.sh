#!/usr/bin/env bash
# InstDisc (Wu et al. 2018): memory bank, 65536 random negatives, bank momentum 0.5. 1x200: 60.6 top-1.
#
#   bash scripts/InstDisc.sh [EPOCHS=200]
#
# Pretraining then linear evaluation; environment overrides (DATA_DIR, NPROC, OUTPUT_DIR, EXTRA_ARGS,
# LINEAR_EXTRA_ARGS, MASTER_PORT) are described in scripts/recipe.sh.
source "$(dirname "$0")/recipe.sh"
epochs=${1:-200}

run_recipe InstDisc "${epochs}" \
    --model InstDisc --aug InstDisc --crop 0.2 \
    --contrast-temperature 0.07 --contrast-momentum 0.5 --contrast-num-negative 65536
