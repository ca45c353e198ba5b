"""The processor and the config of a model assembled from parts (pretrained towers, a published checkpoint).

The processor owns the preprocessing settings (frames, clips, audio windows, history budget); the config owns the
architecture and the token ids. Two things tie them together, each done here once:
* the config reads the processor's tokens: placeholder ids, pad / eos ids, a vocabulary that holds them
  (`fit_config_to_processor`);
* the processor's token counts and frame size follow the architecture: SigLIP's image and patch size, the
  connector's type, strides and frame pooling (`fit_processor_to_model`).
Training (`multimood train`) and the converter (`multimood convert`) both build their processor and config here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers.image_utils import SizeDict

from ..model.configuration_multimood import PROCESSOR_SETTING_KEYS
from ..model.processing_multimood import MultimoodProcessor

# Processor settings under the names configurations of earlier versions (and `--model_config` files) gave them,
# and the attribute of the video processor / feature extractor each sets.
VIDEO_SETTINGS = {"num_frames": "num_frames", "image_aspect_ratio": "image_aspect_ratio"}
AUDIO_SETTINGS = {
    "audio_num_windows": "num_windows", "audio_window_seconds": "window_seconds", "audio_max_seconds": "max_seconds",
    "audio_sampling_rate": "sampling_rate",
}
PROCESSOR_SETTINGS = {"history_max_tokens", "max_memory_slots"}


def set_media_settings(processor: MultimoodProcessor, settings: Mapping[str, Any]) -> None:
    """Set processor settings named as in `PROCESSOR_SETTING_KEYS` (`num_frames`, `image_size`, `num_k_vid`,
    `audio_num_windows`, `history_max_tokens`...) on the processor's parts; None values are left alone."""
    unknown = sorted(set(settings) - set(PROCESSOR_SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown processor settings {unknown}; known: {', '.join(PROCESSOR_SETTING_KEYS)}")
    video, audio = processor.video_processor, processor.feature_extractor
    for name, value in settings.items():
        if value is None:
            continue
        if name == "image_size":
            video.size = SizeDict(height=int(value), width=int(value))
        elif name == "num_k_vid":
            for part in (video, audio):
                if part is not None:
                    part.num_k_vid = int(value)
        elif name in VIDEO_SETTINGS:
            setattr(video, VIDEO_SETTINGS[name], value)
        elif name in AUDIO_SETTINGS:
            if audio is not None:
                setattr(audio, AUDIO_SETTINGS[name], value)
        else:
            setattr(processor, name, value)


def split_processor_settings(kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """(MultimoodConfig kwargs, processor settings) of config kwargs that may still carry the media settings
    configs of earlier versions held (`PROCESSOR_SETTING_KEYS`: frames, clips, audio windows...)."""
    settings = {key: value for key, value in kwargs.items() if key in PROCESSOR_SETTING_KEYS}
    return {key: value for key, value in kwargs.items() if key not in settings}, settings


def build_processor(
    tokenizer: str | os.PathLike | Any, settings: Mapping[str, Any] | None = None, **processor_kwargs: Any
) -> MultimoodProcessor:
    """A processor from a plain tokenizer (object or folder): the multimood tokens and chat template added, the
    media `settings` (see `set_media_settings`) and processor attributes (`model_max_length`, `label_set`,
    `k_turn_history`, `prompt_style`...) set."""
    if isinstance(tokenizer, os.PathLike):
        tokenizer = os.fspath(tokenizer)
    processor = MultimoodProcessor.from_tokenizer(tokenizer, **processor_kwargs)
    set_media_settings(processor, settings or {})
    return processor


def fit_processor_to_model(processor: MultimoodProcessor, config) -> None:
    """Make the processor's frames and token counts those the model reads: frames of the vision tower's image size,
    `<video>` counts of its patch size and connector (type, strides, frame pooling)."""
    video = processor.video_processor
    side = int(config.vision_config.image_size)
    video.size = SizeDict(height=side, width=side)
    video.patch_size = int(config.vision_config.patch_size)
    video.connector_downsample = tuple(config.connector_downsample)
    video.projector_type = config.mm_projector_type
    video.frame_pooling = config.video_frame_pooling


def fit_config_to_processor(kwargs: dict, processor: MultimoodProcessor, vocab_size: int | None = None) -> dict:
    """`MultimoodConfig` kwargs made to read the processor's tokens.

    The placeholder ids are the processor's; the text config gets its pad and (when it has none) eos ids and a
    vocabulary of `vocab_size` (default: the text config's own, else the tokenizer's length); the compressor reads
    the LLM's ids, so its vocabulary is the same. `kwargs["text_config"]` (and the compressor's) are dicts."""
    text = dict(kwargs["text_config"])
    text["pad_token_id"] = processor.pad_token_id
    if text.get("eos_token_id") is None and processor.tokenizer.eos_token_id is not None:
        text["eos_token_id"] = processor.tokenizer.eos_token_id
    text["vocab_size"] = int(vocab_size or text.get("vocab_size") or len(processor.tokenizer))
    fitted = {**kwargs, "text_config": text, **processor.special_token_ids}
    if isinstance(kwargs.get("compressor_config"), dict):
        fitted["compressor_config"] = {**kwargs["compressor_config"], "vocab_size": text["vocab_size"]}
    return fitted


__all__ = [
    "build_processor",
    "split_processor_settings",
    "fit_config_to_processor",
    "fit_processor_to_model",
    "set_media_settings",
]
