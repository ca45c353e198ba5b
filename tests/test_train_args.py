"""Every field of the published argument classes (quangtuan-0504/Multimood, feature/train_sft, framework/train.py)
parses, the published names mean what the README's table says, and the published launch scripts' flag sets parse.

The published facts are written out here: the 47 fields with the value a user could pass, and the flags of
scripts/custom/finetune.sh and scripts/custom/finetune_qlora.sh (their shell variables expanded).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest

from multimood.training import arguments as mm_args
from tests.test_run_scripts import launched_flags

ZERO3 = Path(__file__).resolve().parents[1] / "run_scripts" / "zero3.json"

# field -> a value for it (None: a bare boolean flag is passed with an explicit value below)
PUBLISHED_MODEL_FIELDS = {
    "model_type": "videollama2_qwen2",
    "model_path": "Qwen/Qwen2-1.5B-Instruct",
    "num_k_vid": "5",
    "version": "v1",
    "freeze_backbone": "False",
    "pretrain_projectors_repo": "DAMO-NLP-SG/VideoLLaMA2.1-7B-AV",
    "mm_projector_type": "stc_connector_v35",
    "tune_mm_mlp_adapter": "False",
    "pretrain_mm_mlp_adapter": "mm_projector.bin",
    "vision_tower": "google/siglip-so400m-patch14-384",
    "mm_vision_select_layer": "-2",
    "mm_vision_select_feature": "patch",
    "audio_tower": "audio_tower.bin",
    "tune_audio_tower": "False",
    "tune_mm_mlp_adapter_a": "False",
    "tune_adapter_llm": "True",
    "pretrain_mm_mlp_adapter_a": "mm_projector_a.bin",
    "num_user_emotion_classes": "7",
    "num_system_emotion_classes": "7",
    "num_strategy_classes": "10",
    "mamba_compressor": "state-spaces/mamba-370m-hf",
    "freeze_mamba_compressor": "True",
}
PUBLISHED_DATA_FIELDS = {
    "data_path": "train.jsonl", "vid_folder": "videos", "data_folder": "videos", "k_cur_vid_user": "4",
    "k_turn_history": "7", "is_multimodal": "True", "lazy_preprocess": "True", "num_frames": "16",
    "image_aspect_ratio": "pad",
}
PUBLISHED_TRAINING_FIELDS = {
    "optim": "adamw_torch", "mm_projector_lr": "2e-5", "freeze_mm_mlp_adapter": "False",
    "remove_unused_columns": "False", "save_safetensors": "False", "group_by_modality_length": "True",
    "model_max_length": "4096", "double_quant": "True", "quant_type": "nf4", "bits": "4", "lora_enable": "True",
    "lora_r": "64", "lora_alpha": "16", "lora_dropout": "0.05", "lora_weight_path": "adapter", "lora_bias": "none",
}

# scripts/custom/finetune.sh (GLOBAL 16, LOCAL 8, one node of 2 processes: accumulation 1)
SEED_FINETUNE = """
    --deepspeed {zero3} --model_type videollama2_qwen2 --model_path Qwen/Qwen2-1.5B-Instruct
    --vision_tower google/siglip-so400m-patch14-384 --mamba_compressor state-spaces/mamba-370m-hf
    --audio_tower audio_tower.bin --pretrain_projectors_repo DAMO-NLP-SG/VideoLLaMA2.1-7B-AV
    --mm_projector_type stc_connector_v35 --data_path ./data/mesc/train.jsonl --vid_folder ./data/mesc/video_data/
    --num_k_vid 5 --mm_vision_select_layer -2 --image_aspect_ratio pad --num_frames 16 --bf16 True --tf32 True
    --fp16 False --output_dir work_dirs/Multimood_downstream_sft/finetune_Multimood --num_train_epochs 1
    --tune_adapter_llm true --per_device_train_batch_size 8 --per_device_eval_batch_size 4
    --gradient_accumulation_steps 1 --save_strategy steps --save_steps 1 --save_total_limit 99 --learning_rate 2e-5
    --weight_decay 0. --warmup_ratio 0.03 --max_grad_norm 1.0 --lr_scheduler_type cosine --logging_steps 1
    --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --report_to tensorboard
    --run_name Multimood
"""
# scripts/custom/finetune_qlora.sh (GLOBAL 2, LOCAL 1, one node of 2 processes: accumulation 1)
SEED_FINETUNE_QLORA = """
    --lora_enable True --lora_r 64 --lora_alpha 128 --mm_projector_lr 2e-5 --bits 4
    --deepspeed {zero3} --model_type videollama2_qwen2 --model_path Qwen/Qwen2.5-7B-Instruct
    --vision_tower google/siglip-so400m-patch14-384 --audio_tower audio_tower.bin
    --pretrain_projectors_repo DAMO-NLP-SG/VideoLLaMA2.1-7B-AV --mm_projector_type stc_connector_v35
    --mamba_compressor state-spaces/mamba-370m-hf --freeze_mamba_compressor true
    --data_path ./data/mesc/train.jsonl --vid_folder ./data/mesc/video_data/ --num_k_vid 5
    --mm_vision_select_layer -2 --image_aspect_ratio pad --num_frames 8 --bf16 True --tf32 True --fp16 False
    --output_dir work_dirs/Multimood_downstream_sft/finetune_Multimood_qlora --num_train_epochs 5
    --per_device_train_batch_size 1 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1
    --save_strategy steps --save_steps 2000 --save_total_limit 99 --learning_rate 2e-5 --weight_decay 0.
    --warmup_ratio 0.03 --max_grad_norm 1.0 --lr_scheduler_type cosine --logging_steps 1 --model_max_length 5120
    --gradient_checkpointing True --dataloader_num_workers 4 --report_to tensorboard --run_name Multimood_qlora
"""


def _parse(flags: str | list[str], tmp_path=None):
    argv = shlex.split(flags) if isinstance(flags, str) else list(flags)
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path)]
    return mm_args.parse_args(argv)


def test_all_47_published_fields_parse(tmp_path, caplog):
    fields = {**PUBLISHED_MODEL_FIELDS, **PUBLISHED_DATA_FIELDS, **PUBLISHED_TRAINING_FIELDS}
    assert len(fields) == 47
    argv = [x for name, value in fields.items() for x in (f"--{name}", value)]
    with caplog.at_level(logging.WARNING, logger="multimood.training.train"):
        model_args, data_args, args = _parse(argv, tmp_path)
    assert data_args.num_k_vid == 4  # --k_cur_vid_user wins over --num_k_vid, as in the seed
    assert data_args.vid_folder == "videos" and data_args.image_aspect_ratio == "pad"
    assert model_args.pretrain_mm_mlp_adapter == "mm_projector.bin"
    assert model_args.pretrain_mm_mlp_adapter_a == "mm_projector_a.bin"
    assert model_args.tune_llm and model_args.tune_mm_projector and model_args.tune_audio_projector
    assert not model_args.tune_compressor  # --freeze_mamba_compressor True
    assert (args.bits, args.quant_type, args.double_quant, args.mm_projector_lr) == (4, "nf4", True, 2e-5)
    assert args.group_by_modality_length and args.lora_weight_path == "adapter" and args.model_max_length == 4096
    warned = caplog.text
    for name in mm_args.PUBLISHED_FIELDS_WITHOUT_EFFECT:
        assert f"--{name} has no effect here" in warned, name


@pytest.mark.parametrize("flags", [SEED_FINETUNE, SEED_FINETUNE_QLORA], ids=["finetune.sh", "finetune_qlora.sh"])
def test_published_script_flag_sets_parse(flags, tmp_path):
    model_args, data_args, args = _parse(flags.format(zero3=ZERO3))
    assert args.deepspeed == str(ZERO3)
    assert model_args.model_type == "videollama2_qwen2" and model_args.mm_vision_select_layer == -2
    assert args.warmup_steps == pytest.approx(0.03) and args.save_total_limit == 99
    if "--bits" in flags:
        assert (args.bits, args.lora_enable, args.lora_r, args.lora_alpha, args.mm_projector_lr) == (
            4,
            True,
            64,
            128,
            2e-5,
        )
        assert not model_args.tune_compressor and data_args.num_frames == 8 and args.model_max_length == 5120
        assert args.quant_type == "nf4" and args.double_quant  # the published defaults
    else:
        assert args.bits == 16 and model_args.tune_llm and data_args.num_frames == 16


def test_finetune_qlora_launcher_flags(tmp_path):
    """run_scripts/finetune_qlora.sh: the seed's QLoRA recipe on top of finetune.sh, ZeRO-2."""
    flags = launched_flags("finetune_qlora.sh", tmp_path, "--max_steps", "3")
    model_args, data_args, args = mm_args.parse_args(flags)
    assert model_args.model_path == "Qwen/Qwen2.5-7B-Instruct" and not model_args.tune_compressor
    assert (args.bits, args.quant_type, args.double_quant) == (4, "nf4", True)
    assert (args.lora_enable, args.lora_r, args.lora_alpha, args.mm_projector_lr) == (True, 64, 128, 2e-5)
    assert args.learning_rate == pytest.approx(2e-5) and args.num_train_epochs == 5 and args.max_steps == 3
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 1)  # global 2 over 2 processes
    assert args.save_steps == 2000 and args.model_max_length == 5120 and data_args.num_frames == 8
    assert args.deepspeed.endswith("zero2.json")
    mm_args.check_quantization_flags(args)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        # (tune_llm, tune_mm_projector, tune_audio_projector, tune_compressor)
        ("", (True, True, True, True)),
        ("--tune_mm_mlp_adapter True", (False, True, False, False)),
        ("--tune_mm_mlp_adapter_a True", (False, False, True, False)),
        ("--tune_mm_mlp_adapter True --tune_mm_mlp_adapter_a True", (False, True, True, False)),
        ("--tune_mm_mlp_adapter True --tune_adapter_llm true", (True, True, True, True)),
        ("--tune_adapter_llm true --freeze_backbone True", (False, True, True, True)),
        ("--freeze_backbone", (False, True, True, True)),
        ("--freeze_mm_mlp_adapter True", (True, False, False, True)),
        (
            "--tune_adapter_llm true --freeze_mm_mlp_adapter True --freeze_mamba_compressor true",
            (True, False, False, False),
        ),
        ("--tune_adapter_llm false", (False, True, True, True)),
    ],
)
def test_published_trainable_switches(flags, expected, tmp_path):
    model_args = _parse(flags, tmp_path)[0]
    got = (
        model_args.tune_llm,
        model_args.tune_mm_projector,
        model_args.tune_audio_projector,
        model_args.tune_compressor,
    )
    assert got == expected


def test_published_names_errors(tmp_path):
    with pytest.raises(ValueError, match="cls_patch"):
        _parse("--mm_vision_select_feature cls_patch", tmp_path)
    with pytest.raises(ValueError, match="--data_folder 'a' and --vid_folder 'b'"):
        _parse("--data_folder a --vid_folder b", tmp_path)
    assert _parse("--data_folder a", tmp_path)[1].vid_folder == "a"
    with pytest.raises(SystemExit):  # argparse choices
        _parse("--bits 3", tmp_path)
    with pytest.raises(SystemExit):
        _parse("--quant_type int4", tmp_path)


def test_quantization_flag_checks(tmp_path):
    with pytest.raises(ValueError, match="--bits 4 freezes the quantized LLM: add --lora_enable True"):
        mm_args.check_quantization_flags(_parse("--bits 4", tmp_path)[2])
    pytest.importorskip("deepspeed")
    zero3 = _parse(f"--bits 8 --lora_enable True --deepspeed {ZERO3}", tmp_path)[2]
    with pytest.raises(ValueError, match="ZeRO-3"):
        mm_args.check_quantization_flags(zero3)
