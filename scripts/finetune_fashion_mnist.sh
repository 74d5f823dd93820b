#!/usr/bin/env bash
# Semi-supervised fine-tuning on Fashion-MNIST: a pretraining checkpoint and a randomly initialised
# network, each fine-tuned end to end (main_linear.py --finetune, SimCLR's protocol, docs/evaluation.md)
# on FRACTIONS of the training labels (class-balanced, drawn from SEED), with the 28 px settings of
# scripts/bench_fashion_mnist.sh; then the linear probe, the cached probe and kNN of the checkpoint.
#
#   CKPT=/tmp/fm_bench/PIC/current.pth bash scripts/finetune_fashion_mnist.sh
#   CKPT=... FRACTIONS="0.01" EPOCHS_1=2 TRAIN_LIMIT=2000 VAL_LIMIT=500 OUT=/tmp/ft_smoke \
#       bash scripts/finetune_fashion_mnist.sh                                        # a smoke run
#
# Writes $OUT/<name>/ (one run folder each: config.json, log.txt, label_subset.txt, checkpoints) and
# $OUT/results.md (top-1 last / best and seconds per run). Every setting is a variable; EXTRA_FLAGS go
# to every main_linear.py run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
CKPT=${CKPT:?set CKPT to a pretraining checkpoint (e.g. OUT/PIC/current.pth of bench_fashion_mnist.sh)}
SRC=${SRC:-data/fashion-mnist-raw}      # tools/prepare_fashion_mnist.py --src
OUT=${OUT:-/tmp/fm_finetune}
TRAIN_LIMIT=${TRAIN_LIMIT:-0}           # training images (0 = all 60000)
VAL_LIMIT=${VAL_LIMIT:-0}               # test images (0 = all 10000)
FRACTIONS=${FRACTIONS:-"1.0 0.1 0.01"}  # label fractions (1.0: every label)
EPOCHS_1=${EPOCHS_1:-60}                # SimCLR: 60 epochs on 1 % of the labels
EPOCHS_10=${EPOCHS_10:-30}              # SimCLR: 30 epochs on 10 %
EPOCHS_100=${EPOCHS_100:-30}            # 100 %: as 10 %
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
ARCH=${ARCH:-resnet18}
STEM=${STEM:-small-maxpool}
IMAGE_SIZE=${IMAGE_SIZE:-28}
BATCH=${BATCH:-256}                     # total batch; lr = 0.05 x BATCH / 256 (SimCLR)
WORKERS=${WORKERS:-1}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cpu}
EXTRA_FLAGS=${EXTRA_FLAGS:-}

DATA=$OUT/data
[ -f "$DATA/val_map.txt" ] || $PY tools/prepare_fashion_mnist.py --src "$SRC" --out "$DATA" --layout zip \
    --limit-train "$TRAIN_LIMIT" --limit-val "$VAL_LIMIT"
common=(--data-dir "$DATA" --zip --cache-mode full --arch "$ARCH" --stem "$STEM" --image-size "$IMAGE_SIZE"
        --val-crop-fraction 1.0 --total-batch-size "$BATCH" --num-workers "$WORKERS" --seed "$SEED"
        --device "$DEVICE" --print-freq 50 --no-tensorboard)
table=$OUT/results.md
mkdir -p "$OUT"
{ echo "Fashion-MNIST, $ARCH $STEM stem, $IMAGE_SIZE px; checkpoint $CKPT"; echo ""
  echo "| run | labels | epochs | top-1 (last) | best | s |"; echo "|---|---|---|---|---|---|"; } > "$table"

run() {  # name, labels, epochs, then main_linear.py arguments
  local name=$1 labels=$2 epochs=$3; shift 3
  local t0; t0=$(date +%s)
  # shellcheck disable=SC2086
  $PY main_linear.py "${common[@]}" --epochs "$epochs" --output-dir "$OUT/$name" --auto-resume "$@" $EXTRA_FLAGS
  local line; line=$(grep "evaluation done" "$OUT/$name/log.txt" | tail -n 1)
  local last best
  last=$(sed -E 's/.*last top-1 ([0-9.]+).*/\1/' <<< "$line")
  best=$(sed -E 's/.*best top-1 ([0-9.]+).*/\1/' <<< "$line")
  echo "| $name | $labels | $epochs | $last | $best | $(( $(date +%s) - t0 )) |" >> "$table"
}

for fraction in $FRACTIONS; do
  case $fraction in
    1|1.0) epochs=$EPOCHS_100; subset=() ;;
    0.1)   epochs=$EPOCHS_10; subset=(--label-fraction "$fraction") ;;
    *)     epochs=$EPOCHS_1; subset=(--label-fraction "$fraction") ;;
  esac
  # a batch no larger than the labelled images (1 % of a 5 000-image TRAIN_LIMIT is 50 images)
  batch=$(awk -v n="$(( TRAIN_LIMIT > 0 ? TRAIN_LIMIT : 60000 ))" -v f="$fraction" -v b="$BATCH" 'BEGIN { m = int(n * f); print (m < b ? m : b) }')
  subset+=(--total-batch-size "$batch")
  run "finetune-$fraction" "$fraction" "$epochs" --finetune --pretrained-model "$CKPT" "${subset[@]}"
  run "random-init-$fraction" "$fraction" "$epochs" --finetune --random-init "${subset[@]}"
done
run "linear" 1.0 "$LINEAR_EPOCHS" --pretrained-model "$CKPT" --warmup-epoch 0
t0=$(date +%s)
$PY main_knn.py --data-dir "$DATA" --zip --cache-mode full --image-size "$IMAGE_SIZE" --val-crop-fraction 1.0 \
    --batch-size 256 --num-workers "$WORKERS" --knn-k 20 200 --linear-cached --linear-epochs "$LINEAR_EPOCHS" \
    --seed "$SEED" --device "$DEVICE" --checkpoint "$CKPT" --output "$OUT/knn.json"
$PY - "$OUT/knn.json" "$(( $(date +%s) - t0 ))" "$LINEAR_EPOCHS" >> "$table" <<'EOF'
import json, sys
r, seconds, epochs = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
for k, acc in r["knn"].items():
    print(f"| kNN k={k} | 1.0 | - | {acc['top1']:.2f} | - | {seconds} (with the cached probe) |")
print(f"| linear-cached | 1.0 | {epochs} | {r['linear']['top1']:.2f} | - | {r['linear']['seconds']:.0f} |")
EOF
echo "[finetune] $table, kNN and cached probe: $OUT/knn.json"
cat "$table"
