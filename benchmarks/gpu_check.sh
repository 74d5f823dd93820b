#!/usr/bin/env bash
# The first-GPU-run check (benchmarks/gpu_check.py): the real entry scripts as subprocesses on a
# generated image folder, with DataLoader workers and the device augmentation stage. main_pretrain.py
# for every registered method in fp32 (+ kNN monitor), fp16 + GradScaler (save, SIGKILL, --auto-resume)
# and bf16; main_linear.py and main_knn.py on the resumed checkpoint; with 2+ GPUs every method on 2
# NCCL processes (one killed and resumed on 1 GPU). Prints a markdown table (status, images/s,
# GradScaler-skipped steps, peak memory), writes JSON; exit code 1 when a row failed or was not run.
#
#   bash benchmarks/gpu_check.sh                 # one GPU: ResNet-50 at 64 px, batch 32, within 8 minutes
#   bash benchmarks/gpu_check.sh --tiny          # CPU: ResNet-18 at 32 px, batch 16, every method once (CI: --methods PIC DINO)
#   bash benchmarks/gpu_check.sh --workdir /tmp/gc      # keep the data, logs and the evaluated checkpoint there
#
# Time of the full mode: ESTIMATED, not yet run on a GPU. 30 processes on one GPU (7 settings: PIC,
# PIC multi-crop, InstDisc, MoCo, SimCLR, BYOL, SwAV; a method registered later adds its own): 7 x 3
# pretraining runs of 20-30 steps plus 7 resumes, main_linear.py, main_knn.py. Each process is mostly
# start-up (import, CUDA context, workers, cuDNN autotuning) and 2-4 checkpoint saves, ~8-12 s on an
# H100-class machine: ~4-6 minutes. --time-budget (480 s; +180 s with 2+ GPUs for the 2-process rows)
# is enforced: a row whose estimated time (mean of the processes timed so far) no longer fits is NOT
# RUN, and one still running at the deadline is killed; both count as failures. --tiny: 13 processes,
# 87-96 s of CPU time (user + sys, two runs) on the shared 2-core development machine, ~4 min 50 s wall
# at load average 5-9.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
