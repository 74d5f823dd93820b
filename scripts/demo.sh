#!/usr/bin/env bash
# The whole job on the CPU in a few minutes, no download: build a synthetic 10-class dataset of
# coloured shapes and textures, pretrain PIC (ResNet-18, 32 px), then linear evaluation.
#
#   bash scripts/demo.sh
#
# Environment overrides: DEMO_DIR (./output/demo), EPOCHS (8), LINEAR_EPOCHS (8), PER_CLASS (60),
# NUM_WORKERS (2), DEVICE (cpu), EXTRA_ARGS (appended to the pretraining command).
set -euo pipefail
cd "$(dirname "$0")/.."

demo_dir=${DEMO_DIR:-./output/demo}
epochs=${EPOCHS:-8}
linear_epochs=${LINEAR_EPOCHS:-8}
per_class=${PER_CLASS:-60}
workers=${NUM_WORKERS:-2}
device=${DEVICE:-cpu}
data_dir=${demo_dir}/data
pre_dir=${demo_dir}/PIC
eval_dir=${pre_dir}/eval

if [ ! -d "${data_dir}/train" ]; then
    python tools/make_demo_dataset.py --out "${data_dir}" --train-per-class "${per_class}" --val-per-class 20 --size 32
fi

python main_pretrain.py --model PIC --aug SimCLR --crop 0.2 --mlp-head --contrast-temperature 0.2 \
    --use-sliding-window-sampler --window-size 256 --window-stride 64 \
    --data-dir "${data_dir}" --arch resnet18 --image-size 32 --feature-dim 64 \
    --batch-size 64 --base-learning-rate 0.3 --epochs "${epochs}" --warmup-epoch 1 \
    --num-workers "${workers}" --device "${device}" --print-freq 10 --save-freq 4 \
    --output-dir "${pre_dir}" --auto-resume ${EXTRA_ARGS:-}

python main_linear.py --pretrained-model "${pre_dir}/current.pth" \
    --data-dir "${data_dir}" --arch resnet18 --image-size 32 --crop 0.3 \
    --total-batch-size 64 --learning-rate 0.4 --epochs "${linear_epochs}" --warmup-epoch 0 \
    --num-workers "${workers}" --device "${device}" --print-freq 10 --output-dir "${eval_dir}" --auto-resume

echo
echo "demo finished"
echo "  pretraining checkpoint : ${pre_dir}/current.pth   (log ${pre_dir}/log.txt, config ${pre_dir}/config.json)"
echo "  linear checkpoint      : ${eval_dir}/current.pth   (log ${eval_dir}/log.txt)"
echo "  final accuracy         : $(grep 'linear evaluation done' "${eval_dir}/log.txt" | tail -1 | sed 's/.*done: //')"
echo "  TensorBoard            : tensorboard --logdir ${demo_dir}"
