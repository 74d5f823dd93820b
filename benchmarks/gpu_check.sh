#!/usr/bin/env bash
# One prepared GPU check of every registered method (benchmarks/gpu_check.py): fp32 on the GPU equals
# the CPU (first 3 losses within 1e-4), every method trains in fp32, fp16 + GradScaler and bf16, and
# a table of images/s (ResNet-50, 224 px, multi-crop 160 + 3 x 96, batch 64) with channels-last and
# torch.compile off and on, written to benchmarks/results/gpu_check.json. Exit code 1 on a failure.
#
#   bash benchmarks/gpu_check.sh            # one GPU, under 8 minutes
#   bash benchmarks/gpu_check.sh --tiny     # CPU, seconds (CI: ResNet-18 at 32 px, 2 iterations, fp32 + bf16)
#
# Duration of the full mode, estimated (not yet run on a GPU): 6 settings today (PIC, PIC multi-crop,
# InstDisc, MoCo, SimCLR, + any method registered later); the CPU comparison (ResNet-18, 64 px, batch
# 16, 3 steps per setting on CPU and GPU) takes ~5 s per setting; 7 timed runs per setting of 25
# iterations (5 warm-up) at ~0.05-0.25 s per iteration on an H100/H200-class GPU -> 35 runs x ~4 s
# eager ~ 2.5 min, plus torch.compile of the ResNet-50 backbone (fp16 + channels-last) for 3 input
# shapes (224, 160, 96; inductor's cache serves the other methods) ~ 1-3 min. About 4-6 minutes in
# all; --time-budget (420 s) stops starting new timed runs after 7 minutes, so the script ends in time
# even when compilation is slow (the skipped runs are marked in the table).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
