# Shared by scripts/<METHOD>.sh: pretraining then linear evaluation, each launched with
# `python -m contrast.launch` (torchrun's flags and agent; an error ends in one line).
#
#   run_recipe NAME EPOCHS PRETRAIN_FLAGS... [-- LINEAR_FLAGS...]
#
# Environment: DATA_DIR (./data/ImageNet-Zip; --zip is added when it holds train.zip), NPROC (4
# processes, batch 64 each = 256 in total), OUTPUT_DIR (./output/NAME/epochs-EPOCHS), EXTRA_ARGS
# (appended to pretraining), LINEAR_EXTRA_ARGS (appended to linear evaluation), MASTER_PORT (12348),
# PYTHON (python). Linear evaluation takes the arch, stem, image size and evaluation crop from the
# pretraining checkpoint, so EXTRA_ARGS="--arch resnet18 --image-size 32" needs no linear counterpart.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run_recipe() {
    local name=$1 epochs=$2
    shift 2
    local pretrain=() linear=() target=pretrain arg
    for arg in "$@"; do
        if [ "${arg}" = "--" ]; then target=linear
        elif [ "${target}" = pretrain ]; then pretrain+=("${arg}")
        else linear+=("${arg}"); fi
    done
    local data_dir=${DATA_DIR:-./data/ImageNet-Zip}
    local output_dir=${OUTPUT_DIR:-./output/${name}/epochs-${epochs}}
    local launch=("${PYTHON:-python}" -m contrast.launch --master_port "${MASTER_PORT:-12348}" --nproc_per_node="${NPROC:-4}")
    local data=(--data-dir "${data_dir}")
    if [ -f "${data_dir}/train.zip" ]; then data+=(--zip); fi

    # shellcheck disable=SC2086  # EXTRA_ARGS are word-split on purpose
    "${launch[@]}" main_pretrain.py "${data[@]}" "${pretrain[@]}" --epochs "${epochs}" \
        --output-dir "${output_dir}" --auto-resume ${EXTRA_ARGS:-}
    # shellcheck disable=SC2086
    "${launch[@]}" main_linear.py "${data[@]}" "${linear[@]}" --pretrained-model "${output_dir}/current.pth" \
        --output-dir "${output_dir}/eval" --auto-resume ${LINEAR_EXTRA_ARGS:-}
}
