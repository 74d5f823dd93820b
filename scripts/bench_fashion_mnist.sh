#!/usr/bin/env bash
# Fashion-MNIST benchmark on the CPU: every method pretrained under one budget, then kNN and
# cached-feature linear evaluation, with raw-pixel and random-init baselines, in one markdown table.
#
#   bash scripts/bench_fashion_mnist.sh                       # defaults: ~20 min per method on 2 free cores
#   BUDGET=600 TRAIN_LIMIT=300 VAL_LIMIT=200 NUM_NEGATIVE=128 WINDOW=256 STRIDE=64 LINEAR_EPOCHS=5 \
#       OUT=/tmp/fm_smoke bash scripts/bench_fashion_mnist.sh                          # smoke run
#
# Budget: BUDGET training views per method (BUDGET_UNIT=views, the PIC paper's "#aug/iter x #epoch":
# MoCo v2 and SimCLR see 2 views per image, PIC multi-crop's 1 + 3 small crops count as 2, as the
# PIC README says they cost about the same), so plain epochs = ceil(BUDGET / (TRAIN_LIMIT x views));
# BUDGET_UNIT=images gives every method the same number of images instead. (PIC's sliding window
# maps plain epochs to window-epochs, ceil(e x N / WINDOW), so it may see up to one window more.)
# MAX_MINUTES stops a pretraining run by wall time; it is then evaluated on its last per-epoch
# checkpoint, and the table shows the epochs and images it reached. Measured on this shared 2-core
# machine: ResNet-18 small stem at 32 px pretrains at ~5 images/s per view under heavy load; expect
# ~20/s on 2 free cores, so the default 20000 views take ~17 min per method, evaluation ~3 min more.
# Every setting below is a variable; EXTRA_FLAGS go to every main_pretrain.py run. Results:
# $OUT/results.md (one JSON per row in $OUT/results/) and $OUT/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=${SRC:-/usr/share/datasets/fashion-mnist}   # IDX files (Debian package dataset-fashion-mnist)
OUT=${OUT:-./output/bench_fmnist}
DATA=${DATA:-$OUT/data}
TRAIN_LIMIT=${TRAIN_LIMIT:-10000}       # training images (pretraining set and kNN memory)
VAL_LIMIT=${VAL_LIMIT:-2000}            # test images evaluated
BUDGET=${BUDGET:-20000}                 # views (or images) per method
BUDGET_UNIT=${BUDGET_UNIT:-views}       # views | images
MAX_MINUTES=${MAX_MINUTES:-20}          # wall-time cap per pretraining run
METHODS=${METHODS:-"PIC PIC-multicrop InstDisc MoCov2 SimCLR"}
ARCH=${ARCH:-resnet18}
IMAGE_SIZE=${IMAGE_SIZE:-32}            # 28 px images resized (small stem: 3x3 conv1, no max-pool)
IMAGE_SIZE2=${IMAGE_SIZE2:-16}          # multi-crop small crops
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-1}
NUM_NEGATIVE=${NUM_NEGATIVE:-4096}      # InstDisc negatives / MoCo queue (must stay below TRAIN_LIMIT)
WINDOW=${WINDOW:-4096}                  # PIC sliding window (ImageNet: 131072 of 1.28M)
STRIDE=${STRIDE:-512}
KNN_K=${KNN_K:-"20 200"}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
LINEAR_COPIES=${LINEAR_COPIES:-0}       # 0: un-augmented train features; K: K NULL-augmented copies
SEED=${SEED:-0}
EXTRA_FLAGS=${EXTRA_FLAGS:-}            # e.g. "--base-learning-rate 0.06"
PY=${PY:-python}

case $BUDGET_UNIT in views|images) ;; *) echo "[bench] BUDGET_UNIT must be views or images" >&2; exit 2 ;; esac

mkdir -p "$OUT/results"
if [ ! -f "$DATA/val_map.txt" ]; then
  $PY tools/prepare_fashion_mnist.py --src "$SRC" --out "$DATA" --layout zip \
      --limit-train "$TRAIN_LIMIT" --limit-val "$VAL_LIMIT"
fi
n_train=$(wc -l < "$DATA/train_map.txt")

eval_args=(--data-dir "$DATA" --zip --cache-mode full --image-size "$IMAGE_SIZE" --batch-size 256
           --num-workers "$WORKERS" --knn-k $KNN_K --linear-cached --linear-epochs "$LINEAR_EPOCHS"
           --linear-aug-copies "$LINEAR_COPIES" --seed "$SEED" --device cpu)

run_eval() {  # name, then main_knn.py arguments
  local name=$1; shift
  [ -f "$OUT/results/$name.json" ] && { echo "[bench] $name: evaluated already"; return; }
  $PY main_knn.py "${eval_args[@]}" --name "$name" --output "$OUT/results/$name.json" "$@"
}

run_eval "baseline-raw-pixels" --raw-pixels
run_eval "baseline-random-init" --random-init --arch "$ARCH" --small-stem

for method in $METHODS; do
  views=1
  case $method in
    PIC)           flags=(--model PIC --aug SimCLR --mlp-head --use-sliding-window-sampler
                          --window-size "$WINDOW" --window-stride "$STRIDE") ;;
    PIC-multicrop) flags=(--model PIC --aug MultiCrop --mlp-head --image-size2 "$IMAGE_SIZE2"
                          --use-sliding-window-sampler --window-size "$WINDOW" --window-stride "$STRIDE"); views=2 ;;
    InstDisc)      flags=(--model InstDisc --aug InstDisc --crop 0.2 --contrast-num-negative "$NUM_NEGATIVE") ;;
    MoCov2)        flags=(--model MoCo --aug MoCov2 --crop 0.2 --mlp-head --contrast-temperature 0.2
                          --contrast-num-negative "$NUM_NEGATIVE"); views=2 ;;
    SimCLR)        flags=(--model SimCLR --aug SimCLR --mlp-head --optimizer lars --base-learning-rate 0.3
                          --weight-decay 1e-6); views=2 ;;
    *) echo "[bench] unknown method '$method' in METHODS" >&2; exit 2 ;;
  esac
  per_epoch=$n_train
  [ "$BUDGET_UNIT" = views ] && per_epoch=$((n_train * views))
  epochs=$(( (BUDGET + per_epoch - 1) / per_epoch ))
  dir="$OUT/$method"
  if [ ! -f "$dir/pretrain_seconds" ]; then
    start=$(date +%s)
    status=0
    timeout "$((MAX_MINUTES * 60))" $PY main_pretrain.py "${flags[@]}" --data-dir "$DATA" --zip --cache-mode full \
        --arch "$ARCH" --small-stem --image-size "$IMAGE_SIZE" --batch-size "$BATCH" --num-workers "$WORKERS" \
        --epochs "$epochs" --warmup-epoch 0 --save-freq 1000000 --print-freq 20 --seed "$SEED" --device cpu \
        --output-dir "$dir" $EXTRA_FLAGS || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
      echo "[bench] $method: pretraining failed (exit $status), see $dir/log.txt" >&2; exit "$status"
    fi
    [ "$status" -eq 124 ] && echo "[bench] $method: stopped after $MAX_MINUTES min, evaluating its last checkpoint"
    echo $(( $(date +%s) - start )) > "$dir/pretrain_seconds"
  fi
  run_eval "$method" --checkpoint "$dir/current.pth"
done

$PY tools/plot_curves.py --runs $(for m in $METHODS; do echo "$OUT/$m"; done) --labels $METHODS \
    --output "$OUT/curves.png" --title "Fashion-MNIST, $ARCH small stem, $BUDGET $BUDGET_UNIT"

$PY - "$OUT" "$BUDGET" "$BUDGET_UNIT" "$KNN_K" "$LINEAR_EPOCHS" <<'EOF'
import json, os, sys
out, budget, unit, ks, lin_epochs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5]
results = [json.load(open(os.path.join(out, "results", n))) for n in sorted(os.listdir(os.path.join(out, "results")))]
results.sort(key=lambda r: (not r["name"].startswith("baseline"), r["name"]))
rows = []
for r in results:
    seconds = os.path.join(out, r["name"], "pretrain_seconds")
    epochs = f"{r['epoch']}/{r.get('loop_epochs') or '?'}" if r.get("epoch") is not None else "-"
    lin = r.get("linear", {})
    rows.append([r["name"], epochs, r.get("images_seen", "-"),
                 open(seconds).read().strip() if os.path.isfile(seconds) else "-",
                 *[f"{r['knn'][k]['top1']:.2f}" for k in ks],
                 f"{lin.get('top1', float('nan')):.2f}", f"{lin.get('top5', float('nan')):.2f}"])
head = ["method", "epochs done/planned", "images seen", "pretrain s", *[f"kNN top-1 k={k}" for k in ks],
        "linear top-1", "linear top-5"]
r0 = results[0]
lines = [f"Fashion-MNIST: {r0['num_train']} train / {r0['num_val']} test images; budget {budget} {unit} per "
         f"method; weighted kNN (T={r0['knn_t']}); linear: {lin_epochs} epochs on cached features.", "",
         "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "[bench] table: $OUT/results.md, curves: $OUT/curves.png"
