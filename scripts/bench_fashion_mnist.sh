#!/usr/bin/env bash
# Fashion-MNIST benchmark on the CPU: every method pretrained under one budget, then kNN and
# cached-feature linear evaluation, with raw-pixel and random-init baselines, in one markdown table.
# Single seed, the README's current Fashion-MNIST table; for multi-seed, resumable comparisons with
# mean +- std use `python -m contrast.compare` (docs/comparison.md), which reads the same recipe files.
#
#   bash scripts/bench_fashion_mnist.sh                       # defaults: ~45 min in all on 2 free cores
#   BUDGET=600 PRETRAIN_LIMIT=300 TRAIN_LIMIT=300 VAL_LIMIT=200 NUM_NEGATIVE=128 WINDOW=64 STRIDE=16 \
#       LINEAR_EPOCHS=5 STANDARD_LINEAR="" OUT=/tmp/fm_smoke bash scripts/bench_fashion_mnist.sh   # smoke run
#
# Data: pretraining uses the first PRETRAIN_LIMIT training images; kNN memory and the linear
# classifiers use the first TRAIN_LIMIT (default 20000) and are scored on the first VAL_LIMIT
# test images (default all 10000). Images stay at 28 px (evaluation: --val-crop-fraction 1.0).
# Budget: BUDGET training views per method (BUDGET_UNIT=views, the PIC paper's "#aug/iter x #epoch":
# MoCo v2 and SimCLR see 2 views per image, PIC multi-crop's 1 + 3 small crops count as 2, as the
# PIC README says they cost about the same), so plain epochs = ceil(BUDGET / (PRETRAIN_LIMIT x views));
# BUDGET_UNIT=images gives every method the same number of images instead. (PIC's sliding window
# maps plain epochs to window-epochs, ceil(e x N / WINDOW), so it may see up to one window more.)
# Every run has the kNN monitor (k=20, MONITOR_POINTS times per run): its memory is the pretraining
# images, its queries the first MONITOR_VAL test images (0 = no monitor); the pretraining seconds
# include it. MAX_MINUTES stops a pretraining run by wall time; it is then evaluated on its last per-epoch
# checkpoint, and the table shows the epochs and images it reached.
# Optimisation: the SGD methods share base lr LR (0.06 = 2x the papers' 0.03, for the short
# schedule), SimCLR uses LARS at its paper's 0.3; MoCo's key encoder momentum is 0.99 instead of
# 0.999 (a 0.999 average barely moves in a few hundred steps). PIC uses recent negative sampling
# (PIC_NEGATIVE): with the full softmax, rows of instances outside the window only get pushed away
# and, late in long runs here, end up anti-aligned with their own images (the cause, and the dense fix
# EXTRA_FLAGS="--pic-head-center" with PIC_NEGATIVE=0: docs/pic_stability.md). STANDARD_LINEAR names the methods
# whose checkpoint also gets the standard linear protocol (main_linear.py, augmented images,
# STANDARD_EPOCHS epochs on the first STANDARD_LIMIT training images, scored on the first
# STANDARD_VAL_LIMIT test images) next to the cached-feature one on the same images.
# Any other registered method X (METHODS="... X") trains with `--config scripts/configs/fmnist/X.yaml`,
# its recipe at this scale with the reason for each value, or with its full recipe (`--model X`) when
# there is no such file; the budget counts its views as tools/recipe_views.py reports them.
# Every setting below is a variable; EXTRA_FLAGS go to every main_pretrain.py run.
# Results: $OUT/results.md (one JSON per row in $OUT/results/), $OUT/linear_protocols.md, $OUT/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=${SRC:-/usr/share/datasets/fashion-mnist}   # IDX files (Debian package dataset-fashion-mnist)
OUT=${OUT:-./output/bench_fmnist}
TRAIN_LIMIT=${TRAIN_LIMIT:-20000}       # kNN memory / linear training images (0 = all 60000)
VAL_LIMIT=${VAL_LIMIT:-0}               # test images evaluated (0 = all 10000)
PRETRAIN_LIMIT=${PRETRAIN_LIMIT:-7500}  # pretraining images (the first ones of the training set)
BUDGET=${BUDGET:-150000}                # views (or images) per method
BUDGET_UNIT=${BUDGET_UNIT:-views}       # views | images
MAX_MINUTES=${MAX_MINUTES:-20}          # wall-time cap per pretraining run
METHODS=${METHODS:-"PIC PIC-multicrop InstDisc MoCov2 SimCLR"}
ARCH=${ARCH:-resnet18}
STEM=${STEM:-small-maxpool}             # --stem: small-maxpool (3x3 conv1 + max-pool), small or imagenet
IMAGE_SIZE=${IMAGE_SIZE:-28}
IMAGE_SIZE2=${IMAGE_SIZE2:-14}          # multi-crop small crops
CROP=${CROP:-0.2}                       # minimum RandomResizedCrop scale
BATCH=${BATCH:-128}
LR=${LR:-0.06}                          # base lr of the SGD methods (x BATCH / 256)
WORKERS=${WORKERS:-1}
NUM_NEGATIVE=${NUM_NEGATIVE:-4096}      # InstDisc negatives / MoCo queue (must stay below PRETRAIN_LIMIT)
PIC_NEGATIVE=${PIC_NEGATIVE:-1024}      # PIC: recent negative sampling with K negatives (0 = full softmax)
WINDOW=${WINDOW:-512}                   # PIC sliding window: W / S = 4 visits per instance, 4 steps apart
STRIDE=${STRIDE:-128}
MONITOR_VAL=${MONITOR_VAL:-2000}        # test images of the kNN monitor during pretraining (0 = off)
MONITOR_POINTS=${MONITOR_POINTS:-4}     # monitor evaluations per run (and one at its end)
KNN_K=${KNN_K:-"20 200"}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
LINEAR_COPIES=${LINEAR_COPIES:-0}       # 0: un-augmented train features; K: K NULL-augmented copies
STANDARD_LINEAR=${STANDARD_LINEAR-PIC} # methods also evaluated with the standard linear protocol
STANDARD_LIMIT=${STANDARD_LIMIT:-5000}   # training images of the protocol comparison
STANDARD_VAL_LIMIT=${STANDARD_VAL_LIMIT:-2000}
STANDARD_EPOCHS=${STANDARD_EPOCHS:-5}
STANDARD_BATCH=${STANDARD_BATCH:-256}
SEED=${SEED:-0}
EXTRA_FLAGS=${EXTRA_FLAGS:-}            # e.g. "--channels-last"
PY=${PY:-python}

case $BUDGET_UNIT in views|images) ;; *) echo "[bench] BUDGET_UNIT must be views or images" >&2; exit 2 ;; esac

prepare() {  # output folder, train limit, val limit
  [ -f "$1/val_map.txt" ] || $PY tools/prepare_fashion_mnist.py --src "$SRC" --out "$1" --layout zip \
      --limit-train "$2" --limit-val "$3"
}
mkdir -p "$OUT/results"
DATA=$OUT/data; prepare "$DATA" "$TRAIN_LIMIT" "$VAL_LIMIT"
PRETRAIN_DATA=$OUT/data_pretrain; prepare "$PRETRAIN_DATA" "$PRETRAIN_LIMIT" "$((MONITOR_VAL > 0 ? MONITOR_VAL : 1))"
n_train=$(wc -l < "$PRETRAIN_DATA/train_map.txt")

eval_args=(--data-dir "$DATA" --zip --cache-mode full --image-size "$IMAGE_SIZE" --val-crop-fraction 1.0
           --batch-size 256 --num-workers "$WORKERS" --knn-k $KNN_K --linear-cached --linear-epochs "$LINEAR_EPOCHS"
           --linear-aug-copies "$LINEAR_COPIES" --seed "$SEED" --device cpu)

run_eval() {  # name, then main_knn.py arguments
  local name=$1; shift
  [ -f "$OUT/results/$name.json" ] && { echo "[bench] $name: evaluated already"; return; }
  $PY main_knn.py "${eval_args[@]}" --name "$name" --output "$OUT/results/$name.json" "$@"
}

run_eval "baseline-raw-pixels" --raw-pixels
run_eval "baseline-random-init" --random-init --arch "$ARCH" --stem "$STEM"

for method in $METHODS; do
  views=1
  windowed=0
  crop=(--crop "$CROP")
  warmup=(--warmup-epoch 0)
  case $method in
    PIC)           flags=(--model PIC --aug SimCLR --mlp-head --base-learning-rate "$LR" --no-shuffle-per-epoch
                          --use-sliding-window-sampler --window-size "$WINDOW" --window-stride "$STRIDE"
                          --pic-num-negative "$PIC_NEGATIVE"); windowed=1 ;;
    PIC-multicrop) flags=(--model PIC --aug MultiCrop --mlp-head --base-learning-rate "$LR" --image-size2 "$IMAGE_SIZE2"
                          --no-shuffle-per-epoch --use-sliding-window-sampler --window-size "$WINDOW" --window-stride "$STRIDE"
                          --pic-num-negative "$PIC_NEGATIVE"); views=2
                   windowed=1
                   crop=(--crop 0.08 --crop2 "$CROP") ;;  # large crop (CROP, 1), small crops (0.08, CROP)
    InstDisc)      flags=(--model InstDisc --aug InstDisc --no-mlp-head --base-learning-rate "$LR"
                          --contrast-num-negative "$NUM_NEGATIVE") ;;
    MoCov2)        flags=(--model MoCov2 --aug MoCov2 --mlp-head --base-learning-rate "$LR" --contrast-temperature 0.2
                          --contrast-momentum 0.99 --contrast-num-negative "$NUM_NEGATIVE"); views=2 ;;
    SimCLR)        flags=(--model SimCLR --aug SimCLR --mlp-head --optimizer lars --base-learning-rate 0.3
                          --weight-decay 1e-6); views=2 ;;
    *)             cfg=scripts/configs/fmnist/$method.yaml   # any other method: its small-scale recipe file
                   if [ -f "$cfg" ]; then flags=(--config "$cfg"); else flags=(--model "$method"); fi
                   read -r views windowed < <($PY tools/recipe_views.py "${flags[@]}")
                   crop=(); warmup=() ;;
  esac
  per_epoch=$n_train
  [ "$BUDGET_UNIT" = views ] && per_epoch=$((n_train * views))
  epochs=$(( (BUDGET + per_epoch - 1) / per_epoch ))
  loop_epochs=$epochs
  [ "$windowed" = 1 ] && loop_epochs=$(( (epochs * n_train + WINDOW - 1) / WINDOW ))
  monitor=()
  [ "$MONITOR_VAL" -gt 0 ] && monitor=(--knn-monitor --knn-k 20 --val-crop-fraction 1.0
                                       --knn-freq "$(( (loop_epochs + MONITOR_POINTS - 1) / MONITOR_POINTS ))")
  dir="$OUT/$method"
  if [ ! -f "$dir/pretrain_seconds" ]; then
    start=$(date +%s)
    status=0
    timeout "$((MAX_MINUTES * 60))" $PY main_pretrain.py "${flags[@]}" --data-dir "$PRETRAIN_DATA" --zip \
        --cache-mode full --arch "$ARCH" --stem "$STEM" --image-size "$IMAGE_SIZE" "${crop[@]}" \
        --batch-size "$BATCH" --num-workers "$WORKERS" \
        --epochs "$epochs" "${warmup[@]}" --save-freq 1000000 --print-freq 20 --seed "$SEED" --device cpu \
        "${monitor[@]}" --output-dir "$dir" $EXTRA_FLAGS || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
      echo "[bench] $method: pretraining failed (exit $status), see $dir/log.txt" >&2; exit "$status"
    fi
    [ "$status" -eq 124 ] && echo "[bench] $method: stopped after $MAX_MINUTES min, evaluating its last checkpoint"
    echo $(( $(date +%s) - start )) > "$dir/pretrain_seconds"
  fi
  run_eval "$method" --checkpoint "$dir/current.pth"
done

# Standard linear protocol (augmented images through the frozen backbone, main_linear.py) next to the
# cached-feature one, on the same checkpoint and the same STANDARD_LIMIT training images.
if [ -n "$STANDARD_LINEAR" ]; then
  STD_DATA=$OUT/data_standard; prepare "$STD_DATA" "$STANDARD_LIMIT" "$STANDARD_VAL_LIMIT"
  table="$OUT/linear_protocols.md"
  n_std=$(wc -l < "$STD_DATA/train_map.txt"); n_std_val=$(wc -l < "$STD_DATA/val_map.txt")
  { echo "Linear evaluation of the same checkpoints on $n_std training / $n_std_val test images."
    echo ""
    echo "| method | cached features: top-1 | s | standard protocol, $STANDARD_EPOCHS epochs: top-1 (last) | best | s |"
    echo "|---|---|---|---|---|---|"; } > "$table"
  for method in $STANDARD_LINEAR; do
    ckpt="$OUT/$method/current.pth"
    [ -f "$ckpt" ] || { echo "[bench] STANDARD_LINEAR: $ckpt does not exist" >&2; exit 2; }
    t0=$(date +%s)
    $PY main_knn.py --data-dir "$STD_DATA" --zip --cache-mode full --image-size "$IMAGE_SIZE" --val-crop-fraction 1.0 \
        --batch-size 256 --num-workers "$WORKERS" --knn-k 20 --linear-cached --linear-epochs "$LINEAR_EPOCHS" \
        --linear-aug-copies "$LINEAR_COPIES" --seed "$SEED" --device cpu --checkpoint "$ckpt" --name "$method" \
        --output "$OUT/linear_$method-cached.json"
    t1=$(date +%s)
    $PY main_linear.py --pretrained-model "$ckpt" --arch "$ARCH" --stem "$STEM" --data-dir "$STD_DATA" --zip \
        --cache-mode full --image-size "$IMAGE_SIZE" --val-crop-fraction 1.0 --epochs "$STANDARD_EPOCHS" \
        --warmup-epoch 0 --total-batch-size "$STANDARD_BATCH" \
        --num-workers "$WORKERS" --print-freq 20 --seed "$SEED" --device cpu --no-tensorboard \
        --output-dir "$OUT/linear_$method-standard"
    t2=$(date +%s)
    $PY - "$OUT/linear_$method-cached.json" "$OUT/linear_$method-standard/log.txt" "$method" \
        "$((t1 - t0))" "$((t2 - t1))" >> "$table" <<'EOF'
import json, re, sys
cached, log, method, s_cached, s_standard = sys.argv[1:]
done = [l for l in open(log) if "linear evaluation done" in l][-1]
last, best = re.search(r"last top-1 ([\d.]+)", done).group(1), re.search(r"best top-1 ([\d.]+)", done).group(1)
print(f"| {method} | {json.load(open(cached))['linear']['top1']:.2f} | {s_cached} | {last} | {best} | {s_standard} |")
EOF
  done
  cat "$table"
fi

$PY tools/plot_curves.py --runs $(for m in $METHODS; do echo "$OUT/$m"; done) --labels $METHODS \
    --x progress --output "$OUT/curves.png" --title "Fashion-MNIST, $ARCH $STEM stem, $BUDGET $BUDGET_UNIT"

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
