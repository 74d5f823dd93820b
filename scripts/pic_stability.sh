#!/usr/bin/env bash
# Dense PIC with the sliding window, unstable vs stable, side by side (issue 16; docs/pic_stability.md).
#
#   bash scripts/pic_stability.sh                    # 2 runs of 24 000 views each, CPU
#   EPOCHS=20 OUT=/tmp/pic_stab bash scripts/pic_stability.sh     # the case of the candidate table
#
# The same small case twice: the first N Fashion-MNIST training images (default 2000), a sliding
# window of W=256 images moving by S=64 (every instance is in W/S = 4 consecutive window-epochs, as
# in the 7500-image pilot: W 512, S 128), batch 64, full softmax over all N rows (--pic-num-negative 0),
# ResNet-18 with the small-maxpool stem on 28 px images, base lr LR (x batch / 256), cosine, no warm-up.
#   release:  the PIC release's model. The embeddings collapse into a cap that moves away from the
#             rows of the instances outside the window; instances returning to the window find their
#             rows where the cap was one pass ago: positive cosine < 0, loss above ln N.
#   centred:  the same with --pic-head-center (embeddings centred per batch before the L2
#             normalisation); no cap, positive cosine of returning instances stays positive.
# Both runs log the diagnostics (--pic-diagnostics, train/diag/* scalars). The kNN monitor (k=20,
# memory: the N training images, queries: the first VAL test images) runs 5 times per run.
# Output: $OUT/table.md (kNN peak/final, loss final/max against ln N, positive cosine), $OUT/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=${SRC:-/usr/share/datasets/fashion-mnist}   # IDX files (Debian package dataset-fashion-mnist)
OUT=${OUT:-./output/pic_stability}
N=${N:-2000}
VAL=${VAL:-2000}
WINDOW=${WINDOW:-256}
STRIDE=${STRIDE:-64}
BATCH=${BATCH:-64}
EPOCHS=${EPOCHS:-12}          # plain epochs: each instance is seen EPOCHS times (EPOCHS / (W/S) passes)
LR=${LR:-0.06}
SEED=${SEED:-0}
THREADS=${THREADS:-}          # OMP_NUM_THREADS of the runs (empty: torch's default)
PY=${PY:-python}

DATA=$OUT/data
[ -f "$DATA/val_map.txt" ] || $PY tools/prepare_fashion_mnist.py --src "$SRC" --out "$DATA" --layout zip \
    --limit-train "$N" --limit-val "$VAL"
n_train=$(wc -l < "$DATA/train_map.txt")
loop_epochs=$(( (EPOCHS * n_train + WINDOW - 1) / WINDOW ))

run() {  # name, extra flags
  local name=$1; shift
  [ -f "$OUT/$name/current.pth" ] && grep -q "done: checkpoint" "$OUT/$name/log.txt" && { echo "[pic_stability] $name: done already"; return; }
  echo "[pic_stability] $name: $loop_epochs window-epochs, flags: $*"
  ${THREADS:+env OMP_NUM_THREADS=$THREADS} $PY main_pretrain.py --model PIC --aug SimCLR --mlp-head \
      --base-learning-rate "$LR" --no-shuffle-per-epoch --use-sliding-window-sampler --window-size "$WINDOW" --window-stride "$STRIDE" \
      --pic-num-negative 0 --data-dir "$DATA" --zip --cache-mode full --arch resnet18 --stem small-maxpool \
      --image-size 28 --crop 0.2 --batch-size "$BATCH" --num-workers 1 --epochs "$EPOCHS" --warmup-epoch 0 \
      --save-freq 1000000 --print-freq 4 --seed "$SEED" --device cpu --knn-monitor --knn-k 20 \
      --val-crop-fraction 1.0 --knn-freq "$(( (loop_epochs + 4) / 5 ))" \
      --pic-diagnostics --pic-diagnostics-freq 4 --output-dir "$OUT/$name" "$@" > "$OUT/$name.out" 2>&1 \
    || { echo "[pic_stability] $name failed, see $OUT/$name.out" >&2; exit 1; }
}

run release
run centred --pic-head-center

$PY tools/pic_stability_table.py --runs "$OUT/release" "$OUT/centred" --labels release centred \
    --output "$OUT/table.md"
ln_n=$($PY -c "import math; print(round(math.log($n_train), 2))")
echo "(ln N = $ln_n: a loss above it means the positive is below the average row)"
$PY tools/plot_curves.py --runs "$OUT/release" "$OUT/centred" --labels release centred --panels loss accuracy \
    --scalars 'train/diag/feat_mean_norm' 'train/diag/pos_cos_re*' 'train/diag/*_cos_return' \
    'train/diag/own_cos_*' --hline "loss:$ln_n=ln N" --output "$OUT/curves.png" \
    --title "dense PIC, $n_train images, window $WINDOW/$STRIDE, $EPOCHS epochs"
echo "[pic_stability] table: $OUT/table.md, curves: $OUT/curves.png"
