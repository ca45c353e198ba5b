"""GRPO entry point for torchrun / accelerate / deepspeed launchers: `torchrun run_scripts/run_grpo.py --flags ...`.

Example (the paper's recipe on one node, ZeRO-2):
    torchrun --nproc_per_node 8 run_scripts/run_grpo.py --deepspeed run_scripts/zero2.json \
        --model_path outputs/sft --data_path data/mesc_train_records.jsonl --vid_folder data/video \
        --output_dir outputs/grpo --preset paper \
        --judge_url http://judge-host:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 16 --bf16 True
See `python run_scripts/run_grpo.py --help` for every flag (GRPOConfig's included). Errors: one line and a
non-zero exit (`--debug` or MULTIMOOD_DEBUG=1 for the traceback).
"""

import sys

from multimood.cli import run_command
from multimood.training.grpo import main

if __name__ == "__main__":
    sys.exit(run_command("run_grpo.py", main))
