"""Assembling the model and processor to train, and switching what trains (SFT and GRPO).

A new model (`--model_path` a plain Qwen2 LLM): the processor first (tokenizer from `--tokenizer_path` or
`--model_path`, plus the four multimood tokens and the chat template; its media settings from the flags over
`--model_config`'s) -> `MultimoodConfig` (text config of the LLM, vision config of the SigLIP folder, Mamba config of
the compressor folder, BEATs config of the checkpoint's `cfg`, token ids from the processor; `--model_config` JSON
overrides/replaces all of it) -> the model (`_from_config`, so that ZeRO-3 partitions it at construction) ->
pretrained weights through the standard loaders (`AutoModelForCausalLM`, `AutoModel`, `torch.load(weights_only=True)`
for BEATs) copied into the sub-modules (inside `deepspeed.zero.GatheredParameters(..., modifier_rank=0)` under
ZeRO-3) -> token embeddings resized when the tokenizer is larger than the vocabulary.
A saved multimood folder (continue training): model and processor loaded from it, the flags given applied to the
processor. Either way the processor's frames and token counts then follow the model (`fit_processor_to_model`).
LoRA (`apply_lora`) and QLoRA (`prepare_kbit_training`) come after assembly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, SiglipVisionModel, TrainingArguments
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..checkpoints.assembly import (
    build_processor,
    fit_config_to_processor,
    fit_processor_to_model,
    set_media_settings,
    split_processor_settings,
)
from ..checkpoints.model_folder import is_multimood_folder
from ..checkpoints.weights import beats_config_from_cfg, projector_weights, read_beats_checkpoint
from ..model.configuration_multimood import MultimoodConfig
from ..model.modeling_multimood import MultimoodForConditionalGeneration
from ..model.processing_multimood import MultimoodProcessor
from .arguments import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    MultimoodTrainingArguments,
    TuneArguments,
    read_model_config,
)

logger = logging.getLogger("multimood.training.assembly")

LLM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# ZeRO-3
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _without_zero3_init():
    """Load source checkpoints as plain full tensors even while the Trainer's ZeRO-3 config is active."""
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Let `deepspeed.comm` adopt the running process group before ZeRO-3 builds the model.

    ZeRO-3 partitions the model at construction (`deepspeed.zero.Init`), whose config reads the world size from
    `deepspeed.comm`. With `use_cpu=True` accelerate initialises only `torch.distributed` (gloo), so DeepSpeed would
    see one rank and fail its batch-size check (`train_batch_size ... 2 != 1 * 1 * 1`) on two CPU ranks.
    """
    if not is_deepspeed_zero3_enabled():
        return
    _ = training_args.device  # sets up torch.distributed under torchrun
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed  # noqa: PLC0415 - optional heavy dependency, present whenever ZeRO-3 is on

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state_dict` into `module` (shape-mismatched tensors skipped), gathering ZeRO-3 partitions."""
    own = module.state_dict() if not is_deepspeed_zero3_enabled() else None
    if own is not None:
        skipped = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    else:
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
        skipped = [k for k, v in state_dict.items() if k in shapes and shapes[k] != tuple(v.shape)]
    if skipped:
        logger.warning("%s: skipping %d tensors whose shapes differ: %s", what, len(skipped), skipped[:8])
    state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    if is_deepspeed_zero3_enabled():
        import deepspeed  # noqa: PLC0415 - optional heavy dependency, present whenever ZeRO-3 is on

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
            logger.warning(
                "%s: %d unused checkpoint tensors: %s", what, len(result.unexpected_keys), result.unexpected_keys[:8]
            )
    logger.info("loaded %s (%d tensors)", what, len(state_dict))


# ----------------------------------------------------------------------------------------------
# Processor and config
# ----------------------------------------------------------------------------------------------


def media_flags(data_args: DataArguments) -> dict:
    """The processor settings given as flags (None: not given)."""
    return {"num_frames": data_args.num_frames, "image_size": data_args.image_size,
            "image_aspect_ratio": data_args.image_aspect_ratio, "num_k_vid": data_args.num_k_vid}


def processor_from_args(model_args: ModelArguments, data_args: DataArguments,
                        training_args: MultimoodTrainingArguments, settings: dict | None = None) -> MultimoodProcessor:
    """A new processor: the tokenizer of `--tokenizer_path` (or `--model_path`), the media `settings` of
    `--model_config` with the flags over them, the history, text budget, label set and prompt style flags."""
    source = model_args.tokenizer_path or model_args.model_path
    if source is None:
        raise ValueError("pass --model_path (a Qwen2 LLM or a multimood folder) or --tokenizer_path")
    flags = {key: value for key, value in media_flags(data_args).items() if value is not None}
    return build_processor(
        source, {**(settings or {}), **flags},
        k_turn_history=data_args.k_turn_history,
        model_max_length=training_args.model_max_length,
        label_set=data_args.label_set,
        **({"prompt_style": data_args.prompt_style} if data_args.prompt_style else {}),
    )


def config_from_args(model_args: ModelArguments, processor: MultimoodProcessor, architecture: dict) -> MultimoodConfig:
    """The config of a new model: `architecture` (from `--model_config`) over the configs of the pretrained parts,
    the projector flags, fitted to the processor's tokens."""
    kwargs = dict(architecture)
    if "text_config" not in kwargs:
        if model_args.model_path is None:
            raise ValueError("no text config: pass --model_path (a Qwen2 LLM) or --model_config with text_config")
        kwargs["text_config"] = AutoConfig.from_pretrained(model_args.model_path).to_dict()
    if model_args.vision_tower and "vision_config" not in architecture:
        kwargs["vision_config"] = _vision_config(model_args.vision_tower).to_dict()
    if model_args.mamba_compressor and "compressor_config" not in architecture:
        kwargs["compressor_config"] = AutoConfig.from_pretrained(model_args.mamba_compressor).to_dict()
    if model_args.audio_tower and "audio_config" not in architecture:
        _, cfg = read_beats_checkpoint(model_args.audio_tower)
        kwargs["audio_config"] = beats_config_from_cfg(cfg)
    for name in ("mm_projector_type", "mm_projector_a_type", "mm_vision_select_layer"):
        if getattr(model_args, name) is not None:
            kwargs[name] = getattr(model_args, name)
    kwargs = fit_config_to_processor(kwargs, processor)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return MultimoodConfig(**kwargs)


def _check_frame_size(requested: int | None, config: MultimoodConfig) -> None:
    """SigLIP reads frames of its own image size only."""
    side = config.vision_config.image_size
    if requested is not None and int(requested) != side:
        raise ValueError(f"--image_size {requested} differs from the vision tower's image size {side}: "
                         "frames must have the size SigLIP reads (leave --image_size out)")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def _vision_config(path: str):
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", config)


def load_pretrained_parts(model, model_args: ModelArguments, load_llm: bool) -> None:
    """Copy the LLM (when `load_llm`), SigLIP, Mamba, BEATs and projector weights into a freshly built model."""
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
        tensors = projector_weights(model_args.pretrain_projectors_repo)
        video = {k[len("mm_projector."):]: v for k, v in tensors.items() if k.startswith("mm_projector.")}
        audio = {k[len("mm_projector_a."):]: v for k, v in tensors.items() if k.startswith("mm_projector_a.")}
        if video:
            load_into(inner.mm_projector, video, "video connector")
        if audio:
            load_into(inner.mm_projector_a, audio, "audio projector")


def _assemble_new_model(model_args: ModelArguments, data_args: DataArguments,
                        training_args: MultimoodTrainingArguments):
    """(model, processor) of a new model: the config of the parts, their pretrained weights."""
    architecture, settings = split_processor_settings(read_model_config(model_args.model_config))
    processor = processor_from_args(model_args, data_args, training_args, settings)
    config = config_from_args(model_args, processor, architecture)
    _check_frame_size(data_args.image_size or settings.get("image_size"), config)
    model = MultimoodForConditionalGeneration._from_config(config, dtype=torch.float32)
    # A `--model_config` with its own text_config describes a new LLM: `--model_path` then only gives the tokenizer.
    load_pretrained_parts(model, model_args, load_llm="text_config" not in architecture)
    return model, processor


def _load_saved_model(model_args: ModelArguments, data_args: DataArguments,
                      training_args: MultimoodTrainingArguments):
    """(model, processor) of a saved multimood folder, the flags given applied to its processor."""
    # Same classes as AutoModelForCausalLM / AutoProcessor(..., trust_remote_code=True) would load
    # from the folder's remote code; the package's own copies keep a single class identity.
    processor = MultimoodProcessor.from_pretrained(model_args.model_path)
    processor.k_turn_history = data_args.k_turn_history
    processor.model_max_length = training_args.model_max_length
    if data_args.prompt_style:
        processor.prompt_style = data_args.prompt_style
    set_media_settings(processor, media_flags(data_args))
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model = MultimoodForConditionalGeneration.from_pretrained(model_args.model_path, dtype=torch.float32, **kwargs)
    _check_frame_size(data_args.image_size, model.config)
    return model, processor


def build_model_and_processor(model_args: ModelArguments, data_args: DataArguments,
                              training_args: MultimoodTrainingArguments):
    """(model, processor) ready for training, following the flags."""
    _init_deepspeed_comm(training_args)
    if is_multimood_folder(model_args.model_path):
        model, processor = _load_saved_model(model_args, data_args, training_args)
    else:
        model, processor = _assemble_new_model(model_args, data_args, training_args)
    fit_processor_to_model(processor, model.config)
    vocab = model.get_input_embeddings().num_embeddings
    if len(processor.tokenizer) > vocab:
        logger.info("resizing token embeddings %d -> %d", vocab, len(processor.tokenizer))
        model.resize_token_embeddings(len(processor.tokenizer))
    configure_trainable(model, model_args)
    model.config.use_cache = False
    model.config.tokenizer_model_max_length = training_args.model_max_length
    return model, processor


# ----------------------------------------------------------------------------------------------
# What trains: switches, LoRA, QLoRA
# ----------------------------------------------------------------------------------------------


def trainable_parts(model, tune: TuneArguments) -> dict[str, tuple[bool, list[torch.nn.Module]]]:
    """Each switchable block of the model: (trained?, its modules), keyed by the module names peft matches."""
    inner = model.model
    compressor = [inner.mamba_compressor] if inner.mamba_compressor is not None else []
    return {
        "language_model": (tune.tune_llm, [inner.language_model, model.lm_head]),
        "mm_projector": (tune.tune_mm_projector, [inner.mm_projector]),
        "mm_projector_a": (tune.tune_audio_projector, [inner.mm_projector_a]),
        "mamba_compressor": (tune.tune_compressor, compressor),
        "vision_tower": (tune.tune_vision_tower, [inner.vision_tower]),
        "audio_tower": (tune.tune_audio_tower, [inner.audio_tower]),
    }


def configure_trainable(model, tune: TuneArguments) -> None:
    """Exactly the switched-on blocks train (`--tune_*`, the towers frozen by default); everything else is frozen."""
    model.requires_grad_(False)
    for enabled, modules in trainable_parts(model, tune).values():
        if enabled:
            for module in modules:
                module.requires_grad_(True)
    model.config.freeze_vision_tower = not tune.tune_vision_tower
    model.config.freeze_audio_tower = not tune.tune_audio_tower


def check_lora_switches(tune: TuneArguments, lora_enable: bool) -> None:
    """LoRA adapts the LLM only: asking for it while freezing the LLM is a contradiction, not a silent no-op."""
    if lora_enable and not tune.tune_llm:
        raise ValueError(
            "--lora_enable True trains LoRA adapters on the LLM, but --tune_llm False (or --tune_adapter_llm False) "
            "freezes the LLM: drop --lora_enable to train only the projectors/compressor, or set --tune_llm True"
        )


def apply_lora(model, tune: TuneArguments, lora: LoraArguments, gradient_checkpointing: bool = False):
    """LoRA on the LLM's linear layers (its base weights frozen); the other switched-on blocks (`--tune_*`) train
    fully as peft `modules_to_save`, so that they are saved with the adapter."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - optional heavy dependency (the train extra)

    check_lora_switches(tune, True)
    names = lora.lora_target_modules.split(",") if lora.lora_target_modules else LLM_LINEAR_NAMES
    names = [n.strip() for n in names if n.strip()]
    target = r".*language_model\..*\.(" + "|".join(names) + r")$"
    modules_to_save = [
        name for name, (enabled, modules) in trainable_parts(model, tune).items()
        if enabled and modules and name != "language_model"
    ]
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.lora_bias,
        target_modules=target,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_lora_adapter(model, training_args: MultimoodTrainingArguments):
    """Continue training a saved LoRA adapter (`--lora_weight_path`): its own r, alpha, targets and modules_to_save."""
    from peft import PeftModel  # noqa: PLC0415 - optional heavy dependency (the train extra)

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
        tensors = {k[len(prefix):]: v for k, v in projector_weights(source).items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{source}: no `{prefix}*` tensors for the {what}")
        load_into(module, tensors, what)


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    """The dtype the quantized layers compute in: that of mixed precision (the published `compute_dtype`)."""
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def _quantized_linear(linear: torch.nn.Linear, training_args: MultimoodTrainingArguments) -> torch.nn.Module:
    """A bitsandbytes 4-bit or 8-bit copy of `linear`, quantized on the training device."""
    import bitsandbytes as bnb  # noqa: PLC0415 - optional heavy dependency (the qlora extra)

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
    from peft import prepare_model_for_kbit_training  # noqa: PLC0415 - optional heavy dependency (the qlora extra)

    count = quantize_language_model(model, training_args)
    logger.info("quantized %d LLM linear layers to %d-bit (%s)", count, training_args.bits,
                training_args.quant_type if training_args.bits == 4 else "int8")
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=training_args.gradient_checkpointing,
        gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
    )


