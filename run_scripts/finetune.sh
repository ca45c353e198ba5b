#!/bin/bash
# Supervised fine-tuning of MultiMood with the published recipe (scripts/custom/finetune.sh of the seed):
# Qwen2-1.5B-Instruct + SigLIP so400m + BEATs + mamba-370m, lr 2e-5 cosine, warm-up 3 %, global batch 16,
# bf16 + tf32, gradient checkpointing, model_max_length 2048, DeepSpeed ZeRO-3, torchrun.
#
# usage: bash run_scripts/finetune.sh [NNODES] [NPROC_PER_NODE] [NODE_RANK]
# Paths can be overridden with environment variables (DATA_DIR, VID_FOLDER, AUDIO_TOWER, OUTPUT_DIR, ...).
#
# DeepSpeed configs (run_scripts/zero{2,3,3_offload}.json) have no "optimizer" block: the Trainer builds
# torch AdamW (so nothing is compiled, and the same config works on CPU with gloo, `use_cpu` is set
# automatically when there is no GPU). zero3 saves full 16-bit weights at the end
# (stage3_gather_16bit_weights_on_model_save). Use zero3_offload.json when GPU memory is short.
set -euo pipefail

NNODES=${1:-${NNODES:-1}}
NPROC_PER_NODE=${2:-${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}}
NODE_RANK=${3:-${NODE_RANK:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-16666}

GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
LOCAL_BATCH_SIZE=${LOCAL_BATCH_SIZE:-8}
GRADIENT_ACCUMULATION_STEPS=$(( GLOBAL_BATCH_SIZE / (NNODES * NPROC_PER_NODE * LOCAL_BATCH_SIZE) ))
if [ "$GRADIENT_ACCUMULATION_STEPS" -lt 1 ]; then GRADIENT_ACCUMULATION_STEPS=1; fi

RUN_NAME=${RUN_NAME:-multimood}
DATA_PATH=${DATA_PATH:-./data/mesc/train.jsonl}
VID_FOLDER=${VID_FOLDER:-./data/mesc/video_data/}
AUDIO_TOWER=${AUDIO_TOWER:-audio_tower.bin}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/multimood_sft/finetune_${RUN_NAME}}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-run_scripts/zero3.json}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

torchrun --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    --node_rank "$NODE_RANK" \
    "$SCRIPT_DIR/run_multimood.py" \
    --deepspeed "$DEEPSPEED_CONFIG" \
    --model_type videollama2_qwen2 \
    --model_path "${MODEL_PATH:-Qwen/Qwen2-1.5B-Instruct}" \
    --vision_tower "${VISION_TOWER:-google/siglip-so400m-patch14-384}" \
    --mamba_compressor "${MAMBA_COMPRESSOR:-state-spaces/mamba-370m-hf}" \
    --audio_tower "$AUDIO_TOWER" \
    ${PRETRAIN_PROJECTORS_REPO:+--pretrain_projectors_repo "$PRETRAIN_PROJECTORS_REPO"} \
    --mm_projector_type stc_connector_v35 \
    --data_path "$DATA_PATH" \
    --vid_folder "$VID_FOLDER" \
    --num_k_vid 5 \
    --mm_vision_select_layer -2 \
    --image_aspect_ratio pad \
    --num_frames 16 \
    --bf16 True \
    --tf32 True \
    --fp16 False \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --tune_llm True \
    --per_device_train_batch_size "$LOCAL_BATCH_SIZE" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" \
    --save_strategy steps \
    --save_steps "${SAVE_STEPS:-500}" \
    --save_total_limit "${SAVE_TOTAL_LIMIT:-3}" \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --max_grad_norm 1.0 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers "${NUM_WORKERS:-4}" \
    --k_turn_history 7 \
    --report_to "${REPORT_TO:-tensorboard}" \
    --run_name "$RUN_NAME" \
    "${@:4}"
