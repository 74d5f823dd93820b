#!/usr/bin/env bash
# PIC with multi-crop (1 x 160 px + 3 x 96 px crops per image), sliding window. 1x400: 70.3 top-1.
# Pretraining then linear evaluation with torchrun (recipe of the PIC release, docs: README).
#
#   bash scripts/PIC_multicrop.sh [EPOCHS=400]
#
# Environment: DATA_DIR (./data/ImageNet-Zip; --zip is added when it holds train.zip), NPROC (4 GPUs,
# batch 64 per process = 256 in total), OUTPUT_DIR (./output/PIC_multicrop/epochs-${EPOCHS}), EXTRA_ARGS
# (appended to pretraining), LINEAR_EXTRA_ARGS (appended to linear evaluation), MASTER_PORT (12348).
set -euo pipefail
cd "$(dirname "$0")/.."

epochs=${1:-400}
data_dir=${DATA_DIR:-./data/ImageNet-Zip}
nproc=${NPROC:-4}
output_dir=${OUTPUT_DIR:-./output/PIC_multicrop/epochs-${epochs}}
port=${MASTER_PORT:-12348}
zip=""
if [ -f "${data_dir}/train.zip" ]; then zip="--zip"; fi

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_pretrain.py \
    --data-dir "${data_dir}" ${zip} \
    --model PIC --aug MultiCrop --mlp-head \
    --image-size 160 --image-size2 96 --crop 0.08 --crop2 0.14 --num-crop2 3 \
    --contrast-temperature 0.2 \
    --use-sliding-window-sampler \
    --epochs "${epochs}" \
    --output-dir "${output_dir}" --auto-resume ${EXTRA_ARGS:-}

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_linear.py \
    --data-dir "${data_dir}" ${zip} \
    --pretrained-model "${output_dir}/current.pth" \
    --output-dir "${output_dir}/eval" --auto-resume ${LINEAR_EXTRA_ARGS:-}
