"""Configuration of MultiMood: a Qwen2 LLM that reads SigLIP video, BEATs audio and a Mamba-compressed history.

`MultimoodConfig()` with no arguments describes the published model (Qwen2-1.5B-Instruct, SigLIP
so400m-patch14-384, BEATs iter3, mamba-370m, the `stc_connector_v35` video connector). Every
sub-config is built in code, so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Settings of the processor that configurations of earlier versions also carried. A config.json that still holds
# them loads: they are dropped with a warning (the processor saved beside it has its own copy).
PROCESSOR_SETTING_KEYS = (
    "num_frames", "image_size", "image_aspect_ratio", "num_k_vid", "audio_num_windows", "audio_window_seconds",
    "audio_max_seconds", "audio_sampling_rate", "history_max_tokens", "max_memory_slots",
)

QWEN2_1_5B_INSTRUCT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

SIGLIP_SO400M_PATCH14_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}

MAMBA_370M = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "num_hidden_layers": 48,
    "state_size": 16,
    "expand": 2,
    "conv_kernel": 4,
    "residual_in_fp32": True,
}


class BeatsConfig(PreTrainedConfig):
    """BEATs audio encoder (Chen et al., 2022) as used by VideoLLaMA 2.1-AV and MultiMood.

    The defaults are those of the `BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2` checkpoint: a 16x16
    patch embedding of the 128-bin filterbank, 12 deep-norm post-LN layers with gated relative
    position bias shared by all layers, and a convolutional positional embedding. The checkpoint's
    AudioSet classifier (`predictor`) is not part of the encoder: MultiMood never uses it.

    `encoder_layerdrop` defaults to 0: the frozen tower gives the same features in training as at inference. The
    published training ran it with BEATs' default 0.05 while the tower, frozen, stayed in train mode (each layer
    skipped with probability 0.05 per forward pass); `encoder_layerdrop=0.05` reproduces that (see docs/fidelity.md).
    """

    model_type = "multimood_beats"

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    num_mel_bins: int = 128
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    initializer_range: float = 0.02

    @property
    def hidden_size(self) -> int:
        return self.encoder_embed_dim

    def num_output_tokens(self, num_fbank_frames: int, num_mel_bins: int | None = None) -> int:
        """Tokens the encoder emits for a (frames, mel bins) filterbank: one per 16x16 patch."""
        mel_bins = num_mel_bins if num_mel_bins is not None else self.num_mel_bins
        return (num_fbank_frames // self.input_patch_size) * (mel_bins // self.input_patch_size)


class MultimoodConfig(PreTrainedConfig):
    """Composite configuration of MultiMood.

    Sub-configs: `text_config` (Qwen2 family), `vision_config` (SigLIP vision), `audio_config`
    (BEATs), `compressor_config` (Mamba or Mamba2; `None` disables the history compressor).
    Token counts of each modality are pure functions of this config and the processed shapes:
    see `num_video_tokens` and `num_audio_tokens`. How the media are sampled (frames, clips, audio windows) and
    how much history is kept are settings of the processor, not of this config.

    Settings where MultiMood's default differs from the published code (docs/fidelity.md lists them all):

    * `inject_history_memory` (default True): the compressor's memory tokens replace the `<history>` placeholders.
      The published model computed them but never injected them (its prompts hold `<history>` as plain text), so
      converted published checkpoints set it False: history inputs are then ignored and `<history>` placeholders
      in `input_ids` are an error.
    * `video_frame_pooling` (`mlp2x_gelu` only; default `"none"`): every patch of every frame is a token. The
      published `temporal_aggregator` averages the frames first (`"mean"`: one frame's worth of tokens).
    """

    model_type = "multimood"

    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_1_5B_INSTRUCT),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=SIGLIP_SO400M_PATCH14_384
        ),
        "audio_config": SubConfigSpec(config_class=BeatsConfig),
        "compressor_config": SubConfigSpec(
            config_class=AutoConfig, model_type="mamba", init_kwargs=MAMBA_370M, optional=True
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    compressor_config: dict | PreTrainedConfig | None = field(
        default_factory=lambda: {"model_type": "mamba", **MAMBA_370M}
    )

    mm_projector_type: Literal["stc_connector_v35", "mlp2x_gelu"] = "stc_connector_v35"
    connector_downsample: list[int] | tuple[int, int, int] = (2, 2, 2)
    connector_depth: int = 4
    connector_mlp_depth: int = 2
    video_frame_pooling: Literal["none", "mean"] = "none"
    mm_projector_a_type: Literal["linear", "mlp2x_gelu"] = "linear"
    mm_vision_select_layer: int = -2
    inject_history_memory: bool = True
    freeze_vision_tower: bool = True
    freeze_audio_tower: bool = True

    video_token_id: int = 151646
    audio_token_id: int = 151647
    history_token_id: int = 151648
    mem_token_id: int = 151649
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        retired = sorted(key for key in PROCESSOR_SETTING_KEYS if kwargs.pop(key, None) is not None)
        if retired:
            logger.warning_once(
                f"MultimoodConfig: ignoring {', '.join(retired)}: media and history settings belong to the processor "
                "(its processor_config.json), the config keeps the architecture"
            )
        super().__post_init__(**kwargs)
        self.connector_downsample = tuple(self.connector_downsample)
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        if self.mm_projector_type not in ("stc_connector_v35", "mlp2x_gelu"):
            raise ValueError(
                f"mm_projector_type must be 'stc_connector_v35' or 'mlp2x_gelu', got {self.mm_projector_type!r}"
            )
        if self.video_frame_pooling not in ("none", "mean"):
            raise ValueError(f"video_frame_pooling must be 'none' or 'mean', got {self.video_frame_pooling!r}")
        if self.video_frame_pooling == "mean" and self.mm_projector_type != "mlp2x_gelu":
            raise ValueError("video_frame_pooling='mean' applies to mm_projector_type='mlp2x_gelu' only")
        if self.mm_projector_a_type not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"mm_projector_a_type must be 'linear' or 'mlp2x_gelu', got {self.mm_projector_a_type!r}")
        if self.compressor_config is not None and self.compressor_config.model_type not in ("mamba", "mamba2"):
            raise ValueError(
                "compressor_config must be a Mamba or Mamba2 config, "
                f"got model_type {self.compressor_config.model_type!r}"
            )

    @property
    def _attn_implementation(self) -> str | None:
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        PreTrainedConfig._attn_implementation.fset(self, self.attention_dispatch(value))

    @staticmethod
    def attention_dispatch(value: str | dict | None) -> dict | None:
        """A plain `attn_implementation` ("sdpa", "eager", "flash_attention_2") concerns the LLM and SigLIP only:
        BEATs always runs SDPA with its relative-position bias and Mamba has no attention."""
        if value is None or isinstance(value, dict):
            return value
        return {"": value, "text_config": value, "vision_config": value}

    def num_video_tokens(self, num_frames: int, height: int | None = None, width: int | None = None) -> int:
        """Video tokens the connector emits for one clip of `num_frames` frames of `height` x `width` pixels
        (default: the vision tower's image size)."""
        patch = self.vision_config.patch_size
        rows = (self.vision_config.image_size if height is None else height) // patch
        cols = (self.vision_config.image_size if width is None else width) // patch
        if self.mm_projector_type == "mlp2x_gelu":
            return (1 if self.video_frame_pooling == "mean" else num_frames) * rows * cols
        time_stride, row_stride, col_stride = self.connector_downsample
        return (num_frames // time_stride) * (rows // row_stride) * (cols // col_stride)

    def num_audio_tokens(self, num_fbank_frames: int, num_mel_bins: int | None = None) -> int:
        """Audio tokens BEATs emits for a filterbank of `num_fbank_frames` x `num_mel_bins`."""
        return self.audio_config.num_output_tokens(num_fbank_frames, num_mel_bins)


__all__ = ["PROCESSOR_SETTING_KEYS", "BeatsConfig", "MultimoodConfig"]
