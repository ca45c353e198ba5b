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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .convert_videollama2_to_multimood import beats_config_from_cfg, load_pickled_weights, read_beats_checkpoint
from .dataset_builder import iter_records, load_dialogues
from .hub import check_hub_reachable, check_model_folder, prepare_upload_folder, push_to_hub
from .pipeline_multimood import save_pipeline_files

logger = logging.getLogger("multimood.train")

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
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})


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
    if model_args.model_type.lower() not in QWEN2_MODEL_TYPES and "qwen2" not in model_args.model_type.lower():
        raise ValueError(f"--model_type {model_args.model_type!r}: only the Qwen2 family is supported ({QWEN2_MODEL_TYPES})")
    return model_args, data_args, training_args


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
    from .processing_multimood import MultimoodProcessor  # noqa: PLC0415

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
    )


def make_video_processor(video_kwargs: dict, aspect_ratio: str | None = None):
    """A `MultimoodVideoProcessor` with `num_frames` / `size` (and the aspect-ratio mode)."""
    from .video_processing_multimood import MultimoodVideoProcessor  # noqa: PLC0415

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

    from .configuration_multimood import MultimoodConfig  # noqa: PLC0415

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
    from .modeling_multimood import MultimoodForConditionalGeneration  # noqa: PLC0415
    from .processing_multimood import MultimoodProcessor  # noqa: PLC0415

    _init_deepspeed_comm(training_args)
    if is_multimood_folder(model_args.model_path):
        # Same classes as AutoModelForCausalLM / AutoProcessor(..., trust_remote_code=True) would load
        # from the folder's remote code; the package's own copies keep a single class identity.
        processor = MultimoodProcessor.from_pretrained(model_args.model_path)
        processor.k_turn_history = data_args.k_turn_history
        processor.model_max_length = training_args.model_max_length
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


def configure_trainable(model, model_args: ModelArguments) -> None:
    inner = model.model
    model.requires_grad_(False)
    parts = {
        "llm": (model_args.tune_llm, [inner.language_model, model.lm_head]),
        "mm_projector": (model_args.tune_mm_projector, [inner.mm_projector]),
        "audio_projector": (model_args.tune_audio_projector, [inner.mm_projector_a]),
        "compressor": (model_args.tune_compressor, [inner.mamba_compressor] if inner.mamba_compressor is not None else []),
        "vision_tower": (model_args.tune_vision_tower, [inner.vision_tower]),
        "audio_tower": (model_args.tune_audio_tower, [inner.audio_tower]),
    }
    for _, (enabled, modules) in parts.items():
        if enabled:
            for module in modules:
                module.requires_grad_(True)
    model.config.freeze_vision_tower = not model_args.tune_vision_tower
    model.config.freeze_audio_tower = not model_args.tune_audio_tower


def apply_lora(model, model_args: ModelArguments, training_args: MultimoodTrainingArguments):
    """LoRA on the LLM's linear layers; the connector, projector and compressor stay fully trainable."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    names = (training_args.lora_target_modules.split(",") if training_args.lora_target_modules else LLM_LINEAR_NAMES)
    names = [n.strip() for n in names if n.strip()]
    target = r".*language_model\..*\.(" + "|".join(names) + r")$"
    modules_to_save = []
    if model_args.tune_mm_projector:
        modules_to_save.append("mm_projector")
    if model_args.tune_audio_projector:
        modules_to_save.append("mm_projector_a")
    if model_args.tune_compressor and model.model.mamba_compressor is not None:
        modules_to_save.append("mamba_compressor")
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


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def train(model_args: ModelArguments, data_args: DataArguments, training_args: MultimoodTrainingArguments):
    from .processing_multimood import MultimoodDataCollator  # noqa: PLC0415

    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    transformers.set_seed(training_args.seed)
    # The Trainer would push output_dir as is (checkpoints, its own card): we push a prepared folder at the end,
    # and check the Hub answers before spending the training time.
    push, training_args.push_to_hub = training_args.push_to_hub, False
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    if push:
        check_hub_reachable(repo_id)
    model, processor = build_model_and_processor(model_args, data_args, training_args)
    if training_args.lora_enable:
        model = apply_lora(model, model_args, training_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))

    train_dataset = make_dataset(data_args.data_path, data_args.max_train_samples)
    eval_dataset = make_dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    video_folder = os.path.abspath(data_args.vid_folder) if data_args.vid_folder else None
    collator = MultimoodDataCollator(processor, video_folder=video_folder, with_target=True)

    trainer = Trainer(
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
        merged_dir = save_lora_merged(trainer, processor, training_args.output_dir)
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
    from .processing_multimood import LABEL_SETS  # noqa: PLC0415
    from .records import MultimoodError  # noqa: PLC0415

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
