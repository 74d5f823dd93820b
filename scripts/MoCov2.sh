#!/usr/bin/env bash
# MoCo v2 (Chen et al. 2020): MLP head, MoCov2 augmentation, temperature 0.2, cosine. 2x100: 64.6 top-1.
# Pretraining then linear evaluation with torchrun (recipe of the PIC release, docs: README).
#
#   bash scripts/MoCov2.sh [EPOCHS=100]
#
# Environment: DATA_DIR (./data/ImageNet-Zip; --zip is added when it holds train.zip), NPROC (4 GPUs,
# batch 64 per process = 256 in total), OUTPUT_DIR (./output/MoCov2/epochs-${EPOCHS}), EXTRA_ARGS
# (appended to pretraining), LINEAR_EXTRA_ARGS (appended to linear evaluation), MASTER_PORT (12348).
set -euo pipefail
cd "$(dirname "$0")/.."

epochs=${1:-100}
data_dir=${DATA_DIR:-./data/ImageNet-Zip}
nproc=${NPROC:-4}
output_dir=${OUTPUT_DIR:-./output/MoCov2/epochs-${epochs}}
port=${MASTER_PORT:-12348}
zip=""
if [ -f "${data_dir}/train.zip" ]; then zip="--zip"; fi

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_pretrain.py \
    --data-dir "${data_dir}" ${zip} \
    --model MoCo --aug MoCov2 --crop 0.2 --mlp-head \
    --contrast-temperature 0.2 --contrast-momentum 0.999 --contrast-num-negative 65536 \
    --epochs "${epochs}" \
    --output-dir "${output_dir}" --auto-resume ${EXTRA_ARGS:-}

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_linear.py \
    --data-dir "${data_dir}" ${zip} \
    --pretrained-model "${output_dir}/current.pth" \
    --output-dir "${output_dir}/eval" --auto-resume ${LINEAR_EXTRA_ARGS:-}
