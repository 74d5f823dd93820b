#!/usr/bin/env bash
# InstDisc (Wu et al. 2018): memory bank, 65536 random negatives, bank momentum 0.5. 1x200: 60.6 top-1.
# Pretraining then linear evaluation with torchrun (recipe of the PIC release, docs: README).
#
#   bash scripts/InstDisc.sh [EPOCHS=200]
#
# Environment: DATA_DIR (./data/ImageNet-Zip; --zip is added when it holds train.zip), NPROC (4 GPUs,
# batch 64 per process = 256 in total), OUTPUT_DIR (./output/InstDisc/epochs-${EPOCHS}), EXTRA_ARGS
# (appended to pretraining), LINEAR_EXTRA_ARGS (appended to linear evaluation), MASTER_PORT (12348).
set -euo pipefail
cd "$(dirname "$0")/.."

epochs=${1:-200}
data_dir=${DATA_DIR:-./data/ImageNet-Zip}
nproc=${NPROC:-4}
output_dir=${OUTPUT_DIR:-./output/InstDisc/epochs-${epochs}}
port=${MASTER_PORT:-12348}
zip=""
if [ -f "${data_dir}/train.zip" ]; then zip="--zip"; fi

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_pretrain.py \
    --data-dir "${data_dir}" ${zip} \
    --model InstDisc --aug InstDisc --crop 0.2 \
    --contrast-temperature 0.07 --contrast-momentum 0.5 --contrast-num-negative 65536 \
    --epochs "${epochs}" \
    --output-dir "${output_dir}" --auto-resume ${EXTRA_ARGS:-}

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_linear.py \
    --data-dir "${data_dir}" ${zip} \
    --pretrained-model "${output_dir}/current.pth" \
    --output-dir "${output_dir}/eval" --auto-resume ${LINEAR_EXTRA_ARGS:-}
