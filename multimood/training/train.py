"""Supervised fine-tuning of MultiMood with the Hugging Face `Trainer` (the seed's `finetune.sh` flags).

Run with `torchrun run_scripts/run_multimood.py --deepspeed run_scripts/zero3.json ...` or `multimood train ...`.

Model assembly (when `--model_path` is a plain Qwen2 LLM):
processor first (tokenizer from `--tokenizer_path` or `--model_path`, plus the four multimood tokens and
the chat template) -> `MultimoodConfig` (text config of the LLM, vision config of the SigLIP folder,
Mamba config of the compressor folder, BEATs config of the checkpoint's `cfg`, token ids from the
processor; `--model_config` JSON overrides/replaces all of it) -> the model (`_from_config`, so that
ZeRO-3 partitions it at construction) -> pretrained weights through the standard loaders
(`AutoModelForCausalLM`, `AutoModel`, `torch.load(weights_only=True)` for BEATs) copied into the
sub-modules (inside `deepspeed.zero.GatheredParameters(..., modifier_rank=0)` under ZeRO-3) -> token
embeddings resized when the tokenizer is larger than the vocabulary.
When `--model_path` is a saved multimood folder, model and processor are loaded from it (continue training).

Data: JSONL / JSON-array records; the dataset yields raw record dicts and `MultimoodDataCollator` does
all the processing (video decoding runs in the DataLoader workers).
After training the output folder is complete (weights, config with `auto_map`, remote code, processor
files); with LoRA it holds the adapter and `merged/` holds a full model that loads with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`.
QLoRA (`--bits 4/8` with LoRA) quantizes the LLM's linear layers after assembly; its `merged/` is the dequantized
base plus the adapter, in float32. `MultimoodTrainer` adds the published `--mm_projector_lr` optimizer groups and
`--group_by_modality_length` batches; `apply_published_flags` maps the published flag names onto ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import seed_worker

from ..data.bad_samples import BadSampleScreen
from ..checkpoints.convert_videollama2_to_multimood import beats_config_from_cfg, load_pickled_weights, read_beats_checkpoint
from ..data.dataset_builder import load_dialogues
from ..data.record_files import iter_records
from ..checkpoints.hub import check_hub_reachable, check_model_folder, prepare_upload_folder, push_to_hub
from ..model.pipeline_multimood import save_pipeline_files
from ..model.records import PROMPT_STYLES

logger = logging.getLogger("multimood.training.train")

QWEN2_MODEL_TYPES = ("videollama2_qwen2", "qwen2", "multimood", "multimood_qwen2", "qwen2_moe", "qwen2.5", "qwen2_5")
LLM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_type: str = field(
        default="videollama2_qwen2",
        metadata={"help": "LLM family: qwen2 (the seed's `videollama2_qwen2` is accepted and means the same)."},
    )
    model_path: str | None = field(
        default=None,
        metadata={"help": "Qwen2 LLM folder / Hub id, or a saved multimood folder to continue training from."},
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder / id (default: --model_path)."})
    model_config: str | None = field(
        default=None,
        metadata={"help": "JSON file or JSON string of MultimoodConfig kwargs (builds a random model without checkpoints)."},
    )
    vision_tower: str | None = field(default=None, metadata={"help": "SigLIP folder / Hub id (config and weights)."})
    mamba_compressor: str | None = field(default=None, metadata={"help": "Mamba / Mamba2 folder / Hub id."})
    audio_tower: str | None = field(default=None, metadata={"help": "BEATs checkpoint file (.pt/.bin, read with weights_only=True)."})
    pretrain_projectors_repo: str | None = field(
        default=None,
        metadata={"help": "Folder / Hub id / file with pretrained `mm_projector*` weights (e.g. VideoLLaMA2.1-AV); "
                          "tensors whose shapes do not match the model are skipped with a warning."},
    )
    mm_projector_type: str | None = field(default=None, metadata={"help": "stc_connector_v35 (default) or mlp2x_gelu."})
    mm_projector_a_type: str | None = field(default=None, metadata={"help": "linear (default) or mlp2x_gelu."})
    mm_vision_select_layer: int | None = field(default=None, metadata={"help": "SigLIP hidden state used (-2)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager or flash_attention_2."})
    tune_llm: bool = field(default=True, metadata={"help": "Train the LLM (fully, or its LoRA adapters with --lora_enable)."})
    tune_adapter_llm: bool | None = field(default=None, metadata={"help": "Seed alias of --tune_llm."})
    tune_mm_projector: bool = field(default=True, metadata={"help": "Train the video connector."})
    tune_audio_projector: bool = field(default=True, metadata={"help": "Train the audio projector."})
    tune_compressor: bool = field(default=True, metadata={"help": "Train the history compressor."})
    tune_vision_tower: bool = field(default=False, metadata={"help": "Train SigLIP (frozen by default)."})
    tune_audio_tower: bool = field(default=False, metadata={"help": "Train BEATs (frozen by default)."})
    freeze_mamba_compressor: bool | None = field(default=None, metadata={"help": "Seed alias: not --tune_compressor."})
    # The published (VideoLLaMA2 / seed) names: see `apply_published_flags` and the README's flag table.
    freeze_backbone: bool = field(default=False, metadata={"help": "Published: True means --tune_llm False."})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Published stage switch: train the video connector only (with "
                                        "--tune_mm_mlp_adapter_a: both projectors only)."})
    tune_mm_mlp_adapter_a: bool = field(
        default=False, metadata={"help": "Published stage switch: train the audio projector only (see --tune_mm_mlp_adapter)."})
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "File / folder / Hub id whose `mm_projector.*` tensors initialise the video connector."})
    pretrain_mm_mlp_adapter_a: str | None = field(
        default=None, metadata={"help": "File / folder / Hub id whose `mm_projector_a.*` tensors initialise the audio projector."})
    mm_vision_select_feature: str | None = field(
        default=None, metadata={"help": "Published: `patch` (the only value here: SigLIP has no CLS token)."})
    version: str | None = field(default=None, metadata={"help": "Published, no effect: the processor's chat template formats prompts."})
    num_user_emotion_classes: int | None = field(default=None, metadata={"help": "Published (SMES heads), no effect."})
    num_system_emotion_classes: int | None = field(default=None, metadata={"help": "Published (SMES heads), no effect."})
    num_strategy_classes: int | None = field(default=None, metadata={"help": "Published (SMES heads), no effect."})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "Training records (JSONL or a JSON array)."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation records (JSONL or a JSON array)."})
    vid_folder: str | None = field(default=None, metadata={"help": "Folder the records' clip names are relative to."})
    num_k_vid: int = field(default=5, metadata={"help": "Latest client clips used per sample."})
    num_frames: int | None = field(default=None, metadata={"help": "Frames sampled per sample (16)."})
    image_size: int | None = field(default=None, metadata={"help": "Frame size in pixels (the SigLIP image size)."})
    image_aspect_ratio: str | None = field(default=None, metadata={"help": "pad (default) or none."})
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
    is_multimodal: bool | None = field(default=None, metadata={"help": "Published, no effect: media follow the records."})
    lazy_preprocess: bool | None = field(default=None, metadata={"help": "Published, no effect: records are always processed lazily."})


@dataclass
class MultimoodTrainingArguments(TrainingArguments):
    model_max_length: int = field(
        default=2048, metadata={"help": "Text-token budget of a sample (media tokens come on top)."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Seed flag: fraction of the steps used for warm-up; mapped onto `warmup_steps` "
                          "(a float in [0, 1) is a ratio in transformers 5)."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator reads raw records."})
    lora_enable: bool = field(default=False, metadata={"help": "LoRA on the LLM's linear layers (peft)."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated LLM linear names (default: all attention and MLP projections)."}
    )
    merge_lora: bool = field(default=True, metadata={"help": "With LoRA, also write a merged full model to output_dir/merged."})
    lora_weight_path: str | None = field(
        default=None, metadata={"help": "A saved LoRA adapter folder to continue training from (its own r / alpha / targets)."})
    bits: int = field(
        default=16, metadata={"help": "4 or 8: load the LLM's linear layers in 4-bit / 8-bit (bitsandbytes) for QLoRA "
                                      "(needs --lora_enable True); 16: no quantization.", "choices": [4, 8, 16]})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4.", "choices": ["nf4", "fp4"]})
    double_quant: bool = field(default=True, metadata={"help": "4-bit: quantize the quantization constants too."})
    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the video connector and audio projector (their own optimizer groups)."})
    freeze_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Published: True freezes both projectors (--tune_mm_projector False --tune_audio_projector False)."})
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
        raise ValueError(f"--model_type {model_args.model_type!r}: only the Qwen2 family is supported ({QWEN2_MODEL_TYPES})")
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
    if training_args.deepspeed and _zero3_enabled():
        raise ValueError(f"--bits {training_args.bits} does not work with ZeRO-3 ({training_args.deepspeed}): the "
                         "LLM is quantized after assembly, which needs whole tensors; use run_scripts/zero2.json")
    try:
        import bitsandbytes  # noqa: F401, PLC0415
    except ImportError as error:
        raise ImportError(f"--bits {training_args.bits} needs bitsandbytes: pip install 'multimood[qlora]'") from error


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_records(path: str | os.PathLike):
    """The records of a JSONL / JSON-array file, validated by the dataset builder (all splits of one file)."""
    return load_dialogues({"train": str(Path(path).expanduser().resolve())})["train"]


def make_dataset(path: str, limit: int | None = None):
    data = load_records(path)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"{path}: no records")
    return data


# ----------------------------------------------------------------------------------------------
# Model assembly
# ----------------------------------------------------------------------------------------------


def is_multimood_folder(path: str | None) -> bool:
    if not path or not os.path.isdir(path):
        return False
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "multimood"
    except (OSError, json.JSONDecodeError):
        return False


def _zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: PLC0415

    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def _without_zero3_init():
    """Load source checkpoints as plain full tensors even while the Trainer's ZeRO-3 config is active."""
    from transformers.integrations import deepspeed as hf_ds  # noqa: PLC0415

    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Let `deepspeed.comm` adopt the running process group before ZeRO-3 builds the model.

    ZeRO-3 partitions the model at construction (`deepspeed.zero.Init`), whose config reads the world size from
    `deepspeed.comm`. With `use_cpu=True` accelerate initialises only `torch.distributed` (gloo), so DeepSpeed would
    see one rank and fail its batch-size check (`train_batch_size ... 2 != 1 * 1 * 1`) on two CPU ranks.
    """
    if not _zero3_enabled():
        return
    _ = training_args.device  # sets up torch.distributed under torchrun
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed  # noqa: PLC0415

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state_dict` into `module` (shape-mismatched tensors skipped), gathering ZeRO-3 partitions."""
    own = module.state_dict() if not _zero3_enabled() else None
    if own is not None:
        skipped = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    else:
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
        skipped = [k for k, v in state_dict.items() if k in shapes and shapes[k] != tuple(v.shape)]
    if skipped:
        logger.warning("%s: skipping %d tensors whose shapes differ: %s", what, len(skipped), skipped[:8])
    state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    if _zero3_enabled():
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if _rank() == 0:
                result = module.load_state_dict(state_dict, strict=False)
            else:
                result = None
    else:
        result = module.load_state_dict(state_dict, strict=False)
    if result is not None:
        missing = [k for k in result.missing_keys if not k.endswith(("rotary_emb.inv_freq", "position_ids"))]
        if missing:
            logger.warning("%s: %d weights not in the checkpoint (kept random): %s", what, len(missing), missing[:8])
        if result.unexpected_keys:
            logger.warning("%s: %d unused checkpoint tensors: %s", what, len(result.unexpected_keys), result.unexpected_keys[:8])
    logger.info("loaded %s (%d tensors)", what, len(state_dict))


def read_model_config(value: str | dict | None) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    return json.loads(Path(value).expanduser().read_text())


def build_processor(model_args: ModelArguments, data_args: DataArguments, training_args: MultimoodTrainingArguments,
                    model_config: dict):
    from ..model.processing_multimood import MultimoodProcessor  # noqa: PLC0415

    source = model_args.tokenizer_path or model_args.model_path
    if source is None:
        raise ValueError("pass --model_path (a Qwen2 LLM or a multimood folder) or --tokenizer_path")
    video_kwargs = {}
    num_frames = data_args.num_frames or model_config.get("num_frames")
    image_size = data_args.image_size or model_config.get("image_size")
    if image_size is None and model_args.vision_tower:
        image_size = _vision_config(model_args.vision_tower).image_size
    if num_frames:
        video_kwargs["num_frames"] = int(num_frames)
    if image_size:
        video_kwargs["size"] = {"height": int(image_size), "width": int(image_size)}
    aspect = data_args.image_aspect_ratio or model_config.get("image_aspect_ratio")
    video_processor = make_video_processor(video_kwargs, aspect)
    return MultimoodProcessor.from_tokenizer(
        source,
        video_processor=video_processor,
        k_turn_history=data_args.k_turn_history,
        model_max_length=training_args.model_max_length,
        label_set=data_args.label_set,
        **({"prompt_style": data_args.prompt_style} if data_args.prompt_style else {}),
    )


def make_video_processor(video_kwargs: dict, aspect_ratio: str | None = None):
    """A `MultimoodVideoProcessor` with `num_frames` / `size` (and the aspect-ratio mode)."""
    from ..model.video_processing_multimood import MultimoodVideoProcessor  # noqa: PLC0415

    processor = MultimoodVideoProcessor()
    for name, value in video_kwargs.items():
        setattr(processor, name, value)
    if aspect_ratio is not None:
        processor.image_aspect_ratio = aspect_ratio
    return processor


def sync_processor_with_config(processor, config) -> None:
    """The saved processor must reproduce the model's media shapes: frames, size, clips, token counts."""
    video = processor.video_processor
    values = {
        "num_frames": config.num_frames,
        "size": {"height": config.image_size, "width": config.image_size},
        "num_k_vid": config.num_k_vid,
        "image_aspect_ratio": config.image_aspect_ratio,
        "patch_size": config.vision_config.patch_size,
        "connector_downsample": tuple(config.connector_downsample),
        "projector_type": config.mm_projector_type,
        "frame_pooling": config.video_frame_pooling,
    }
    for name, value in values.items():
        if hasattr(video, name):
            setattr(video, name, value)
    extractor = processor.feature_extractor
    if extractor is not None:
        for name, value in {"num_windows": config.audio_num_windows, "window_seconds": config.audio_window_seconds,
                            "max_seconds": config.audio_max_seconds, "sampling_rate": config.audio_sampling_rate,
                            "num_k_vid": config.num_k_vid}.items():
            if hasattr(extractor, name):
                setattr(extractor, name, value)


def _vision_config(path: str):
    from transformers import AutoConfig  # noqa: PLC0415

    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", config)


def build_config(model_args: ModelArguments, data_args: DataArguments, processor, model_config: dict):
    from transformers import AutoConfig  # noqa: PLC0415

    from ..model.configuration_multimood import MultimoodConfig  # noqa: PLC0415

    kwargs = dict(model_config)
    if "text_config" not in kwargs:
        if model_args.model_path is None:
            raise ValueError("no text config: pass --model_path (a Qwen2 LLM) or --model_config with text_config")
        kwargs["text_config"] = AutoConfig.from_pretrained(model_args.model_path).to_dict()
    if model_args.vision_tower and "vision_config" not in model_config:
        kwargs["vision_config"] = _vision_config(model_args.vision_tower).to_dict()
    if model_args.mamba_compressor and "compressor_config" not in model_config:
        kwargs["compressor_config"] = AutoConfig.from_pretrained(model_args.mamba_compressor).to_dict()
    if model_args.audio_tower and "audio_config" not in model_config:
        _, cfg = read_beats_checkpoint(model_args.audio_tower)
        kwargs["audio_config"] = beats_config_from_cfg(cfg)
    for name in ("mm_projector_type", "mm_projector_a_type", "mm_vision_select_layer"):
        if getattr(model_args, name) is not None:
            kwargs[name] = getattr(model_args, name)
    if data_args.image_aspect_ratio is not None:
        kwargs["image_aspect_ratio"] = data_args.image_aspect_ratio
    kwargs["num_k_vid"] = data_args.num_k_vid
    if data_args.num_frames is not None:
        kwargs["num_frames"] = data_args.num_frames
    if data_args.image_size is not None:
        kwargs["image_size"] = data_args.image_size
    elif "image_size" not in model_config:
        vision = kwargs.get("vision_config")
        if isinstance(vision, dict) and "image_size" in vision:
            kwargs["image_size"] = vision["image_size"]
    # The processor owns the token ids.
    kwargs.update(
        video_token_id=processor.video_token_id,
        audio_token_id=processor.audio_token_id,
        history_token_id=processor.history_token_id,
        mem_token_id=processor.mem_token_id,
    )
    text = kwargs["text_config"]
    if isinstance(text, dict):
        text = dict(text)
        text["pad_token_id"] = processor.pad_token_id
        if text.get("eos_token_id") is None and processor.tokenizer.eos_token_id is not None:
            text["eos_token_id"] = processor.tokenizer.eos_token_id
        text["vocab_size"] = int(text.get("vocab_size") or len(processor.tokenizer))
        kwargs["text_config"] = text
    compressor = kwargs.get("compressor_config")
    if isinstance(compressor, dict):
        compressor = dict(compressor)
        compressor["vocab_size"] = kwargs["text_config"]["vocab_size"]  # the compressor reads the LLM's token ids
        kwargs["compressor_config"] = compressor
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return MultimoodConfig(**kwargs)


def _projector_weights(source: str) -> dict[str, torch.Tensor]:
    """`mm_projector*` tensors of a folder / Hub repo / file, keyed from `mm_projector...`."""
    path = Path(source).expanduser()
    if not path.exists():
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        path = Path(snapshot_download(source, allow_patterns=["*mm_projector*", "*.safetensors", "*.json", "*.bin"]))
    files = [path] if path.is_file() else sorted(
        [*path.glob("*mm_projector*.bin"), *path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    )
    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if "mm_projector" in key:
                        tensors[key[key.index("mm_projector"):]] = f.get_tensor(key)
        else:
            state = load_pickled_weights(file)
            for key, value in state.items():
                if "mm_projector" in key and isinstance(value, torch.Tensor):
                    tensors[key[key.index("mm_projector"):]] = value
    if not tensors:
        raise FileNotFoundError(f"no mm_projector weights found in {source}")
    return tensors


def load_pretrained_parts(model, model_args: ModelArguments, load_llm: bool) -> None:
    """Copy the LLM (when `load_llm`), SigLIP, Mamba, BEATs and projector weights into a freshly built model."""
    from transformers import AutoModel, AutoModelForCausalLM, SiglipVisionModel  # noqa: PLC0415

    inner = model.model
    if model_args.model_path and load_llm:
        with _without_zero3_init():
            llm = AutoModelForCausalLM.from_pretrained(model_args.model_path, dtype=torch.float32)
        state = llm.state_dict()
        base = llm.base_model_prefix + "."
        load_into(inner.language_model, {k[len(base):]: v for k, v in state.items() if k.startswith(base)}, "LLM")
        if not model.config.tie_word_embeddings and "lm_head.weight" in state:
            load_into(model.lm_head, {"weight": state["lm_head.weight"]}, "LM head")
        del llm, state
    if model_args.vision_tower:
        with _without_zero3_init():
            vision = SiglipVisionModel.from_pretrained(model_args.vision_tower, dtype=torch.float32)
        load_into(inner.vision_tower, vision.state_dict(), "vision tower")
        del vision
    if model_args.mamba_compressor and inner.mamba_compressor is not None:
        with _without_zero3_init():
            mamba = AutoModel.from_pretrained(model_args.mamba_compressor, dtype=torch.float32)
        # The compressor reads the LLM's token ids: keep the pretrained rows, as the published resize did.
        mamba.resize_token_embeddings(model.config.compressor_config.vocab_size)
        load_into(inner.mamba_compressor.mamba, mamba.state_dict(), "history compressor")
        del mamba
    if model_args.audio_tower:
        state, _ = read_beats_checkpoint(model_args.audio_tower)
        load_into(inner.audio_tower, state, "audio tower")
    if model_args.pretrain_projectors_repo:
        tensors = _projector_weights(model_args.pretrain_projectors_repo)
        video = {k[len("mm_projector."):]: v for k, v in tensors.items() if k.startswith("mm_projector.")}
        audio = {k[len("mm_projector_a."):]: v for k, v in tensors.items() if k.startswith("mm_projector_a.")}
        if video:
            load_into(inner.mm_projector, video, "video connector")
        if audio:
            load_into(inner.mm_projector_a, audio, "audio projector")


def build_model_and_processor(model_args: ModelArguments, data_args: DataArguments,
                              training_args: MultimoodTrainingArguments):
    """(model, processor) ready for training, following the flags."""
    from ..model.modeling_multimood import MultimoodForConditionalGeneration  # noqa: PLC0415
    from ..model.processing_multimood import MultimoodProcessor  # noqa: PLC0415

    _init_deepspeed_comm(training_args)
    if is_multimood_folder(model_args.model_path):
        # Same classes as AutoModelForCausalLM / AutoProcessor(..., trust_remote_code=True) would load
        # from the folder's remote code; the package's own copies keep a single class identity.
        processor = MultimoodProcessor.from_pretrained(model_args.model_path)
        processor.k_turn_history = data_args.k_turn_history
        processor.model_max_length = training_args.model_max_length
        if data_args.prompt_style:
            processor.prompt_style = data_args.prompt_style
        kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
        model = MultimoodForConditionalGeneration.from_pretrained(model_args.model_path, dtype=torch.float32, **kwargs)
    else:
        model_config = read_model_config(model_args.model_config)
        processor = build_processor(model_args, data_args, training_args, model_config)
        config = build_config(model_args, data_args, processor, model_config)
        model = MultimoodForConditionalGeneration._from_config(config, dtype=torch.float32)
        # A `--model_config` with its own text_config describes a new LLM: `--model_path` then only gives the tokenizer.
        load_pretrained_parts(model, model_args, load_llm="text_config" not in model_config)
    sync_processor_with_config(processor, model.config)
    vocab = model.get_input_embeddings().num_embeddings
    if len(processor.tokenizer) > vocab:
        logger.info("resizing token embeddings %d -> %d", vocab, len(processor.tokenizer))
        model.resize_token_embeddings(len(processor.tokenizer))
    configure_trainable(model, model_args)
    model.config.use_cache = False
    model.config.tokenizer_model_max_length = training_args.model_max_length
    return model, processor


def trainable_parts(model, model_args: ModelArguments) -> dict[str, tuple[bool, list[torch.nn.Module]]]:
    """Each switchable block of the model: (trained?, its modules), keyed by the module names peft matches."""
    inner = model.model
    return {
        "language_model": (model_args.tune_llm, [inner.language_model, model.lm_head]),
        "mm_projector": (model_args.tune_mm_projector, [inner.mm_projector]),
        "mm_projector_a": (model_args.tune_audio_projector, [inner.mm_projector_a]),
        "mamba_compressor": (model_args.tune_compressor, [inner.mamba_compressor] if inner.mamba_compressor is not None else []),
        "vision_tower": (model_args.tune_vision_tower, [inner.vision_tower]),
        "audio_tower": (model_args.tune_audio_tower, [inner.audio_tower]),
    }


def configure_trainable(model, model_args: ModelArguments) -> None:
    """Exactly the switched-on blocks train (`--tune_*`, the towers frozen by default); everything else is frozen."""
    model.requires_grad_(False)
    for enabled, modules in trainable_parts(model, model_args).values():
        if enabled:
            for module in modules:
                module.requires_grad_(True)
    model.config.freeze_vision_tower = not model_args.tune_vision_tower
    model.config.freeze_audio_tower = not model_args.tune_audio_tower


def check_lora_switches(model_args: ModelArguments, lora_enable: bool) -> None:
    """LoRA adapts the LLM only: asking for it while freezing the LLM is a contradiction, not a silent no-op."""
    if lora_enable and not model_args.tune_llm:
        raise ValueError(
            "--lora_enable True trains LoRA adapters on the LLM, but --tune_llm False (or --tune_adapter_llm False) "
            "freezes the LLM: drop --lora_enable to train only the projectors/compressor, or set --tune_llm True"
        )


def apply_lora(model, model_args: ModelArguments, training_args: MultimoodTrainingArguments):
    """LoRA on the LLM's linear layers (its base weights frozen); the other switched-on blocks (`--tune_*`) train
    fully as peft `modules_to_save`, so that they are saved with the adapter."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    check_lora_switches(model_args, True)
    names = (training_args.lora_target_modules.split(",") if training_args.lora_target_modules else LLM_LINEAR_NAMES)
    names = [n.strip() for n in names if n.strip()]
    target = r".*language_model\..*\.(" + "|".join(names) + r")$"
    modules_to_save = [
        name for name, (enabled, modules) in trainable_parts(model, model_args).items()
        if enabled and modules and name != "language_model"
    ]
    config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        target_modules=target,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_lora_adapter(model, training_args: MultimoodTrainingArguments):
    """Continue training a saved LoRA adapter (`--lora_weight_path`): its own r, alpha, targets and modules_to_save."""
    from peft import PeftModel  # noqa: PLC0415

    path = Path(training_args.lora_weight_path).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--lora_weight_path {path}: no adapter_config.json (a folder saved by a LoRA run)")
    model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_projector_files(model, model_args: ModelArguments) -> None:
    """`--pretrain_mm_mlp_adapter` / `--pretrain_mm_mlp_adapter_a`: the published per-projector weight files."""
    inner = model.model
    for source, prefix, module, what in (
        (model_args.pretrain_mm_mlp_adapter, "mm_projector.", inner.mm_projector, "video connector"),
        (model_args.pretrain_mm_mlp_adapter_a, "mm_projector_a.", inner.mm_projector_a, "audio projector"),
    ):
        if not source:
            continue
        tensors = {k[len(prefix):]: v for k, v in _projector_weights(source).items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{source}: no `{prefix}*` tensors for the {what}")
        load_into(module, tensors, what)


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    """The dtype the quantized layers compute in: that of mixed precision (the published `compute_dtype`)."""
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def _quantized_linear(linear: torch.nn.Linear, training_args: MultimoodTrainingArguments) -> torch.nn.Module:
    """A bitsandbytes 4-bit or 8-bit copy of `linear`, quantized on the training device."""
    import bitsandbytes as bnb  # noqa: PLC0415

    has_bias = linear.bias is not None
    if training_args.bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype(training_args), quant_type=training_args.quant_type,
                                  compress_statistics=training_args.double_quant, device="meta")
        # bnb's packed CPU inference kernel computes in bf16 (and needs in_features >= its block size): keep one
        # code path, in the compute dtype, for training and evaluation.
        layer.support_avx512bf16_for_cpu = False
        weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=training_args.quant_type,
                                   compress_statistics=training_args.double_quant, module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    layer.weight = weight.to(training_args.device)  # bitsandbytes quantizes when a weight moves to a device
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(training_args.device), requires_grad=False)
    return layer


def quantize_language_model(model, training_args: MultimoodTrainingArguments) -> int:
    """Replace the LLM's linear layers by bitsandbytes 4-bit / 8-bit layers, in place; returns how many.

    Only `model.model.language_model` (attention and MLP projections): the towers, connector, projectors, compressor,
    embeddings and LM head keep their dtype, as in the published code (which quantized the LLM it loaded and added
    the other blocks afterwards).
    """
    count = 0
    for module in list(model.model.language_model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, _quantized_linear(child, training_args))
                count += 1
    # peft picks its bitsandbytes LoRA layers, and prepare_model_for_kbit_training its k-bit steps, from these.
    model.is_loaded_in_4bit = training_args.bits == 4
    model.is_loaded_in_8bit = training_args.bits == 8
    return count


def prepare_kbit_training(model, training_args: MultimoodTrainingArguments):
    """QLoRA base: the LLM quantized, then peft's `prepare_model_for_kbit_training` (everything frozen, half-precision
    parameters upcast to float32, gradient checkpointing); `apply_lora` then makes the adapters and tuned blocks
    trainable."""
    from peft import prepare_model_for_kbit_training  # noqa: PLC0415

    count = quantize_language_model(model, training_args)
    logger.info("quantized %d LLM linear layers to %d-bit (%s)", count, training_args.bits,
                training_args.quant_type if training_args.bits == 4 else "int8")
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=training_args.gradient_checkpointing,
        gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_lora_merged(trainer: Trainer, processor, output_dir: str) -> str | None:
    """Merge the LoRA adapter into a copy-free full model and save it to `output_dir/merged`."""
    model = trainer.model
    merged_dir = os.path.join(output_dir, "merged")
    gather = contextlib.nullcontext()
    if _zero3_enabled():
        import deepspeed  # noqa: PLC0415

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        if trainer.args.should_save:
            merged = model.merge_and_unload()
            state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
            merged.save_pretrained(merged_dir, state_dict=state)
            processor.save_pretrained(merged_dir)
            save_pipeline_files(merged_dir)
    return merged_dir if trainer.args.should_save else None


def full_precision_base_state(peft_model) -> dict[str, torch.Tensor]:
    """The state dict of a peft model's quantized base as a plain float32 model: the bitsandbytes weights dequantized
    (exactly the weights the adapter was trained on), LoRA layers and modules_to_save copies left out."""
    import bitsandbytes as bnb  # noqa: PLC0415
    from peft.utils.integrations import dequantize_bnb_weight  # noqa: PLC0415

    state = {}
    for module_name, module in peft_model.get_base_model().named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            state[prefix + "weight"] = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
            continue
        for name, tensor in module.named_parameters(recurse=False):
            if not isinstance(tensor, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                state[prefix + name] = tensor.detach()
        for name, tensor in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = tensor.detach()
    plain = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        plain[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = value.float().cpu()
    return plain


def save_qlora_merged(trainer: Trainer, processor, output_dir: str) -> str | None:
    """QLoRA: the adapter saved in `output_dir` merged into a float32 copy of the dequantized base, to
    `output_dir/merged` (a full model that loads with trust_remote_code, same logits as the adapter model).

    peft's own `merge_and_unload` would quantize the merged weights again, losing the adapter's update.
    """
    from peft import PeftModel  # noqa: PLC0415

    from ..model.modeling_multimood import MultimoodForConditionalGeneration  # noqa: PLC0415

    if not trainer.args.should_save:
        return None
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    full = MultimoodForConditionalGeneration._from_config(peft_model.get_base_model().config, dtype=torch.float32)
    full.load_state_dict(full_precision_base_state(peft_model), strict=True)
    merged = PeftModel.from_pretrained(full, output_dir).merge_and_unload()
    merged_dir = os.path.join(output_dir, "merged")
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    save_pipeline_files(merged_dir)
    return merged_dir


# ----------------------------------------------------------------------------------------------
# Trainer: the projector learning rate and modality-grouped batches
# ----------------------------------------------------------------------------------------------

PROJECTOR_PARAMETER_KEY = "mm_projector"  # the video connector `mm_projector` and the audio projector `mm_projector_a`


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: all but biases and the weights of normalisation layers
    (LayerNorm, RMSNorm, GroupNorm...), the published trainer's rule (`ALL_LAYERNORM_LAYERS` and "bias")."""
    names = set()
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + name for name, _ in module.named_parameters(recurse=False) if "bias" not in name)
    return names


def modality_lengths(dataset) -> list[int]:
    """Per record, its words (client fragments, therapist answer, chat history, situation), positive when the record
    has client clips (video and audio) and negative when it is text-only: the published `modality_lengths` convention."""
    lengths = []
    for record in dataset:
        texts = [*record["utt_user_most_recent"], *record["Utterance"], record.get("situation") or "",
                 record.get("problem_type") or "", *(m["content"] for m in record.get("history_chat") or [])]
        words = max(1, sum(len(text.split()) for text in texts))
        lengths.append(words if record.get("path_to_vid_user_most_recent") else -words)
    return lengths


class ModalityLengthGroupedBatchSampler:
    """Batches that hold one modality only (records with clips, or text-only), grouped by length.

    Each modality's records are shuffled and cut into megabatches of `batch_size * batches_per_megabatch` records (one
    optimizer step over all ranks and accumulation steps), sorted longest first within a megabatch and cut into
    batches; the full megabatches of both modalities are shuffled together and each modality's incomplete last
    megabatch comes at the end. The published sampler merged those two remainders into one mixed megabatch and cut
    the flat index list into batches, so batches could mix modalities; here every batch is single-modality.
    The order depends only on `seed` and the epoch (`set_epoch`), the same on every rank.
    """

    batch_size = None  # batches may be shorter than `per_device_batch_size` (accelerate shards them as they are)
    drop_last = False

    def __init__(self, lengths: list[int], per_device_batch_size: int, batches_per_megabatch: int = 1, seed: int = 0):
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (positive: with clips, negative: text-only)")
        self.lengths = list(lengths)
        self.per_device_batch_size = per_device_batch_size
        self.megabatch_size = per_device_batch_size * max(1, batches_per_megabatch)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        return [group for group in ([i for i, n in enumerate(self.lengths) if n > 0],
                                    [i for i, n in enumerate(self.lengths) if n < 0]) if group]

    def __len__(self) -> int:
        total = 0
        for group in self._groups():
            full, rest = divmod(len(group), self.megabatch_size)
            total += full * (self.megabatch_size // self.per_device_batch_size) + -(-rest // self.per_device_batch_size)
        return total

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        full, remainders = [], []
        for group in self._groups():
            shuffled = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(shuffled), self.megabatch_size):
                megabatch = sorted(shuffled[start:start + self.megabatch_size], key=lambda i: -abs(self.lengths[i]))
                cut = [megabatch[j:j + self.per_device_batch_size]
                       for j in range(0, len(megabatch), self.per_device_batch_size)]
                (full if len(megabatch) == self.megabatch_size else remainders).append(cut)
        order = torch.randperm(len(full), generator=generator).tolist()
        return [batch for megabatch in [full[k] for k in order] + remainders for batch in megabatch]

    def __iter__(self):
        return iter(self.batches())


class MultimoodTrainer(Trainer):
    """`Trainer` with the published optimizer groups (`--mm_projector_lr`) and modality-grouped batches
    (`--group_by_modality_length`)."""

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return sorted(decay_parameter_names(model))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """With `--mm_projector_lr`: the connector and audio projector in their own groups (with and without decay)."""
        if self.args.mm_projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for projector in (False, True):
            for decays in (True, False):
                params = [p for n, p in opt_model.named_parameters()
                          if p.requires_grad and (n in decay) == decays and (PROJECTOR_PARAMETER_KEY in n) == projector]
                if params:
                    group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
                    if projector:
                        group["lr"] = self.args.mm_projector_lr
                    groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.group_by_modality_length:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        batch_sampler = ModalityLengthGroupedBatchSampler(
            modality_lengths(self.train_dataset),
            per_device_batch_size=self._train_batch_size,
            batches_per_megabatch=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index),
        )
        return self.accelerator.prepare(loader)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def train(model_args: ModelArguments, data_args: DataArguments, training_args: MultimoodTrainingArguments):
    from ..model.processing_multimood import MultimoodDataCollator  # noqa: PLC0415

    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    check_lora_switches(model_args, training_args.lora_enable)
    transformers.set_seed(training_args.seed)
    # The Trainer would push output_dir as is (checkpoints, its own card): we push a prepared folder at the end,
    # and check the Hub answers before spending the training time.
    push, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    if push:
        check_hub_reachable(repo_id)
    check_quantization_flags(training_args)
    model, processor = build_model_and_processor(model_args, data_args, training_args)
    load_projector_files(model, model_args)
    if training_args.bits in (4, 8):
        model = prepare_kbit_training(model, training_args)
    if training_args.lora_enable:
        if training_args.lora_weight_path:
            model = load_lora_adapter(model, training_args)
        else:
            model = apply_lora(model, model_args, training_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))

    train_dataset = make_dataset(data_args.data_path, data_args.max_train_samples)
    eval_dataset = make_dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    video_folder = os.path.abspath(data_args.vid_folder) if data_args.vid_folder else None
    screen = BadSampleScreen(data_args.on_bad_sample, video_folder, processor.num_k_vid, training_args.output_dir,
                             main_process=training_args.process_index == 0, progress=not training_args.disable_tqdm)
    train_dataset = screen.dataset(train_dataset, data_args.data_path)
    eval_dataset = screen.dataset(eval_dataset, data_args.eval_data_path) if eval_dataset is not None else None
    collator = screen.collator(MultimoodDataCollator(processor, video_folder=video_folder, with_target=True))

    trainer = MultimoodTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint  # noqa: PLC0415

        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    model_to_save = trainer.model
    if not training_args.lora_enable:
        model_to_save.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(training_args.output_dir)
        if os.path.isfile(os.path.join(training_args.output_dir, "config.json")):  # not for a LoRA adapter folder
            save_pipeline_files(training_args.output_dir)
    merged_dir = None
    if training_args.lora_enable and training_args.merge_lora:
        save_merged = save_qlora_merged if training_args.bits in (4, 8) else save_lora_merged
        merged_dir = save_merged(trainer, processor, training_args.output_dir)
    if push and trainer.args.should_save:
        if training_args.lora_enable and merged_dir is None:
            raise ValueError("--push_to_hub with LoRA needs the merged model (--merge_lora True)")
        folder = prepare_upload_folder(
            merged_dir or training_args.output_dir, None, Path(training_args.output_dir) / "hub_upload",
            training_args={**training_args.to_dict(), "world_size": training_args.world_size},
            repo_id=repo_id, overwrite=True,
        )
        push_to_hub(folder, repo_id, token=training_args.hub_token, private=bool(training_args.hub_private_repo))
    return trainer, result


# The instructions and the four-line answer alone take ~160 tokens with the Qwen2 vocabulary (250 with the
# default system prompt): a smaller text budget cannot hold any record.
MIN_MODEL_MAX_LENGTH = 128


def check_training_flags(model_args: ModelArguments, data_args: DataArguments,
                         training_args: MultimoodTrainingArguments) -> None:
    """Flags and inputs that cannot work, found before anything heavy loads: each raises `MultimoodError`
    naming the flag (or the file, line and field of a bad record: the data files are validated here with
    the label set the processor will use, so that a run never dies at its first batch on a record)."""
    from ..model.records import LABEL_SETS, MultimoodError  # noqa: PLC0415

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
        saved = json.loads((Path(model_args.model_path) / "processor_config.json").read_text(encoding="utf-8"))
        named = LABEL_SETS.get(saved.get("label_set", "mesc"), {})
        custom = any(saved.get(k) not in (None, named.get(k)) for k in ("emotion_labels", "strategy_labels"))
        label_set = None if custom else saved.get("label_set", "mesc")
    for path in (data_args.data_path, data_args.eval_data_path):
        if path:
            count = sum(1 for _ in iter_records(path, require_targets=True, label_set=label_set))
            if count == 0:
                fail(f"--data_path {path}: no records" if path == data_args.data_path else f"--eval_data_path {path}: no records")


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args(argv)
    check_training_flags(model_args, data_args, training_args)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    return train(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
