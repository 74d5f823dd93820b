#!/usr/bin/env bash
# PIC on the full Fashion-MNIST training set (60 000 images) in at most MINUTES (default 90) of
# pretraining on the CPU, then kNN and a cached-feature linear probe with the 60 000 training images as
# memory / training set and the 10 000 test images as queries, against the raw-pixel and random-init
# baselines measured the same way; the kNN monitor's curve and both baselines on one figure.
#
#   bash scripts/fmnist_60k.sh                                    # ~90 min pretraining + ~15 min evaluation
#   MINUTES=15 MONITOR_POINTS=0 NAME=pilot bash scripts/fmnist_60k.sh   # a pilot: same data and baselines
#
# Steps (each skipped when its output exists, so the script can be re-run after an interruption):
#   1. data: tools/prepare_fashion_mnist.py, 60k/10k ImageNet-Zip layout in $OUT/data;
#   2. baselines: main_knn.py --raw-pixels and --random-init (kNN k=20/200 + cached linear) on 60k/10k;
#      the random-init extraction also times one kNN-monitor evaluation (same backbone, same images);
#   3. calibration: CALIBRATE seconds of pretraining with the recipe to measure images/s on this
#      machine now; the epochs are then chosen so that training + the monitor evaluations fit in MINUTES;
#   4. pretraining (hard stop at MINUTES via timeout; a stopped run is evaluated on its last checkpoint);
#   5. main_knn.py on the checkpoint (kNN k=20/200, cached linear probe, 100 epochs);
#   6. $OUT/knn_curve_$NAME.png (monitor curve + baselines) and $OUT/results_$NAME.md.
#
# Recipe (docs/pic_stability.md, "Fashion-MNIST, all 60 000 images", gives the source of each choice):
#   * PIC with the full softmax over the 60k rows (the paper's classifier), --pic-head-center (embeddings
#     centred per batch before the L2 normalisation, docs/pic_stability.md), and the sliding window
#     W 8192 / S 2048: every instance is in W/S = 4 consecutive window-epochs of 64 steps, so its row gets
#     4 updates within 256 steps (the PIC paper's reason for the window); the budget buys ~8 epochs = 2
#     passes over the data (the paper's W/S = 8 would give a single pass; plain epochs in random order
#     left the loss at ln N for the whole first epoch: each row gets one isolated update per epoch);
#   * tau 0.2, 2-layer MLP head, 128-d embedding, SGD momentum 0.9, weight decay 1e-4, cosine schedule,
#     no warm-up (the PIC paper / release, scripts/PIC.sh); base lr LR=0.06, i.e. 0.03 at batch 128
#     (2x the release's lr per image, as for the short schedules of scripts/bench_fashion_mnist.sh);
#   * ResNet-18, STEM=small-maxpool: 3x3 stride-1 conv1 as in SimCLR's CIFAR-10 recipe, max-pool kept
#     (14x14 after the stem at 28 px); the pool-free "small" stem costs ~1.7x more per image;
#   * AUG=InstDisc: random resized crop scale CROP=0.2..1 (InstDisc, MoCo v2, the PIC release), flip,
#     colour jitter 0.4 and random grayscale, no blur (SimCLR's CIFAR-10 recipe drops the blur at small
#     sizes); on grayscale images only brightness and contrast jitter act;
#   * fp32 (O0): CPU bf16 is ~1.4x faster on AMX CPUs, but torch 2.14.1's CPU bf16 convolution backward
#     gave garbage gradients on small inputs (contrast/precision.py).
# Every setting is a variable; EXTRA_FLAGS go to main_pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=${SRC:-/usr/share/datasets/fashion-mnist}   # IDX files (Debian package dataset-fashion-mnist)
OUT=${OUT:-./output/fmnist_60k}
MINUTES=${MINUTES:-90}              # wall-time budget of the pretraining (monitor included)
CALIBRATE=${CALIBRATE:-90}          # seconds of the throughput calibration (0: use EPOCHS as given)
EPOCHS=${EPOCHS:-}                  # plain epochs; empty: from the calibration
SAFETY=${SAFETY:-0.9}               # fraction of the calibrated throughput planned for (load varies)
MONITOR_POINTS=${MONITOR_POINTS:-4} # kNN monitor evaluations during the run (the last one at its end; 0 = none)
NAME=${NAME:-PIC}                   # run folder $OUT/$NAME and result $OUT/results/$NAME.json
ARCH=${ARCH:-resnet18}
STEM=${STEM:-small-maxpool}
AUG=${AUG:-InstDisc}
CROP=${CROP:-0.2}
BATCH=${BATCH:-128}
LR=${LR:-0.06}
TEMPERATURE=${TEMPERATURE:-0.2}
WINDOW=${WINDOW:-8192}              # sliding window W (0: plain epochs, random order)
STRIDE=${STRIDE:-2048}              # its stride S
PIC_FLAGS=${PIC_FLAGS:-"--pic-num-negative 0 --pic-head-center"}
PRECISION=${PRECISION:-"--amp-opt-level O0"}
WORKERS=${WORKERS:-1}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
SEED=${SEED:-0}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PY=${PY:-python}

DATA=$OUT/data
mkdir -p "$OUT/results"
[ -f "$DATA/val_map.txt" ] || $PY tools/prepare_fashion_mnist.py --src "$SRC" --out "$DATA" --layout zip \
    --limit-train 0 --limit-val 0
n_train=$(wc -l < "$DATA/train_map.txt")

eval_args=(--data-dir "$DATA" --zip --cache-mode full --image-size 28 --val-crop-fraction 1.0 --batch-size 256
           --num-workers "$WORKERS" --knn-k 20 200 --linear-cached --linear-epochs "$LINEAR_EPOCHS" --seed "$SEED"
           --device cpu)
run_eval() {  # name, then main_knn.py arguments
  local name=$1; shift
  [ -f "$OUT/results/$name.json" ] || \
    $PY main_knn.py "${eval_args[@]}" --name "$name" --output "$OUT/results/$name.json" "$@"
}
run_eval baseline-raw-pixels --raw-pixels
run_eval baseline-random-init --random-init --arch "$ARCH" --stem "$STEM"
# one kNN-monitor evaluation extracts the same 70k images with the same backbone
monitor_s=$($PY -c "import json; print(int(json.load(open('$OUT/results/baseline-random-init.json'))['extract_seconds']) + 5)")

window=()
window=(--no-use-sliding-window-sampler)
[ "$WINDOW" -gt 0 ] && window=(--use-sliding-window-sampler --window-size "$WINDOW" --window-stride "$STRIDE")
pretrain_args=(--model PIC --aug "$AUG" --mlp-head --contrast-temperature "$TEMPERATURE" --base-learning-rate "$LR"
               "${window[@]}" --no-shuffle-per-epoch $PIC_FLAGS
               --data-dir "$DATA" --zip --cache-mode full --arch "$ARCH" --stem "$STEM" --image-size 28
               --crop "$CROP" --batch-size "$BATCH" --num-workers "$WORKERS" --warmup-epoch 0 $PRECISION
               --save-freq 1000000 --print-freq 50 --seed "$SEED" --device cpu $EXTRA_FLAGS)

dir=$OUT/$NAME
cal=$OUT/calibration_$NAME
if [ -z "$EPOCHS" ]; then
  if [ ! -f "$cal.ips" ]; then
    rm -rf "$cal"
    timeout "$CALIBRATE" $PY main_pretrain.py "${pretrain_args[@]}" --epochs 100 --no-tensorboard \
        --print-freq 10 --output-dir "$cal" > /dev/null 2>&1 || true
    # images/s of the last logged iteration (the log's running average over the epoch so far)
    grep -o "images/s [0-9.]*" "$cal/log.txt" | tail -1 | awk '{print $2}' > "$cal.ips"
  fi
  ips=$(cat "$cal.ips")
  [ -n "$ips" ] || { echo "[fm60k] calibration failed, see $cal/log.txt; set EPOCHS" >&2; exit 1; }
  EPOCHS=$($PY -c "print(max(1, int(${SAFETY} * (${MINUTES} * 60 - 60 - ${MONITOR_POINTS} * ${monitor_s}) * ${ips} / ${n_train})))")
  echo "[fm60k] calibration: ${ips} images/s, one monitor evaluation ~${monitor_s}s -> ${EPOCHS} epochs in ${MINUTES} min"
fi
loop_epochs=$EPOCHS
[ "$WINDOW" -gt 0 ] && loop_epochs=$(( (EPOCHS * n_train + WINDOW - 1) / WINDOW ))
monitor=()
[ "$MONITOR_POINTS" -gt 0 ] && monitor=(--knn-monitor --knn-k 20 --val-crop-fraction 1.0
                                        --knn-freq "$(( (loop_epochs + MONITOR_POINTS - 1) / MONITOR_POINTS ))")

if [ ! -f "$dir/pretrain_seconds" ]; then
  start=$(date +%s)
  status=0
  timeout "$((MINUTES * 60))" $PY main_pretrain.py "${pretrain_args[@]}" --epochs "$EPOCHS" \
      "${monitor[@]}" --output-dir "$dir" || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
    echo "[fm60k] pretraining failed (exit $status), see $dir/log.txt" >&2; exit "$status"
  fi
  [ "$status" -eq 124 ] && echo "[fm60k] stopped after $MINUTES min; evaluating the last checkpoint"
  echo $(( $(date +%s) - start )) > "$dir/pretrain_seconds"
fi
run_eval "$NAME" --checkpoint "$dir/current.pth"

raw=$($PY -c "import json; print(round(json.load(open('$OUT/results/baseline-raw-pixels.json'))['knn']['20']['top1'], 2))")
rnd=$($PY -c "import json; print(round(json.load(open('$OUT/results/baseline-random-init.json'))['knn']['20']['top1'], 2))")
[ "$MONITOR_POINTS" -gt 0 ] && { $PY tools/plot_curves.py --runs "$dir" --labels "$NAME" --panels accuracy \
    --hline "$raw=raw pixels, kNN k=20" --hline "$rnd=random-init $ARCH, kNN k=20" \
    --output "$OUT/knn_curve_$NAME.png" \
    --title "Fashion-MNIST 60k: kNN monitor (k=20, 60k memory, 10k test) of PIC, ${EPOCHS} epochs" ||
    echo "[fm60k] the curve failed, see above; the table follows" >&2; }

$PY - "$OUT" "$NAME" "$EPOCHS" "$(cat "$dir/pretrain_seconds")" <<'EOF'
import json, os, sys
out, run, epochs, seconds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = []
for name in ("baseline-raw-pixels", "baseline-random-init", run):
    r = json.load(open(os.path.join(out, "results", f"{name}.json")))
    rows.append(f"| {name} | {r['knn']['20']['top1']:.2f} | {r['knn']['200']['top1']:.2f} | "
                f"{r['linear']['top1']:.2f} |")
lines = [f"Fashion-MNIST: 60000 train (kNN memory, linear training) / 10000 test images; PIC pretrained "
         f"{epochs} epochs in {seconds} s; weighted kNN (T 0.07); linear: cached features, un-augmented.", "",
         "| features | kNN top-1 k=20 | kNN top-1 k=200 | linear top-1 |", "|---|---|---|---|", *rows]
open(os.path.join(out, f"results_{run}.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "[fm60k] table: $OUT/results_$NAME.md, curve: $OUT/knn_curve_$NAME.png"
