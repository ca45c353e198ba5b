"""Convert a published MultiMood / VideoLLaMA 2(.1-AV) Qwen2 checkpoint into a multimood folder, and back.

    multimood convert PUBLISHED_DIR OUT_DIR [--tokenizer DIR] [--vision_tower DIR] [--audio_tower FILE]
                      [--mamba_compressor DIR] [--dtype auto|float32|bfloat16|float16]
                      [--prompt_style published-eval|published-train|multimood]
                      [--config_overrides JSON] [--strict] [--overwrite] [--verify]
    multimood convert --to-published MULTIMOOD_DIR OUT_DIR

The published checkpoint is a folder with a `config.json` (model_type `videollama2_qwen2`: a Qwen2 config
plus the VideoLLaMA extras `mm_projector_type`, `num_frames`, `mm_projector_a_type`, `mem_token_id`, ...)
and weights in `pytorch_model*.bin` (read with `torch.load(..., weights_only=True)`, never unpickled
freely) or `*.safetensors` shards, with or without an index json. The output loads with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`, `AutoProcessor.from_pretrained(...)`
and `pipeline("emotional-support", model=out, trust_remote_code=True)`.

Renames (published -> multimood), everything else keeps its name:

| published | multimood |
|---|---|
| `model.{embed_tokens,layers,norm}.*` | `model.language_model.*` |
| `model.vision_tower.vision_tower.vision_model.*` | `model.vision_tower.*` (transformers 5 SigLIP layout) |
| `model.mm_projector.{0,2}.*` (`mlp2x_gelu`) | `model.mm_projector.readout.{0,2}.*` |
| `model.audio_tower.encoder.pos_conv.0.weight_g` / `_v` | `...pos_conv.0.parametrizations.weight.original0` / `1` |
| `model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.*` | `...encoder.relative_attention_bias.*` |

Tensors that are read but not used are reported, never dropped silently: the BEATs AudioSet classifier
(`predictor.*`), the per-layer copies of the shared relative position bias (layers 1..N-1, checked equal
to layer 0's), the SigLIP attention-pooling head, recomputed rotary buffers, and the LM head of a model
with tied embeddings. Unknown tensors are reported too (`--strict` makes them an error). The list goes
to the log and to `conversion_report.json` in the output folder. A tensor the model needs and no source
provides is an error that names it.

The published profile: the output folder reproduces the published system, not only its weights, so `multimood
predict` + `multimood evaluate` on it is the paper's protocol with no extra flags. Its processor gets the published
frames per clip and aspect ratio (config.json's `num_frames` / `image_aspect_ratio`, else the published code's
fallbacks 8 and `square`), `prompt_style` (default `"published-eval"`, the prompt of the published evaluation;
`--prompt_style` chooses another), the published audio window rule (`audio_window_rule="pytorchvideo-0.1.5"`),
`inject_history_memory=False` (the published LLM never received the compressor's memory tokens; True only with
`--prompt_style multimood`, whose prompts hold `<history>` placeholders), BEATs `encoder_layerdrop=0.05` (the
published training value; inference is unaffected) and, for an `mlp2x_gelu` video projector, the published frame
averaging (`video_frame_pooling="mean"`). `--config_overrides` is applied after the profile. Its
`generation_config.json` holds the published evaluation's decoding (`PUBLISHED_GENERATION`: greedy, up to 2048 new
tokens), which `multimood predict` uses unless told otherwise. The values written are listed under `profile` in
`conversion_report.json`; docs/fidelity.md explains each.

Vocabulary: the processor is built from `--tokenizer` (or the checkpoint folder when it holds a tokenizer)
with `MultimoodProcessor.from_tokenizer`; its `<video> <audio> <history> <MEM>` ids go into the config.
Embedding tables smaller than the tokenizer are extended with the mean of their rows; the compressor's
`<MEM>` row (the published `mem_token_id`) is copied to the processor's `<MEM>` id when they differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, Qwen2Config

from ..cli import run_command
from ..model.configuration_multimood import MAMBA_370M, BeatsConfig, MultimoodConfig
from ..model.modeling_multimood import MultimoodForConditionalGeneration
from ..model.processing_multimood import MultimoodProcessor
from ..model.records import PROMPT_STYLES, MultimoodError
from ..model.video_processing_multimood import MultimoodVideoProcessor
from .assembly import (
    build_processor,
    fit_config_to_processor,
    fit_processor_to_model,
    set_media_settings,
    split_processor_settings,
)
from .model_folder import (
    PROCESSOR_CONFIG_NAME,
    check_model_folder,
    is_hub_id,
    read_json_config,
    save_model_folder,
)
from .weights import (
    BEATS_WEIGHT_NORM,
    beats_config_from_cfg,
    convert_beats_state_dict,
    group_keys,
    read_beats_checkpoint,
    read_folder_weights,
    read_state_dict,
)

logger = logging.getLogger("multimood.convert")

REPORT_NAME = "conversion_report.json"
PUBLISHED_WEIGHTS_NAME = "pytorch_model.bin"

# `config.json` keys of the published model that the conversion reads.
USED_CONFIG_KEYS = {
    "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "image_aspect_ratio", "num_frames", "mm_projector_a_type", "mm_hidden_size_a", "hidden_size_a",
    "tokenizer_model_max_length", "mem_token_id", "mamba_compressor", "tokenizer_len", "mm_vision_tower",
    "mm_audio_tower", "vision_tower", "audio_tower",
}
# Keys of the published config that describe training or bookkeeping and mean nothing to the converted model.
IGNORED_CONFIG_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "auto_map", "torch_dtype", "dtype",
    "use_cache", "use_mm_proj", "tune_mm_mlp_adapter", "tune_mm_mlp_adapter_a", "freeze_mm_mlp_adapter",
    "freeze_mm_mlp_adapter_a", "mm_projector_lr", "mm_use_im_start_end", "mm_use_im_patch_token",
    "tokenizer_padding_side", "freeze_mamba_compressor", "tune_audio_tower", "tune_vision_tower",
    "pretrain_projectors_repo", "pretrain_mm_mlp_adapter", "pretrain_mm_mlp_adapter_a", "image_grid_pinpoints",
    "mm_patch_merge_type", "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "mm_vision_select_feature_a",
    "mm_audio_select_layer", "tune_adapter_llm", "layer_types",
}
# Legacy Qwen2 config spellings that transformers 5 still understands.
LEGACY_QWEN2_KEYS = {"rope_theta", "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers"}
GENERIC_CONFIG_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "auto_map", "torch_dtype", "dtype",
    "use_cache", "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder",
}
# Attention heads of the published SigLIP sizes (the head count is not visible in the tensors).
SIGLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16}
# The published code's fallbacks when its config lacks a value (framework/constants.py, train.py).
PUBLISHED_DEFAULT_NUM_FRAMES = 8
PUBLISHED_DEFAULT_ASPECT_RATIO = "square"
# The published BEATsConfig default, in effect in published training (the frozen tower stays in train mode).
PUBLISHED_BEATS_LAYERDROP = 0.05
PUBLISHED_AUDIO_WINDOW_RULE = "pytorchvideo-0.1.5"
# the published evaluation's decoding (inference_eval: do_sample=False, max_new_tokens=2048; its temperature 0.0 and
# top_p 0.9 do nothing in greedy decoding)
PUBLISHED_GENERATION = {"do_sample": False, "max_new_tokens": 2048}
_MLP_INDEX = re.compile(r"^(\d+)\.(weight|bias)$")
MAMBA_EMBEDDINGS = "model.mamba_compressor.mamba.embeddings.weight"


class ConversionError(MultimoodError):
    """The checkpoint cannot be converted (a missing tensor, an unsupported layout, conflicting inputs)."""


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What happened to every tensor and config key; written as `conversion_report.json`."""

    source: str
    output: str
    direction: str = "published->multimood"
    renamed: dict[str, str] = field(default_factory=dict)  # source key -> output key (identity included)
    unused: dict[str, str] = field(default_factory=dict)  # source key -> why it is not needed
    unknown: dict[str, str] = field(default_factory=dict)  # source key -> why it matched nothing
    adjusted: dict[str, str] = field(default_factory=dict)  # output key -> what was changed
    other_sources: dict[str, str] = field(default_factory=dict)  # block -> where its weights came from
    other_sources_unused: dict[str, str] = field(default_factory=dict)  # "file:key" -> reason
    config_used: dict[str, Any] = field(default_factory=dict)
    config_ignored: list[str] = field(default_factory=list)
    config_unknown: list[str] = field(default_factory=list)
    inferred: dict[str, Any] = field(default_factory=dict)  # config values read off tensor shapes
    assumed: dict[str, Any] = field(default_factory=dict)  # config values neither given nor inferable
    special_tokens: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # published behaviours written into the folder
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "direction": self.direction,
            "summary": {
                "converted": len(self.renamed),
                "unused": len(self.unused),
                "unknown": len(self.unknown),
                "adjusted": len(self.adjusted),
            },
            "tensors": {
                "renamed": self.renamed,
                "unused": self.unused,
                "unknown": self.unknown,
                "adjusted": self.adjusted,
                "other_sources": self.other_sources,
                "other_sources_unused": self.other_sources_unused,
            },
            "config": {
                "used": self.config_used,
                "ignored": sorted(self.config_ignored),
                "unknown": sorted(self.config_unknown),
                "inferred": self.inferred,
                "assumed": self.assumed,
            },
            "special_tokens": self.special_tokens,
            "profile": self.profile,
            "dtype": self.dtype,
            "notes": self.notes,
        }

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / REPORT_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        return path

    def log(self) -> None:
        logger.info("converted %d tensors from %s", len(self.renamed), self.source)
        for title, entries, level in (
            ("unused", self.unused, logging.WARNING),
            ("unknown", self.unknown, logging.WARNING),
        ):
            if entries:
                logger.log(level, "%d %s tensor(s) in the checkpoint (see %s):", len(entries), title, REPORT_NAME)
                for pattern, (count, reason) in group_keys(entries).items():
                    logger.log(level, "  %s%s: %s", pattern, f" (x{count})" if count > 1 else "", reason)
        for key, what in self.adjusted.items():
            logger.info("adjusted %s: %s", key, what)
        for block, values in self.assumed.items():
            logger.warning("assumed (neither in the checkpoint nor given): %s = %s", block, values)
        if self.config_unknown:
            logger.warning("config.json keys not understood (ignored): %s", ", ".join(sorted(self.config_unknown)))
        for note in self.notes:
            logger.warning("note: %s", note)


# ----------------------------------------------------------------------------------------------
# Sub-configs read off the tensors
# ----------------------------------------------------------------------------------------------


def beats_config_from_state(state: dict[str, torch.Tensor], cfg: dict | None = None) -> tuple[dict, dict, dict]:
    """(BeatsConfig kwargs, inferred, assumed) from our-layout BEATs tensors (plus an original `cfg`, if any).

    Shapes give the sizes; `max_distance`, `deep_norm`, `layer_norm_first`, `activation_fn` are not visible in
    the tensors and come from `cfg` or the BEATs defaults (reported as assumed)."""
    kwargs = beats_config_from_cfg(cfg or {})
    inferred: dict[str, Any] = {}
    patch = state.get("patch_embedding.weight")
    if patch is None:
        raise ConversionError("BEATs: missing required tensor patch_embedding.weight")
    inferred["embed_dim"] = int(patch.shape[0])
    inferred["input_patch_size"] = int(patch.shape[-1])
    inferred["conv_bias"] = "patch_embedding.bias" in state
    proj = state.get("post_extract_proj.weight")
    inferred["encoder_embed_dim"] = int(proj.shape[0]) if proj is not None else inferred["embed_dim"]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))}
    if not layers:
        raise ConversionError("BEATs: no encoder layers (encoder.layers.N.*) in the audio tower tensors")
    inferred["encoder_layers"] = max(layers) + 1
    fc1 = state.get("encoder.layers.0.fc1.weight")
    if fc1 is not None:
        inferred["encoder_ffn_embed_dim"] = int(fc1.shape[0])
    bias = state.get("encoder.relative_attention_bias.weight")
    inferred["relative_position_embedding"] = bias is not None
    if bias is not None:
        inferred["num_buckets"] = int(bias.shape[0])
        inferred["encoder_attention_heads"] = int(bias.shape[1])
    grep = state.get("encoder.layers.0.self_attn.grep_a")
    inferred["gru_rel_pos"] = grep is not None
    if grep is not None:
        inferred["encoder_attention_heads"] = int(grep.shape[1])
    direction = state.get(BEATS_WEIGHT_NORM["encoder.pos_conv.0.weight_v"])
    if direction is not None:
        inferred["conv_pos"] = int(direction.shape[2])
        inferred["conv_pos_groups"] = int(direction.shape[0] // direction.shape[1])
    if "encoder_attention_heads" not in inferred and "encoder_attention_heads" not in kwargs:
        raise ConversionError(
            "BEATs: the number of attention heads is not visible in the tensors; pass --audio_tower with a cfg"
        )
    defaults = BeatsConfig()
    assumed = {
        name: kwargs.get(name, getattr(defaults, name))
        for name in ("max_distance", "deep_norm", "layer_norm_first", "activation_fn")
        if name not in kwargs
    }
    kwargs.update(inferred)
    return kwargs, inferred, assumed


def _strip_vision_prefix(key: str) -> str:
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


def siglip_config_from_state(state: dict[str, torch.Tensor], name_hint: str | None = None) -> tuple[dict, dict]:
    """(SigLIP vision config kwargs, inferred) from SigLIP vision tensors (keys without `vision_model.`)."""
    patch = state.get("embeddings.patch_embedding.weight")
    positions = state.get("embeddings.position_embedding.weight")
    if patch is None or positions is None:
        raise ConversionError(
            "vision tower: missing required tensor embeddings.patch_embedding.weight / position_embedding.weight"
        )
    hidden, channels, patch_size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[-1])
    side = math.isqrt(int(positions.shape[0]))
    layers = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))}
    fc1 = state.get("encoder.layers.0.mlp.fc1.weight")
    heads = SIGLIP_HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise ConversionError(
            f"vision tower: cannot tell the number of attention heads of a {hidden}-wide SigLIP from its tensors; "
            "pass --vision_tower with a folder holding its config.json"
        )
    inferred = {
        "hidden_size": hidden, "num_channels": channels, "patch_size": patch_size, "image_size": side * patch_size,
        "num_hidden_layers": max(layers) + 1 if layers else 0, "num_attention_heads": heads,
    }
    if fc1 is not None:
        inferred["intermediate_size"] = int(fc1.shape[0])
    kwargs = {"model_type": "siglip_vision_model", **inferred, "vision_use_head": False}
    if name_hint and "/" in name_hint:
        kwargs["_name_or_path"] = name_hint
    return kwargs, inferred


def mamba_config_from_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(Mamba config kwargs, inferred) from `mamba.*` tensors (keys relative to the Mamba model)."""
    if any(k.endswith("mixer.dt_bias") for k in state):
        raise ConversionError(
            "history compressor: these are Mamba2 tensors, whose head layout cannot be read off the shapes; "
            "pass --mamba_compressor with a folder holding its config.json"
        )
    embeddings = state.get("embeddings.weight")
    in_proj = state.get("layers.0.mixer.in_proj.weight")
    a_log = state.get("layers.0.mixer.A_log")
    conv = state.get("layers.0.mixer.conv1d.weight")
    dt_proj = state.get("layers.0.mixer.dt_proj.weight")
    for name, value in (("embeddings.weight", embeddings), ("layers.0.mixer.in_proj.weight", in_proj),
                        ("layers.0.mixer.A_log", a_log), ("layers.0.mixer.conv1d.weight", conv),
                        ("layers.0.mixer.dt_proj.weight", dt_proj)):
        if value is None:
            raise ConversionError(f"history compressor: missing required tensor model.mamba_compressor.mamba.{name}")
    hidden = int(embeddings.shape[1])
    intermediate = int(in_proj.shape[0]) // 2
    layers = {int(m.group(1)) for k in state if (m := re.match(r"^layers\.(\d+)\.", k))}
    inferred = {
        "vocab_size": int(embeddings.shape[0]), "hidden_size": hidden, "num_hidden_layers": max(layers) + 1,
        "state_size": int(a_log.shape[1]), "expand": intermediate // hidden, "intermediate_size": intermediate,
        "conv_kernel": int(conv.shape[-1]), "time_step_rank": int(dt_proj.shape[1]),
        "use_bias": "layers.0.mixer.in_proj.bias" in state, "use_conv_bias": "layers.0.mixer.conv1d.bias" in state,
    }
    if intermediate % hidden:
        raise ConversionError(f"history compressor: in_proj width {2 * intermediate} is not 2 x expand x {hidden}")
    kwargs = {"model_type": "mamba", **{k: v for k, v in MAMBA_370M.items() if k not in inferred}, **inferred}
    return kwargs, inferred


def _qwen2_fields() -> set[str]:
    return (set(Qwen2Config().to_dict()) | LEGACY_QWEN2_KEYS) - GENERIC_CONFIG_KEYS - {"layer_types"}


def _dominant_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = defaultdict(int)
    for value in tensors.values():
        if value.is_floating_point():
            counts[value.dtype] += value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _mean_extend(table: torch.Tensor, rows: int) -> torch.Tensor:
    """`table` with rows appended up to `rows`, each the mean of the existing rows."""
    if table.shape[0] >= rows:
        return table
    mean = table.float().mean(dim=0, keepdim=True).to(table.dtype)
    return torch.cat([table, mean.expand(rows - table.shape[0], -1)], dim=0)


# ----------------------------------------------------------------------------------------------
# Published -> multimood
# ----------------------------------------------------------------------------------------------


@dataclass
class _Groups:
    """Published tensors sorted by block, keyed relative to the block."""

    llm: dict[str, torch.Tensor] = field(default_factory=dict)
    lm_head: torch.Tensor | None = None
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # SigLIP keys without `vision_model.`
    video_projector: dict[str, torch.Tensor] = field(default_factory=dict)
    audio: dict[str, torch.Tensor] = field(default_factory=dict)  # published BEATs keys
    audio_projector: dict[str, torch.Tensor] = field(default_factory=dict)
    compressor: dict[str, torch.Tensor] = field(default_factory=dict)  # `mamba.*` and `memory_projection.*`
    source_key: dict[tuple[str, str], str] = field(default_factory=dict)  # (block, relative key) -> published key


PREFIXES = (
    ("vision", "model.vision_tower.vision_tower."),
    ("video_projector", "model.mm_projector."),
    ("audio", "model.audio_tower."),
    ("audio_projector", "model.mm_projector_a."),
    ("compressor", "model.mamba_compressor."),
    ("llm", "model."),
)


def split_published(state: dict[str, torch.Tensor], report: ConversionReport) -> _Groups:
    groups = _Groups()
    for key, value in state.items():
        if key == "lm_head.weight":
            groups.lm_head = value
            continue
        for block, prefix in PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if block == "vision":
                    if rest.startswith("vision_model.head.") or rest.startswith("head."):
                        report.unused[key] = (
                            "SigLIP attention-pooling head: MultiMood reads hidden states (vision_use_head=False)"
                        )
                        break
                    rest = _strip_vision_prefix(rest)
                if block == "llm" and rest.endswith("rotary_emb.inv_freq"):
                    report.unused[key] = "rotary frequencies: a buffer recomputed from the config"
                    break
                getattr(groups, block)[rest] = value
                groups.source_key[(block, rest)] = key
                break
        else:
            report.unknown[key] = "matches no block of the published layout"
    return groups


def _video_projector_layout(tensors: dict[str, torch.Tensor], declared: str | None) -> tuple[str, dict]:
    """(mm_projector_type, connector kwargs) from the video projector tensors."""
    if any(k.startswith("s1.") for k in tensors):
        if declared not in (None, "stc_connector_v35"):
            raise ConversionError(
                f"mm_projector_type {declared!r} is not supported (only stc_connector_v35 and mlp2x_gelu)"
            )
        blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"^s1\.b(\d+)\.", k))}
        readout = {int(m.group(1)) for k in tensors if (m := re.match(r"^readout\.(\d+)\.weight$", k))}
        sampler = tensors.get("sampler.0.weight")
        if sampler is None:
            raise ConversionError("missing required tensor model.mm_projector.sampler.0.weight")
        kwargs = {
            "connector_depth": max(blocks),
            "connector_downsample": [int(x) for x in sampler.shape[2:]],
            "connector_mlp_depth": len(readout),
        }
        return "stc_connector_v35", kwargs
    linear = sorted(int(m.group(1)) for k in tensors if (m := _MLP_INDEX.match(k)) and m.group(2) == "weight")
    if linear == [0, 2]:
        return "mlp2x_gelu", {}
    raise ConversionError(
        f"video projector ({declared or 'unknown type'}) with tensors {sorted(tensors)[:6]} is not supported: "
        "MultiMood has stc_connector_v35 and mlp2x_gelu"
    )


def _audio_projector_type(tensors: dict[str, torch.Tensor]) -> str:
    if "weight" in tensors:
        return "linear"
    linear = sorted(int(m.group(1)) for k in tensors if (m := _MLP_INDEX.match(k)) and m.group(2) == "weight")
    if linear == [0, 2]:
        return "mlp2x_gelu"
    raise ConversionError(f"audio projector tensors {sorted(tensors)} are neither linear nor mlp2x_gelu")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _merge_overrides(kwargs: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            kwargs[key] = {**kwargs[key], **value}
        else:
            kwargs[key] = value
    return kwargs


def _read_published_config(source: Path, report: ConversionReport) -> dict:
    """The published config.json, its keys sorted into used / ignored / unknown in the report."""
    if not source.is_dir():
        raise ConversionError(f"{source}: " + ("is a file, expected a checkpoint folder" if source.exists()
                                               else "no such checkpoint folder"))
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{source}: no config.json (a published checkpoint folder holds config.json and "
                              "the weights)")
    published = read_json_config(config_path, ConversionError)
    model_type = str(published.get("model_type", ""))
    if "qwen2" not in model_type.lower():
        raise ConversionError(
            f"{config_path}: model_type {model_type!r} is not a Qwen2 VideoLLaMA 2 model (videollama2_qwen2)"
        )
    qwen2_fields = _qwen2_fields()
    for key in published:
        if key in USED_CONFIG_KEYS or key in qwen2_fields:
            report.config_used[key] = published[key]
        elif key in IGNORED_CONFIG_KEYS:
            report.config_ignored.append(key)
        else:
            report.config_unknown.append(key)
    return published


def _vision_block(groups: _Groups, vision_tower, published: dict, report: ConversionReport) -> dict:
    """The SigLIP config; fills `groups.vision` from `vision_tower` when the checkpoint has no vision weights."""
    vision_config = None
    if vision_tower is not None:
        vision_config = AutoConfig.from_pretrained(str(vision_tower))
        vision_config = getattr(vision_config, "vision_config", vision_config).to_dict()
        vision_config["vision_use_head"] = False
        if is_hub_id(str(vision_tower)):
            vision_config["_name_or_path"] = str(vision_tower)
    if groups.vision:
        report.other_sources["vision_tower"] = "checkpoint"
        if vision_tower is not None:
            report.notes.append(
                f"--vision_tower {vision_tower}: only its config was used (the checkpoint holds the weights)"
            )
    elif vision_tower is None:
        raise ConversionError(
            "the checkpoint holds no vision tower (model.vision_tower.vision_tower.vision_model.*) and no "
            "--vision_tower FOLDER (SigLIP config and weights) was given"
        )
    else:
        folder, tensors = read_folder_weights(vision_tower)
        for key, value in tensors.items():
            if key.startswith(("text_model.", "logit_", "vision_model.head.", "head.")):
                report.other_sources_unused[f"{folder.name}:{key}"] = (
                    "not part of the SigLIP vision encoder MultiMood uses"
                )
            else:
                groups.vision[_strip_vision_prefix(key)] = value
        report.other_sources["vision_tower"] = str(folder)
    if vision_config is None:
        hint = published.get("mm_vision_tower") or published.get("vision_tower")
        vision_config, inferred = siglip_config_from_state(groups.vision, hint if is_hub_id(hint) else None)
        report.inferred["vision_config"] = inferred
    return vision_config


def _audio_block(groups: _Groups, audio_tower, report: ConversionReport) -> tuple[dict, dict[str, str], dict]:
    """(our-layout BEATs tensors, {our relative key: published key}, BEATs config) from the checkpoint or
    `audio_tower`."""
    beats_cfg: dict = {}
    source_keys: dict[str, str] = {}
    if groups.audio:
        unused: dict[str, str] = {}
        audio_state, renamed = convert_beats_state_dict(groups.audio, unused, prefix="model.audio_tower.")
        report.unused.update(unused)
        source_keys = {ours: groups.source_key[("audio", theirs)] for theirs, ours in renamed.items()}
        report.other_sources["audio_tower"] = "checkpoint"
        if audio_tower is not None:
            _, beats_cfg = read_beats_checkpoint(audio_tower)
            report.notes.append(
                f"--audio_tower {audio_tower}: only its cfg was used (the checkpoint holds the weights)"
            )
    elif audio_tower is not None:
        unused = {}
        audio_state, beats_cfg = read_beats_checkpoint(audio_tower, unused)
        report.other_sources_unused.update({f"{Path(audio_tower).name}:{k}": v for k, v in unused.items()})
        report.other_sources["audio_tower"] = str(audio_tower)
    else:
        raise ConversionError(
            "the checkpoint holds no audio tower (model.audio_tower.*) and no --audio_tower FILE (BEATs .pt/.bin) "
            "was given"
        )
    audio_config, inferred, assumed = beats_config_from_state(audio_state, beats_cfg)
    report.inferred["audio_config"] = inferred
    if assumed:
        report.assumed["audio_config"] = assumed
    audio_config.setdefault("encoder_layerdrop", PUBLISHED_BEATS_LAYERDROP)
    report.profile["audio_config.encoder_layerdrop"] = audio_config["encoder_layerdrop"]
    return audio_state, source_keys, audio_config


def _compressor_block(groups: _Groups, mamba_compressor, published: dict, report: ConversionReport) -> dict | None:
    """The Mamba config of the history compressor (None when the checkpoint has none)."""
    if not groups.compressor:
        if mamba_compressor is not None:
            raise ConversionError(
                f"--mamba_compressor {mamba_compressor} was given but the checkpoint holds no history compressor "
                "(model.mamba_compressor.mamba.* and model.mamba_compressor.memory_projection.*)"
            )
        if published.get("mamba_compressor"):
            report.notes.append(
                f"config.json names a history compressor ({published['mamba_compressor']}) but the checkpoint holds no "
                "model.mamba_compressor.* tensors: converted without a compressor"
            )
        return None
    if mamba_compressor is not None:
        config = AutoConfig.from_pretrained(str(mamba_compressor)).to_dict()
        if is_hub_id(str(mamba_compressor)):
            config["_name_or_path"] = str(mamba_compressor)
        return config
    mamba_state = {k[len("mamba."):]: v for k, v in groups.compressor.items() if k.startswith("mamba.")}
    config, inferred = mamba_config_from_state(mamba_state)
    report.inferred["compressor_config"] = inferred
    if is_hub_id(published.get("mamba_compressor")):
        config["_name_or_path"] = published["mamba_compressor"]
    return config


def _text_block(groups: _Groups, published: dict, report: ConversionReport) -> dict:
    """The Qwen2 config: the published Qwen2 fields, the vocabulary of the tensors, tying as the checkpoint has it."""
    text_config = {k: v for k, v in published.items() if k in _qwen2_fields()}
    text_config["model_type"] = "qwen2"
    embed = groups.llm.get("embed_tokens.weight")
    if embed is None:
        raise ConversionError("missing required tensor model.embed_tokens.weight")
    if published.get("vocab_size") not in (None, embed.shape[0]):
        report.notes.append(
            f"vocab_size {published.get('vocab_size')} in config.json, {embed.shape[0]} in the tensors: "
            "using the tensors"
        )
    text_config["vocab_size"] = int(embed.shape[0])
    tie = bool(published.get("tie_word_embeddings", False))
    if groups.lm_head is None and not tie:
        report.notes.append("no lm_head.weight in the checkpoint: the LM head is tied to the input embeddings")
        tie = True
    text_config["tie_word_embeddings"] = tie
    return text_config


def _connector_settings(groups: _Groups, published: dict, report: ConversionReport) -> dict[str, Any]:
    """Projector types and connector shape (tensors first, then config.json)."""
    video_type, connector = _video_projector_layout(groups.video_projector, published.get("mm_projector_type"))
    if published.get("mm_projector_type") not in (None, video_type):
        raise ConversionError(
            f"config.json says mm_projector_type {published['mm_projector_type']!r}, the tensors are {video_type}"
        )
    audio_type = _audio_projector_type(groups.audio_projector)
    if published.get("mm_projector_a_type") not in (None, audio_type):
        report.notes.append(f"config.json says mm_projector_a_type {published['mm_projector_a_type']!r} but the "
                            f"tensors are {audio_type}: using {audio_type}")
    select_feature = published.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise ConversionError(
            f"mm_vision_select_feature {select_feature!r} is not supported (MultiMood uses all patches)"
        )
    pooling = {}
    if video_type == "mlp2x_gelu":  # the published temporal_aggregator averages the frames before this projector
        pooling = {"video_frame_pooling": "mean"}
        report.profile["video_frame_pooling"] = "mean"
    return {
        "mm_projector_type": video_type,
        **connector,
        **pooling,
        "mm_projector_a_type": audio_type,
        "mm_vision_select_layer": int(published.get("mm_vision_select_layer", -2)),
    }


def _published_media_settings(published: dict, report: ConversionReport) -> dict[str, Any]:
    """The processor's frames and aspect ratio: config.json, else the published code's fallbacks (reported as
    assumed)."""
    if "num_frames" in published:
        num_frames = int(published["num_frames"])
    else:
        num_frames = PUBLISHED_DEFAULT_NUM_FRAMES
        report.assumed["num_frames"] = num_frames
    aspect = published.get("image_aspect_ratio")
    if aspect is None:
        aspect = PUBLISHED_DEFAULT_ASPECT_RATIO
        report.assumed["image_aspect_ratio"] = aspect
    if aspect != "pad":
        report.notes.append(
            f"image_aspect_ratio {aspect!r}: frames are resized without padding (image_aspect_ratio='none')"
        )
    return {"num_frames": num_frames, "image_aspect_ratio": "pad" if aspect == "pad" else "none"}


def _collect_tensors(
    groups: _Groups, audio_state: dict, audio_source_keys: dict[str, str], config, expected: dict[str, tuple],
    report: ConversionReport,
) -> dict[str, torch.Tensor]:
    """Every tensor under its multimood name; names the model lacks are reported as unknown."""
    tensors: dict[str, torch.Tensor] = {}

    def put(target: str, value: torch.Tensor, source_key: str | None, other: str | None = None) -> None:
        """Keep `value` as `target`; `source_key` is its checkpoint name, `other` its name in another source."""
        if target not in expected:
            reason = f"no such tensor in the multimood model (would be {target})"
            if source_key is not None:
                report.unknown[source_key] = reason
            elif other is not None:
                report.other_sources_unused[other] = reason
            return
        tensors[target] = value
        if source_key is not None:
            report.renamed[source_key] = target

    vision_prefix = "model.vision_tower."
    if any(k.startswith("model.vision_tower.vision_model.") for k in expected):  # transformers 4 SigLIP layout
        vision_prefix = "model.vision_tower.vision_model."
    for rest, value in groups.llm.items():
        put(f"model.language_model.{rest}", value, groups.source_key[("llm", rest)])
    vision_source = Path(report.other_sources["vision_tower"]).name
    for rest, value in groups.vision.items():
        put(vision_prefix + rest, value, groups.source_key.get(("vision", rest)), f"{vision_source}:{rest}")
    for rest, value in groups.video_projector.items():
        target = rest if config.mm_projector_type == "stc_connector_v35" else f"readout.{rest}"
        put(f"model.mm_projector.{target}", value, groups.source_key[("video_projector", rest)])
    audio_source = Path(report.other_sources["audio_tower"]).name
    for rest, value in audio_state.items():
        put(f"model.audio_tower.{rest}", value, audio_source_keys.get(rest), f"{audio_source}:{rest}")
    for rest, value in groups.audio_projector.items():
        put(f"model.mm_projector_a.{rest}", value, groups.source_key[("audio_projector", rest)])
    for rest, value in groups.compressor.items():
        put(f"model.mamba_compressor.{rest}", value, groups.source_key[("compressor", rest)])
    if groups.lm_head is not None:
        if config.tie_word_embeddings:
            embed = groups.llm["embed_tokens.weight"]
            same = groups.lm_head.shape == embed.shape and torch.equal(groups.lm_head, embed)
            report.unused["lm_head.weight"] = "tied to model.embed_tokens.weight (tie_word_embeddings=true)" + (
                "" if same else "; it DIFFERS from the embeddings, which the published model would use instead"
            )
        else:
            put("lm_head.weight", groups.lm_head, "lm_head.weight")
    return tensors


def _fit_vocabulary(tensors: dict[str, torch.Tensor], vocab: int, mem_token_id: int, published_mem: int | None,
                    report: ConversionReport) -> None:
    """Extend embedding tables to `vocab` rows (mean rows) and copy the compressor's published <MEM> row to ours."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight", MAMBA_EMBEDDINGS):
        if key in tensors and tensors[key].shape[0] < vocab:
            report.adjusted[key] = f"{tensors[key].shape[0]} -> {vocab} rows (new rows = mean of the old ones)"
            tensors[key] = _mean_extend(tensors[key], vocab)
    if MAMBA_EMBEDDINGS not in tensors:
        return
    if published_mem is None:
        report.notes.append("config.json has no mem_token_id: the compressor's <MEM> row is taken as is")
    elif int(published_mem) != mem_token_id:
        table = tensors[MAMBA_EMBEDDINGS].clone()
        table[mem_token_id] = table[int(published_mem)]
        tensors[MAMBA_EMBEDDINGS] = table
        moved = f"row {mem_token_id} (<MEM> of the processor) = row {published_mem} (published mem_token_id)"
        earlier = report.adjusted.get(MAMBA_EMBEDDINGS)
        report.adjusted[MAMBA_EMBEDDINGS] = f"{earlier}; {moved}" if earlier else moved


def _check_complete(tensors: dict, expected: dict[str, tuple], config, source: Path, report: ConversionReport,
                    strict: bool) -> None:
    needed = [k for k in expected if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [k for k in needed if k not in tensors]
    if missing:
        names = [f"{to_published_key(k, config) or k} (multimood: {k})" for k in missing]
        raise ConversionError(f"missing required tensor(s) in {source}: " + "; ".join(names[:20])
                              + (f" and {len(names) - 20} more" if len(names) > 20 else ""))
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)}, model {expected[k]}"
        for k, v in tensors.items()
        if tuple(v.shape) != expected[k]
    ]
    if wrong:
        raise ConversionError("tensor shapes do not match the inferred config: " + "; ".join(wrong[:10]))
    if strict and report.unknown:
        raise ConversionError(f"--strict: {len(report.unknown)} unknown tensor(s): {sorted(report.unknown)[:10]}")


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    vision_tower: str | os.PathLike | None = None,
    audio_tower: str | os.PathLike | None = None,
    mamba_compressor: str | os.PathLike | None = None,
    dtype: str = "auto",
    config_overrides: dict | None = None,
    strict: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    prompt_style: str = "published-eval",
) -> ConversionReport:
    """Convert the published checkpoint folder `source` into the multimood folder `output` (see the module doc).

    The folder gets the published profile (module doc) with the processor's `prompt_style` set to `prompt_style`.

    The model is assembled on the meta device and takes the (memory-mapped) checkpoint tensors as they are
    (`load_state_dict(assign=True)`), so a 7B checkpoint is converted without a second copy in memory."""
    if prompt_style not in PROMPT_STYLES:
        raise ConversionError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
    source, output = Path(source).expanduser(), Path(output).expanduser()
    _check_output(output, overwrite)
    report = ConversionReport(source=str(source), output=str(output))
    published = _read_published_config(source, report)
    groups = split_published(read_state_dict(source, report.unknown, report.notes), report)
    processor = _published_processor(source, tokenizer, published, prompt_style, report)
    towers = _Towers(vision_tower, audio_tower, mamba_compressor)
    config, audio_state, audio_source_keys = _published_model_config(
        groups, towers, processor, published, prompt_style, config_overrides, report
    )
    fit_processor_to_model(processor, config)

    with torch.device("meta"):  # a skeleton: names and shapes, no memory
        model = MultimoodForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = _collect_tensors(groups, audio_state, audio_source_keys, config, expected, report)
    del groups, audio_state
    mem_token_id = processor.mem_token_id
    _fit_vocabulary(tensors, config.text_config.vocab_size, mem_token_id, published.get("mem_token_id"), report)
    _check_complete(tensors, expected, config, source, report, strict)
    tensors = _cast(tensors, dtype, report)
    config.dtype = getattr(torch, report.dtype)
    config.tokenizer_model_max_length = processor.model_max_length
    model.load_state_dict(tensors, strict=True if not config.tie_word_embeddings else False, assign=True)
    model.tie_weights()

    if output.exists():
        shutil.rmtree(output)  # only now: a failed conversion leaves an existing output alone
    output.mkdir(parents=True)
    for name, value in PUBLISHED_GENERATION.items():
        setattr(model.generation_config, name, value)
        report.profile[f"generation_config.{name}"] = value
    save_model_folder(model, processor, output)
    _state_prompt_style(output, prompt_style)
    del model
    if verify:
        _verify(output, tensors, report)
    report.write(output)
    report.log()
    return report


@dataclass
class _Towers:
    """The towers' own sources given on the command line (None: read from the checkpoint)."""

    vision: str | os.PathLike | None = None
    audio: str | os.PathLike | None = None
    compressor: str | os.PathLike | None = None


def _published_processor(
    source: Path, tokenizer: str | os.PathLike | None, published: dict, prompt_style: str, report: ConversionReport
) -> MultimoodProcessor:
    """The processor of the published system: its tokenizer (plus the multimood tokens), frames, aspect ratio,
    audio window rule, prompt style and text budget."""
    if tokenizer is None:
        if not _has_tokenizer(source):
            raise ConversionError(f"no tokenizer: {source} holds no tokenizer files; pass --tokenizer FOLDER")
        tokenizer = source
    max_length = published.get("tokenizer_model_max_length")
    processor = build_processor(
        tokenizer, _published_media_settings(published, report), prompt_style=prompt_style,
        **({"model_max_length": int(max_length)} if max_length else {}),
    )
    processor.feature_extractor.audio_window_rule = PUBLISHED_AUDIO_WINDOW_RULE
    report.profile["feature_extractor.audio_window_rule"] = PUBLISHED_AUDIO_WINDOW_RULE
    report.profile["processor.prompt_style"] = prompt_style
    report.special_tokens = {
        **processor.special_token_ids, "pad_token_id": processor.pad_token_id, "len_tokenizer": len(processor.tokenizer)
    }
    return processor


def _published_model_config(
    groups: _Groups, towers: _Towers, processor: MultimoodProcessor, published: dict, prompt_style: str,
    config_overrides: dict | None, report: ConversionReport,
) -> tuple[MultimoodConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, BEATs tensors in our layout, {our BEATs key: published key}): every block's config read off the
    tensors or the towers' own files, fitted to the processor's tokens, with the published profile and the
    overrides applied."""
    vision_config = _vision_block(groups, towers.vision, published, report)
    audio_state, audio_source_keys, audio_config = _audio_block(groups, towers.audio, report)
    compressor_config = _compressor_block(groups, towers.compressor, published, report)
    text_config = _text_block(groups, published, report)
    kwargs: dict[str, Any] = {
        "text_config": text_config,
        "vision_config": vision_config,
        "audio_config": audio_config,
        "compressor_config": compressor_config,
        **_connector_settings(groups, published, report),
        "inject_history_memory": prompt_style == "multimood",
    }
    # The vocabulary must hold every processor token; the compressor reads the LLM's ids.
    kwargs = fit_config_to_processor(kwargs, processor, max(text_config["vocab_size"], len(processor.tokenizer)))
    report.profile["inject_history_memory"] = kwargs["inject_history_memory"]
    if prompt_style == "multimood":
        report.notes.append(
            "--prompt_style multimood: memory tokens are injected at the <history> placeholders of its prompts, "
            "which the published LLM never received"
        )
    if config_overrides:
        overrides, settings = split_processor_settings(config_overrides)
        kwargs = _merge_overrides(kwargs, overrides)
        set_media_settings(processor, settings)  # frames, clips, audio windows: the processor's
        report.notes.append(f"config overrides applied: {json.dumps(config_overrides, default=str)}")
    return MultimoodConfig(**kwargs), audio_state, audio_source_keys


def _cast(tensors: dict[str, torch.Tensor], dtype: str, report: ConversionReport) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype` (auto: the checkpoint's dominant dtype); what was cast is noted."""
    target_dtype = _dominant_dtype(tensors) if dtype == "auto" else getattr(torch, dtype)
    cast = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dtype != target_dtype)
    if cast:
        report.notes.append(f"{len(cast)} tensor(s) cast to {target_dtype}: {cast[:5]}")
        tensors = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    report.dtype = str(target_dtype).replace("torch.", "")
    return tensors


def _state_prompt_style(output: Path, prompt_style: str) -> None:
    """`prompt_style` written into `processor_config.json` whatever this processor version does with it, so the
    folder states the protocol it was converted for."""
    path = output / PROCESSOR_CONFIG_NAME
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("prompt_style") != prompt_style:
        saved["prompt_style"] = prompt_style
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _verify(output: Path, tensors: dict[str, torch.Tensor], report: ConversionReport) -> None:
    """Reload the saved folder and compare every tensor with what was converted."""
    reloaded = MultimoodForConditionalGeneration.from_pretrained(output, dtype="auto").state_dict()
    bad = [k for k, v in tensors.items() if k not in reloaded or not torch.equal(reloaded[k], v)]
    if bad:
        raise ConversionError(f"verification failed: {len(bad)} tensor(s) differ after reloading {output}: {bad[:10]}")
    report.notes.append(f"verified: {len(tensors)} tensors reload identically")


def _check_output(output: Path, overwrite: bool) -> None:
    """A non-empty output folder is an error unless `overwrite` (it is replaced only once the conversion succeeded)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConversionError(f"{output} exists and is not empty (pass --overwrite to replace it)")


# ----------------------------------------------------------------------------------------------
# multimood -> published
# ----------------------------------------------------------------------------------------------


def to_published_key(key: str, config) -> str | None:
    """The published name of a multimood tensor (None for tensors the published layout lacks)."""
    if key == "lm_head.weight":
        return key
    for ours, theirs in (
        ("model.language_model.", "model."),
        ("model.vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.mamba_compressor.", "model.mamba_compressor."),
        ("model.mm_projector_a.", "model.mm_projector_a."),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        if config.mm_projector_type == "mlp2x_gelu" and rest.startswith("readout."):
            rest = rest[len("readout."):]
        return "model.mm_projector." + rest
    if key.startswith("model.audio_tower."):
        rest = key[len("model.audio_tower."):]
        inverse = {v: k for k, v in BEATS_WEIGHT_NORM.items()}
        if rest in inverse:
            rest = inverse[rest]
        elif rest.startswith("encoder.relative_attention_bias."):
            rest = "encoder.layers.0.self_attn.relative_attention_bias." + rest.split(".", 2)[2]
        return "model.audio_tower." + rest
    return None


def published_config(
    config, video_processor: MultimoodVideoProcessor, tokenizer_len: int | None = None
) -> dict[str, Any]:
    """A `videollama2_qwen2` config.json for a multimood config (Qwen2 fields at the top, VideoLLaMA extras; the
    frames and aspect ratio from the video processor)."""
    text = config.text_config.to_dict()
    out = {k: v for k, v in text.items() if k not in GENERIC_CONFIG_KEYS and k != "layer_types"}
    rope = text.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    out.update(
        architectures=["Videollama2Qwen2ForCausalLM"],
        model_type="videollama2_qwen2",
        torch_dtype=str(config.dtype).replace("torch.", "") if config.dtype is not None else "float32",
        mm_vision_tower=config.vision_config._name_or_path or "google/siglip-so400m-patch14-384",
        mm_projector_type=config.mm_projector_type,
        mm_hidden_size=config.vision_config.hidden_size,
        mm_vision_select_layer=config.mm_vision_select_layer,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad" if video_processor.image_aspect_ratio == "pad" else "square",
        num_frames=video_processor.num_frames,
        mm_audio_tower="BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
        mm_projector_a_type=config.mm_projector_a_type,
        mm_hidden_size_a=config.audio_config.encoder_embed_dim,
        hidden_size_a=config.text_config.hidden_size,
        tokenizer_model_max_length=getattr(config, "tokenizer_model_max_length", None) or 2048,
        use_mm_proj=True,
    )
    if config.compressor_config is not None:
        out["mamba_compressor"] = config.compressor_config._name_or_path or "state-spaces/mamba-370m-hf"
        out["mem_token_id"] = config.mem_token_id
        out["tokenizer_len"] = tokenizer_len or config.text_config.vocab_size
    return out


def export_published(
    source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> ConversionReport:
    """Write a multimood folder in the published layout (`config.json` + `pytorch_model.bin` + tokenizer files).

    The BEATs classifier (`predictor`) is not restored (the multimood model has none); the shared relative
    position bias is written once per layer, as the published state dict holds it. Frames and aspect ratio come
    from the folder's processor (the defaults, noted in the report, when it has none)."""
    source, output = Path(source).expanduser(), Path(output).expanduser()
    _check_output(output, overwrite)
    report = ConversionReport(source=str(source), output=str(output), direction="multimood->published")
    check_model_folder(source, need_processor=False)
    config = MultimoodConfig.from_pretrained(source)
    state = read_state_dict(source, report.unknown, report.notes)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = to_published_key(key, config)
        if name is None:
            report.unknown[key] = "no published counterpart"
            continue
        if key == "model.audio_tower.encoder.relative_attention_bias.weight":
            for layer in range(config.audio_config.encoder_layers):
                copy = f"model.audio_tower.encoder.layers.{layer}.self_attn.relative_attention_bias.weight"
                out[copy] = value  # one storage, saved once by torch.save, as in the published model
            report.renamed[key] = name
            report.adjusted[name] = f"shared by the {config.audio_config.encoder_layers} layers (one key per layer)"
            continue
        out[name] = value
        report.renamed[key] = name
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
        report.adjusted["lm_head.weight"] = "tied: the input embeddings"
    report.notes.append("the BEATs AudioSet classifier (predictor) is not part of a multimood model and is not written")
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    torch.save(out, output / PUBLISHED_WEIGHTS_NAME)
    processor = None
    if (source / PROCESSOR_CONFIG_NAME).is_file():
        processor = MultimoodProcessor.from_pretrained(source)
    else:
        report.notes.append(f"{source} holds no processor: the default frames and aspect ratio are written")
    if _has_tokenizer(source):
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                     "added_tokens.json", "chat_template.jinja"):
            if (source / name).is_file():
                shutil.copyfile(source / name, output / name)
    video_processor = processor.video_processor if processor is not None else MultimoodVideoProcessor()
    tokenizer_len = len(processor.tokenizer) if processor is not None else None
    config_text = json.dumps(published_config(config, video_processor, tokenizer_len), indent=2, default=str)
    (output / "config.json").write_text(config_text + "\n")
    report.write(output)
    report.log()
    return report


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimood convert",
        description="Convert a published MultiMood / VideoLLaMA 2 (Qwen2) checkpoint folder into a multimood folder "
                    "(or, with --to-published, a multimood folder into the published layout).",
    )
    parser.add_argument(
        "source", help="published checkpoint folder (config.json + weights), or a multimood folder with --to-published"
    )
    parser.add_argument("output", help="output folder (must be empty or absent unless --overwrite)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the processor (default: the checkpoint folder)")
    parser.add_argument("--vision_tower", "--vision-tower",
                        help="SigLIP folder / Hub id: its config, and its weights when the checkpoint has none")
    parser.add_argument("--audio_tower", "--audio-tower",
                        help="BEATs .pt/.bin: its cfg, and its weights when the checkpoint has none")
    parser.add_argument("--mamba_compressor", "--mamba-compressor",
                        help="Mamba / Mamba2 config folder of the history compressor (default: read off the tensors)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (auto: the checkpoint's dominant dtype)")
    parser.add_argument("--prompt_style", "--prompt-style", default="published-eval", choices=PROMPT_STYLES,
                        help="prompt style written into the processor (default: published-eval, the prompt of the "
                             "published evaluation; see docs/fidelity.md)")
    parser.add_argument(
        "--config_overrides",
        "--config-overrides",
        help="JSON (string or file) merged into the MultimoodConfig kwargs, e.g. '{\"inject_history_memory\": true}'; "
        "processor settings in it (num_frames, num_k_vid, audio_num_windows...) go to the processor",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on unknown checkpoint tensors instead of reporting them"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--verify", action="store_true", help="reload the output and compare every tensor")
    parser.add_argument("--to-published", "--to_published", dest="to_published", action="store_true",
                        help="export a multimood folder in the published VideoLLaMA 2 layout")
    return parser


def _read_json_arg(value: str | None) -> dict | None:
    if value is None:
        return None
    text = value.strip()
    return json.loads(text if text.startswith("{") else Path(value).expanduser().read_text())


def main(argv: list[str] | None = None) -> int:
    """`multimood convert` under the error contract (one line, exit 1; --debug for the traceback)."""
    return run_command("multimood convert", convert_command, argv)


def convert_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if args.to_published:
            report = export_published(args.source, args.output, overwrite=args.overwrite)
        else:
            report = convert(
                args.source, args.output, tokenizer=args.tokenizer, vision_tower=args.vision_tower,
                audio_tower=args.audio_tower, mamba_compressor=args.mamba_compressor, dtype=args.dtype,
                config_overrides=_read_json_arg(args.config_overrides), strict=args.strict,
                overwrite=args.overwrite, verify=args.verify, prompt_style=args.prompt_style,
            )
    except MultimoodError as error:  # a conversion or weight-file error: one line
        print(f"multimood convert: error: {error}", file=sys.stderr)
        return 1
    summary = report.to_dict()["summary"]
    print(
        f"wrote {args.output}: {summary['converted']} tensors converted, {summary['unused']} unused, "
        f"{summary['unknown']} unknown (details in {Path(args.output) / REPORT_NAME})"
    )
    return 0


__all__ = [
    "ConversionError",
    "ConversionReport",
    "beats_config_from_state",
    "convert",
    "export_published",
    "main",
    "mamba_config_from_state",
    "published_config",
    "siglip_config_from_state",
    "to_published_key",
]

if __name__ == "__main__":
    sys.exit(main())
