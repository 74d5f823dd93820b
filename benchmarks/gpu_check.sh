#!/usr/bin/env bash
# One prepared GPU check of every registered method (benchmarks/gpu_check.py): fp32 on the GPU equals
# the CPU (first 3 losses within 1e-4), every method trains in fp32, fp16 + GradScaler and bf16, and
# a table of images/s (ResNet-50, 224 px, multi-crop 160 + 3 x 96, batch 64) with channels-last and
# torch.compile off and on, written to benchmarks/results/gpu_check.json. Exit code 1 on a failure.
#
#   bash benchmarks/gpu_check.sh            # one GPU, under 8 minutes
#   bash benchmarks/gpu_check.sh --tiny     # CPU, seconds (CI: ResNet-18 at 32 px, 2 iterations, fp32 + bf16)
#
# Duration of the full mode: ESTIMATED, not yet run on a GPU. 5 settings today (PIC, PIC multi-crop,
# InstDisc, MoCo, SimCLR; a method registered later adds its own). (1) CPU comparison: ResNet-18 at 64 px,
# batch 16, 3 steps per setting on the CPU and the GPU: ~15 s in all. (2) 7 timed runs per setting of 25
# iterations (5 warm-up) of ResNet-50, batch 64: at ~0.1 s (fp32/TF32) and ~0.05 s (fp16, bf16) per
# iteration and view on an H100/H200-class GPU, and 6.4 view-equivalents per round of the 5 settings
# (MoCo's key forward ~ 1/3, SimCLR 2, multi-crop ~1.1), ~70 s of steps, plus ~100 s of model builds
# (the 1.28 M-row PIC table) and first-iteration cuDNN autotuning. (3) torch.compile (fp16 +
# channels-last): a cold compile of the backbone per input shape (224, 160, 96) ~ 1 min each, the other
# methods hit inductor's cache: ~3-4 min. In all ~6-7 minutes; --time-budget (360 s by default) stops
# starting new timed runs after 6 minutes (skipped runs are marked in the table), so it ends in time.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
