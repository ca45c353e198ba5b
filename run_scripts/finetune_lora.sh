#!/bin/bash
# LoRA fine-tuning of MultiMood: r 64, alpha 16 on the LLM's linear layers (the video connector, audio
# projector and history compressor are trained fully), lr 2e-4, DeepSpeed ZeRO-2; everything else is the
# recipe of finetune.sh, which this script calls. The adapter is saved in OUTPUT_DIR and the merged full
# model in OUTPUT_DIR/merged.
#
# usage: bash run_scripts/finetune_lora.sh [NNODES] [NPROC_PER_NODE] [NODE_RANK] [extra run_multimood.py flags]
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-$SCRIPT_DIR/zero2.json}
export RUN_NAME=${RUN_NAME:-multimood_lora}
exec bash "$SCRIPT_DIR/finetune.sh" "${1:-}" "${2:-}" "${3:-}" \
    --lora_enable True \
    --lora_r 64 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --learning_rate "${LEARNING_RATE:-2e-4}" \
    "${@:4}"
