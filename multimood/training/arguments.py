"""Command-line arguments of training: supervised fine-tuning (`multimood train`) and, shared with GRPO, the
switches of what trains (`TuneArguments`) and LoRA (`LoraArguments`).

The published (VideoLLaMA 2 / seed) flag names parse too: `apply_published_flags` maps them onto ours and says
which have no effect here. `check_training_flags` refuses flags and inputs that cannot work before anything heavy
loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..checkpoints.model_folder import PROCESSOR_CONFIG_NAME, check_model_folder, is_multimood_folder
from ..data.record_files import iter_records
from ..model.records import LABEL_SETS, PROMPT_STYLES, MultimoodError

logger = logging.getLogger("multimood.training.arguments")

QWEN2_MODEL_TYPES = ("videollama2_qwen2", "qwen2", "multimood", "multimood_qwen2", "qwen2_moe", "qwen2.5", "qwen2_5")


@dataclass
class TuneArguments:
    """Which blocks train (SFT and GRPO): the others are frozen."""

    tune_llm: bool = field(
        default=True, metadata={"help": "Train the LLM (fully, or its LoRA adapters with --lora_enable)."}
    )
    tune_mm_projector: bool = field(default=True, metadata={"help": "Train the video connector."})
    tune_audio_projector: bool = field(default=True, metadata={"help": "Train the audio projector."})
    tune_compressor: bool = field(default=True, metadata={"help": "Train the history compressor."})
    tune_vision_tower: bool = field(default=False, metadata={"help": "Train SigLIP (frozen by default)."})
    tune_audio_tower: bool = field(default=False, metadata={"help": "Train BEATs (frozen by default)."})


@dataclass
class LoraArguments:
    """LoRA on the LLM's linear layers (SFT and GRPO)."""

    lora_enable: bool = field(default=False, metadata={"help": "LoRA on the LLM's linear layers (peft)."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated LLM linear names (default: all attention and MLP projections)."},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "With LoRA, also write a merged full model to output_dir/merged."}
    )


@dataclass
class ModelArguments(TuneArguments):
    """The model to start from (a Qwen2 LLM plus towers, or a saved multimood folder) and what trains."""

    model_type: str = field(
        default="videollama2_qwen2",
        metadata={"help": "LLM family: qwen2 (the seed's `videollama2_qwen2` is accepted and means the same)."},
    )
    model_path: str | None = field(
        default=None,
        metadata={"help": "Qwen2 LLM folder / Hub id, or a saved multimood folder to continue training from."},
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder / id (default: --model_path)."}
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON file or JSON string of MultimoodConfig kwargs (builds a random model without checkpoints)."
        },
    )
    vision_tower: str | None = field(default=None, metadata={"help": "SigLIP folder / Hub id (config and weights)."})
    mamba_compressor: str | None = field(default=None, metadata={"help": "Mamba / Mamba2 folder / Hub id."})
    audio_tower: str | None = field(
        default=None, metadata={"help": "BEATs checkpoint file (.pt/.bin, read with weights_only=True)."}
    )
    pretrain_projectors_repo: str | None = field(
        default=None,
        metadata={"help": "Folder / Hub id / file with pretrained `mm_projector*` weights (e.g. VideoLLaMA2.1-AV); "
                          "tensors whose shapes do not match the model are skipped with a warning."},
    )
    mm_projector_type: str | None = field(default=None, metadata={"help": "stc_connector_v35 (default) or mlp2x_gelu."})
    mm_projector_a_type: str | None = field(default=None, metadata={"help": "linear (default) or mlp2x_gelu."})
    mm_vision_select_layer: int | None = field(default=None, metadata={"help": "SigLIP hidden state used (-2)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager or flash_attention_2."})
    tune_adapter_llm: bool | None = field(default=None, metadata={"help": "Seed alias of --tune_llm."})
    freeze_mamba_compressor: bool | None = field(default=None, metadata={"help": "Seed alias: not --tune_compressor."})
    # The published (VideoLLaMA2 / seed) names: see `apply_published_flags` and the README's flag table.
    freeze_backbone: bool = field(default=False, metadata={"help": "Published: True means --tune_llm False."})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Published stage switch: train the video connector only (with "
                                        "--tune_mm_mlp_adapter_a: both projectors only)."})
    tune_mm_mlp_adapter_a: bool = field(
        default=False,
        metadata={"help": "Published stage switch: train the audio projector only (see --tune_mm_mlp_adapter)."},
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={"help": "File / folder / Hub id whose `mm_projector.*` tensors initialise the video connector."},
    )
    pretrain_mm_mlp_adapter_a: str | None = field(
        default=None,
        metadata={"help": "File / folder / Hub id whose `mm_projector_a.*` tensors initialise the audio projector."},
    )
    mm_vision_select_feature: str | None = field(
        default=None, metadata={"help": "Published: `patch` (the only value here: SigLIP has no CLS token)."})
    version: str | None = field(
        default=None, metadata={"help": "Published, no effect: the processor's chat template formats prompts."}
    )
    num_user_emotion_classes: int | None = field(default=None, metadata={"help": "Published (SMES heads), no effect."})
    num_system_emotion_classes: int | None = field(
        default=None, metadata={"help": "Published (SMES heads), no effect."}
    )
    num_strategy_classes: int | None = field(default=None, metadata={"help": "Published (SMES heads), no effect."})


@dataclass
class DataArguments:
    """The records, the clips and the processor's settings."""

    data_path: str | None = field(default=None, metadata={"help": "Training records (JSONL or a JSON array)."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation records (JSONL or a JSON array)."})
    vid_folder: str | None = field(default=None, metadata={"help": "Folder the records' clip names are relative to."})
    num_k_vid: int | None = field(
        default=None, metadata={"help": "Latest client clips used per sample (5; a saved folder: its processor's)."})
    num_frames: int | None = field(
        default=None, metadata={"help": "Frames sampled per sample (16; a saved folder: its processor's)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Frame size in pixels: must be the vision tower's image size (its default)."})
    image_aspect_ratio: str | None = field(
        default=None, metadata={"help": "pad (default) or none (a saved folder: its processor's)."})
    k_turn_history: int = field(default=7, metadata={"help": "Chat-history exchanges kept in the prompt."})
    k_cur_vid_user: int | None = field(default=None, metadata={"help": "Seed alias of --num_k_vid."})
    label_set: str = field(default="mesc", metadata={"help": "mesc or esconv."})
    prompt_style: str | None = field(
        default=None,
        metadata={"help": "Prompt layout: multimood (default for a new model), published-train or published-eval "
                          "(the published MultiMood prompts); default for a saved folder: its processor's.",
                  "choices": list(PROMPT_STYLES)},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    on_bad_sample: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "A record whose clips cannot be used (missing, cut off, not a video, undecodable): `error` "
                          "stops naming its file, line, Dialogue_ID and clip; `skip` leaves it out. Both list them "
                          "in OUTPUT_DIR/bad_samples.jsonl. Clips are probed once before training."},
    )
    data_folder: str | None = field(default=None, metadata={"help": "Published (VideoLLaMA2) name of --vid_folder."})
    is_multimodal: bool | None = field(
        default=None, metadata={"help": "Published, no effect: media follow the records."}
    )
    lazy_preprocess: bool | None = field(
        default=None, metadata={"help": "Published, no effect: records are always processed lazily."}
    )


@dataclass
class MultimoodTrainingArguments(LoraArguments, TrainingArguments):
    """`TrainingArguments` plus the text budget, LoRA / QLoRA and the published optimizer and batching flags."""

    model_max_length: int = field(
        default=2048, metadata={"help": "Text-token budget of a sample (media tokens come on top)."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Seed flag: fraction of the steps used for warm-up; mapped onto `warmup_steps` "
                          "(a float in [0, 1) is a ratio in transformers 5)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads raw records."}
    )
    lora_weight_path: str | None = field(
        default=None,
        metadata={"help": "A saved LoRA adapter folder to continue training from (its own r / alpha / targets)."},
    )
    bits: int = field(
        default=16, metadata={"help": "4 or 8: load the LLM's linear layers in 4-bit / 8-bit (bitsandbytes) for QLoRA "
                                      "(needs --lora_enable True); 16: no quantization.", "choices": [4, 8, 16]})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4.", "choices": ["nf4", "fp4"]})
    double_quant: bool = field(default=True, metadata={"help": "4-bit: quantize the quantization constants too."})
    mm_projector_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the video connector and audio projector (their own optimizer groups)."},
    )
    freeze_mm_mlp_adapter: bool = field(
        default=False,
        metadata={
            "help": "Published: True freezes both projectors (--tune_mm_projector False --tune_audio_projector False)."
        },
    )
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "Batches of one modality (with clips / text-only), grouped by length."})
    save_safetensors: bool | None = field(
        default=None, metadata={"help": "Published, no effect: transformers 5 always writes safetensors."})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps not in (0, 0.0, None):
                raise ValueError("pass either --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = float(self.warmup_ratio)
        cuda = torch.cuda.is_available()
        if not cuda and not self.use_cpu:
            # DeepSpeed on the CPU (gloo) and bf16 on the CPU need use_cpu=True (see design/ENVIRONMENT.md).
            self.use_cpu = True
        if self.tf32 and not cuda:
            logger.warning("--tf32 ignored: no CUDA device")
            self.tf32 = None
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: the dataset yields raw records for the collator")
        super().__post_init__()


def parse_args(argv: list[str] | None = None):
    """Parse command-line flags (or a single .json/.yaml file) into the three argument dataclasses."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MultimoodTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        model_args, data_args, training_args = parser.parse_yaml_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.tune_adapter_llm is not None:
        model_args.tune_llm = model_args.tune_adapter_llm
    if model_args.freeze_mamba_compressor is not None:
        model_args.tune_compressor = not model_args.freeze_mamba_compressor
    if data_args.k_cur_vid_user is not None:
        data_args.num_k_vid = data_args.k_cur_vid_user
    apply_published_flags(model_args, data_args, training_args)
    if model_args.model_type.lower() not in QWEN2_MODEL_TYPES and "qwen2" not in model_args.model_type.lower():
        raise ValueError(
            f"--model_type {model_args.model_type!r}: only the Qwen2 family is supported ({QWEN2_MODEL_TYPES})"
        )
    return model_args, data_args, training_args


# Published fields kept only so that published launch scripts parse, with why each has no effect here.
PUBLISHED_FIELDS_WITHOUT_EFFECT = {
    "version": "the processor's chat template (saved with the model) formats the prompt",
    "num_user_emotion_classes": "MultiMood generates the labels as text (no SMES classification heads)",
    "num_system_emotion_classes": "MultiMood generates the labels as text (no SMES classification heads)",
    "num_strategy_classes": "MultiMood generates the labels as text (no SMES classification heads)",
    "is_multimodal": "the media inputs follow the records and the model's towers",
    "lazy_preprocess": "records are always processed lazily, by the data collator",
    "save_safetensors": "transformers 5 always writes safetensors",
}


def apply_published_flags(model_args: ModelArguments, data_args: DataArguments,
                          training_args: MultimoodTrainingArguments) -> None:
    """Map the published flag names onto ours (README, "Published flags").

    The published code applies its switches in code order, where `--tune_adapter_llm true` re-enables every block
    after the stage switches; here the stage switches come first, then `--tune_adapter_llm true`, and an explicit
    freeze flag (`--freeze_backbone`, `--freeze_mm_mlp_adapter`, `--freeze_mamba_compressor`) always wins.
    """
    if model_args.tune_mm_mlp_adapter or model_args.tune_mm_mlp_adapter_a:
        model_args.tune_llm = model_args.tune_compressor = False
        model_args.tune_mm_projector = bool(model_args.tune_mm_mlp_adapter)
        model_args.tune_audio_projector = bool(model_args.tune_mm_mlp_adapter_a)
    if model_args.tune_adapter_llm:
        model_args.tune_llm = model_args.tune_mm_projector = model_args.tune_audio_projector = True
        model_args.tune_compressor = True
    if model_args.freeze_backbone:
        model_args.tune_llm = False
    if training_args.freeze_mm_mlp_adapter:
        model_args.tune_mm_projector = model_args.tune_audio_projector = False
    if model_args.freeze_mamba_compressor:
        model_args.tune_compressor = False
    if model_args.mm_vision_select_feature not in (None, "patch"):
        raise ValueError(f"--mm_vision_select_feature {model_args.mm_vision_select_feature!r}: only 'patch' is "
                         "supported (SigLIP has no CLS token for 'cls_patch')")
    if data_args.data_folder:
        if data_args.vid_folder and os.path.abspath(data_args.vid_folder) != os.path.abspath(data_args.data_folder):
            raise ValueError(f"--data_folder {data_args.data_folder!r} and --vid_folder {data_args.vid_folder!r} "
                             "name the same folder (the clips' root): pass one of them")
        data_args.vid_folder = data_args.data_folder
    for name, reason in PUBLISHED_FIELDS_WITHOUT_EFFECT.items():
        for args in (model_args, data_args, training_args):
            if getattr(args, name, None) is not None:
                logger.warning("--%s has no effect here: %s", name, reason)


def check_quantization_flags(training_args: MultimoodTrainingArguments) -> None:
    """QLoRA switches that cannot work together, refused before any model is loaded."""
    if training_args.bits not in (4, 8, 16):
        raise ValueError(f"--bits must be 4, 8 or 16, got {training_args.bits}")
    if training_args.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"--quant_type must be nf4 or fp4, got {training_args.quant_type!r}")
    if training_args.bits == 16:
        return
    if not training_args.lora_enable:
        raise ValueError(f"--bits {training_args.bits} freezes the quantized LLM: add --lora_enable True (QLoRA)")
    if training_args.deepspeed and is_deepspeed_zero3_enabled():
        raise ValueError(f"--bits {training_args.bits} does not work with ZeRO-3 ({training_args.deepspeed}): the "
                         "LLM is quantized after assembly, which needs whole tensors; use run_scripts/zero2.json")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"--bits {training_args.bits} needs bitsandbytes: pip install 'multimood[qlora]'")



def read_model_config(value: str | dict | None) -> dict:
    """`--model_config`: a JSON string, a JSON file or a dict (of MultimoodConfig kwargs and processor settings)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    return json.loads(Path(value).expanduser().read_text())


# The instructions and the four-line answer alone take ~160 tokens with the Qwen2 vocabulary (250 with the
# default system prompt): a smaller text budget cannot hold any record.
MIN_MODEL_MAX_LENGTH = 128


def check_training_flags(model_args: ModelArguments, data_args: DataArguments,
                         training_args: MultimoodTrainingArguments) -> None:
    """Flags and inputs that cannot work, found before anything heavy loads: each raises `MultimoodError`
    naming the flag (or the file, line and field of a bad record: the data files are validated here with
    the label set the processor will use, so that a run never dies at its first batch on a record)."""
    def fail(message: str):
        raise MultimoodError(message)

    minimums = (
        ("k_turn_history", data_args.k_turn_history, 0), ("num_k_vid", data_args.num_k_vid, 0),
        ("num_frames", data_args.num_frames, 1), ("image_size", data_args.image_size, 1),
        ("max_train_samples", data_args.max_train_samples, 1), ("lora_r", training_args.lora_r, 1),
        ("model_max_length", training_args.model_max_length, MIN_MODEL_MAX_LENGTH),
    )
    for flag, value, minimum in minimums:
        if value is not None and value < minimum:
            why = " (the instructions and the answer format alone take more)" if flag == "model_max_length" else ""
            fail(f"--{flag} must be >= {minimum}, got {value}{why}")
    if not 0 <= training_args.lora_dropout < 1:
        fail(f"--lora_dropout must be in [0, 1), got {training_args.lora_dropout}")
    if training_args.lora_bias not in ("none", "all", "lora_only"):
        fail(f"--lora_bias must be none, all or lora_only, got {training_args.lora_bias!r}")
    if data_args.label_set not in LABEL_SETS:
        fail(f"--label_set must be one of {', '.join(sorted(LABEL_SETS))}, got {data_args.label_set!r}")
    if data_args.image_aspect_ratio not in (None, "pad", "none"):
        fail(f"--image_aspect_ratio must be pad or none, got {data_args.image_aspect_ratio!r}")
    if data_args.data_path is None:
        fail("--data_path is required")
    for flag, path in (("data_path", data_args.data_path), ("eval_data_path", data_args.eval_data_path),
                       ("audio_tower", model_args.audio_tower), ("model_config", model_args.model_config)):
        if path and not (flag == "model_config" and path.strip().startswith("{")) and not os.path.isfile(path):
            fail(f"--{flag} {path}: no such file")
    if data_args.vid_folder and not os.path.isdir(data_args.vid_folder):
        fail(f"--vid_folder {data_args.vid_folder}: no such folder")
    if model_args.model_config:
        try:
            read_model_config(model_args.model_config)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            fail(f"--model_config {model_args.model_config[:80]}: not JSON ({' '.join(str(error).split())})")
    for flag in ("model_path", "tokenizer_path", "vision_tower", "mamba_compressor"):
        path = getattr(model_args, flag)
        if path and not os.path.exists(os.path.expanduser(path)) and (
            path.startswith((".", "/", "~")) or path.count("/") != 1
        ):
            fail(f"--{flag} {path}: no such folder (and not a Hub repo id owner/name)")
    label_set = data_args.label_set
    if is_multimood_folder(model_args.model_path):
        check_model_folder(model_args.model_path)
        saved = json.loads((Path(model_args.model_path) / PROCESSOR_CONFIG_NAME).read_text(encoding="utf-8"))
        named = LABEL_SETS.get(saved.get("label_set", "mesc"), {})
        custom = any(saved.get(k) not in (None, named.get(k)) for k in ("emotion_labels", "strategy_labels"))
        label_set = None if custom else saved.get("label_set", "mesc")
    for path in (data_args.data_path, data_args.eval_data_path):
        if path:
            count = sum(1 for _ in iter_records(path, require_targets=True, label_set=label_set))
            if count == 0:
                fail(
                    f"--data_path {path}: no records"
                    if path == data_args.data_path
                    else f"--eval_data_path {path}: no records"
                )


