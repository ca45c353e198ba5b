#!/bin/bash
# QLoRA fine-tuning of MultiMood, the recipe of the seed's scripts/custom/finetune_qlora.sh: the LLM's linear layers
# in 4-bit NF4 with double quantization (bitsandbytes: pip install 'multimood[qlora]'), LoRA r 64, alpha 128 on them,
# the video connector and audio projector trained fully at --mm_projector_lr 2e-5, the history compressor frozen,
# Qwen2.5-7B-Instruct, 8 frames, model_max_length 5120, lr 2e-5, 5 epochs, global batch 2 (1 per device).
# Everything else is the recipe of finetune.sh, which this script calls. The adapter (LoRA and the projectors) is
# saved in OUTPUT_DIR and the merged float32 model (dequantized base + adapter) in OUTPUT_DIR/merged.
# DeepSpeed ZeRO-2 (the seed used ZeRO-3, which QLoRA does not support here: the LLM is quantized after assembly).
#
# usage: bash run_scripts/finetune_qlora.sh [NNODES] [NPROC_PER_NODE] [NODE_RANK] [extra run_multimood.py flags]
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-$SCRIPT_DIR/zero2.json}
export RUN_NAME=${RUN_NAME:-multimood_qlora}
export MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-7B-Instruct}
export GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-2}
export LOCAL_BATCH_SIZE=${LOCAL_BATCH_SIZE:-1}
export SAVE_STEPS=${SAVE_STEPS:-2000}
export SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-99}
exec bash "$SCRIPT_DIR/finetune.sh" "${1:-}" "${2:-}" "${3:-}" \
    --lora_enable True \
    --lora_r 64 \
    --lora_alpha 128 \
    --mm_projector_lr 2e-5 \
    --bits 4 \
    --freeze_mamba_compressor true \
    --num_frames 8 \
    --num_train_epochs 5 \
    --model_max_length 5120 \
    --learning_rate "${LEARNING_RATE:-2e-5}" \
    "${@:4}"
