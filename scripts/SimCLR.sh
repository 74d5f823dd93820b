#!/usr/bin/env bash
# SimCLR (Chen et al. 2020): MLP head, NT-Xent over the global batch, LARS, SyncBN on GPUs. 2x100: 64.7 top-1.
# Pretraining then linear evaluation with torchrun (recipe of the PIC release, docs: README).
#
#   bash scripts/SimCLR.sh [EPOCHS=100]
#
# Environment: DATA_DIR (./data/ImageNet-Zip; --zip is added when it holds train.zip), NPROC (4 GPUs,
# batch 64 per process = 256 in total), OUTPUT_DIR (./output/SimCLR/epochs-${EPOCHS}), EXTRA_ARGS
# (appended to pretraining), LINEAR_EXTRA_ARGS (appended to linear evaluation), MASTER_PORT (12348).
set -euo pipefail
cd "$(dirname "$0")/.."

epochs=${1:-100}
data_dir=${DATA_DIR:-./data/ImageNet-Zip}
nproc=${NPROC:-4}
output_dir=${OUTPUT_DIR:-./output/SimCLR/epochs-${epochs}}
port=${MASTER_PORT:-12348}
zip=""
if [ -f "${data_dir}/train.zip" ]; then zip="--zip"; fi

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_pretrain.py \
    --data-dir "${data_dir}" ${zip} \
    --model SimCLR --aug SimCLR --crop 0.08 --mlp-head \
    --contrast-temperature 0.1 \
    --optimizer lars --base-learning-rate 0.3 --weight-decay 1e-6 \
    --epochs "${epochs}" \
    --output-dir "${output_dir}" --auto-resume ${EXTRA_ARGS:-}

torchrun --master_port "${port}" --nproc_per_node="${nproc}" main_linear.py \
    --data-dir "${data_dir}" ${zip} \
    --learning-rate 0.1 --weight-decay 1e-6 \
    --pretrained-model "${output_dir}/current.pth" \
    --output-dir "${output_dir}/eval" --auto-resume ${LINEAR_EXTRA_ARGS:-}
