#!/usr/bin/env bash
# The whole job on the CPU in a few minutes, no download: build a synthetic 10-class dataset of
# shapes and textures (300 train images), pretrain PIC (ResNet-18, 32 px, 25 epochs: each image is
# seen 25 times, about 1 min on 2 cores), then kNN of PIC and of a random-init ResNet-18 (the
# baseline PIC must beat) and the linear evaluation of PIC.
#
#   bash scripts/demo.sh
#
# Environment overrides: DEMO_DIR (./output/demo), EPOCHS (25), LINEAR_EPOCHS (8), PER_CLASS (30),
# NUM_WORKERS (2), DEVICE (cpu), EXTRA_ARGS (appended to the pretraining command).
set -euo pipefail
cd "$(dirname "$0")/.."

demo_dir=${DEMO_DIR:-./output/demo}
epochs=${EPOCHS:-25}
linear_epochs=${LINEAR_EPOCHS:-8}
per_class=${PER_CLASS:-30}
workers=${NUM_WORKERS:-2}
device=${DEVICE:-cpu}
data_dir=${demo_dir}/data
pre_dir=${demo_dir}/PIC
eval_dir=${pre_dir}/eval

if [ ! -d "${data_dir}/train" ]; then
    python tools/make_demo_dataset.py --out "${data_dir}" --train-per-class "${per_class}" --val-per-class 20 --size 32
fi

# Small N: lr 0.02 (base 0.08 x 32 / 256); at lr 0.075 the tiny N(0, 0.01) rows of the table thrash
# and the loss stays at ln N. Each image sits in W / S = 4 consecutive windows.
python main_pretrain.py --model PIC --aug SimCLR --crop 0.3 --mlp-head --contrast-temperature 0.2 \
    --use-sliding-window-sampler --window-size 240 --window-stride 60 \
    --data-dir "${data_dir}" --arch resnet18 --image-size 32 --feature-dim 64 \
    --batch-size 32 --base-learning-rate 0.08 --epochs "${epochs}" --warmup-epoch 1 \
    --num-workers "${workers}" --device "${device}" --print-freq 20 --save-freq 8 \
    --output-dir "${pre_dir}" --auto-resume ${EXTRA_ARGS:-}

knn() {  # "kNN top-1 k=20, k=200; cached-feature linear top-1" of main_knn.py's arguments
    python main_knn.py --data-dir "${data_dir}" --image-size 32 --knn-k 20 200 --linear-cached --num-workers 0 \
        --device "${device}" "$@" | tee /dev/stderr | grep -E '^\[(knn\] k=|linear-cached)' \
        | sed -E 's/^\[knn\] (k=[0-9]+) T=[0-9.]*: top1 ([0-9.]+).*/\1: \2/; s/^\[linear-cached\].*top1 ([0-9.]+).*/| cached linear: \1/' \
        | paste -sd' '
}
knn_random=$(knn --random-init --arch resnet18)
knn_pic=$(knn --checkpoint "${pre_dir}/current.pth")

python main_linear.py --pretrained-model "${pre_dir}/current.pth" \
    --data-dir "${data_dir}" --arch resnet18 --image-size 32 --crop 0.3 \
    --total-batch-size 64 --learning-rate 0.4 --epochs "${linear_epochs}" --warmup-epoch 0 \
    --num-workers "${workers}" --device "${device}" --print-freq 10 --output-dir "${eval_dir}" --auto-resume

echo
echo "demo finished"
echo "  pretraining checkpoint : ${pre_dir}/current.pth   (log ${pre_dir}/log.txt, config ${pre_dir}/config.json)"
echo "  linear checkpoint      : ${eval_dir}/current.pth   (log ${eval_dir}/log.txt)"
echo "  top-1, random init     : ${knn_random}   (ResNet-18 baseline, same kNN / linear)"
echo "  top-1, PIC             : ${knn_pic}"
echo "  linear eval, PIC       : $(grep 'linear evaluation done' "${eval_dir}/log.txt" | tail -1 | sed 's/.*done: //')"
echo "  TensorBoard            : tensorboard --logdir ${demo_dir}"
