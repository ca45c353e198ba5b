"""MultiMood: a Qwen2 LLM that reads video (SigLIP + STC connector), audio (BEATs) and a compressed history (Mamba).

Layout follows transformers' multimodal models (`video_llama_3`, `qwen2_5_omni`): `MultimoodModel` owns
the towers, the connectors and the language model and merges every modality into the input embeddings
with one placeholder mask per modality and `masked_scatter`; `MultimoodForConditionalGeneration` adds
the LM head, the loss and generation. Parameter names follow the published checkpoint layout
(`mm_projector.{s1,sampler.0,s2,readout.0,readout.2}`, `mm_projector_a`, `mamba_compressor.{mamba,
memory_projection}`, `audio_tower`, `vision_tower`) so the converter only has to strip prefixes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_multimood import MultimoodConfig
from .modeling_beats import BeatsModel

logger = logging.get_logger(__name__)


def build_mlp(depth: int, in_features: int, out_features: int) -> nn.Sequential:
    """`depth` Linear layers with GELU between them (VideoLLaMA 2's `mlpNx_gelu`), indices 0, 2, 4..."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


class MultimoodSTCConnector(nn.Module):
    """Spatial-temporal convolution connector `stc_connector_v35` of VideoLLaMA 2.

    Per frame a RegNet stage maps vision features to the LLM width (`s1`), a strided Conv3d merges
    2x2x2 neighbourhoods in time and space (`sampler`), a second RegNet stage refines each time slice
    (`s2`) and an MLP reads out the tokens. 16 frames of 27x27 patches give 8x13x13 = 1352 tokens.
    """

    def __init__(self, config: MultimoodConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        width = config.text_config.hidden_size
        stage_kwargs = {"stride": 1, "dilation": 1, "act_layer": nn.SiLU, "norm_layer": LayerNorm2d}
        self.s1 = RegStage(depth=config.connector_depth, in_chs=vision_width, out_chs=width, **stage_kwargs)
        downsample = tuple(config.connector_downsample)
        self.sampler = nn.Sequential(
            nn.Conv3d(width, width, kernel_size=downsample, stride=downsample, padding=0, bias=True), nn.SiLU()
        )
        self.s2 = RegStage(depth=config.connector_depth, in_chs=width, out_chs=width, **stage_kwargs)
        self.readout = build_mlp(config.connector_mlp_depth, width, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(videos, frames, patches, channels) -> (videos, tokens, width)."""
        videos, frames, patches, channels = features.shape
        side = int(patches**0.5)
        if side * side != patches:
            raise ValueError(f"The STC connector needs a square patch grid, got {patches} patches per frame")
        x = features.reshape(videos * frames, side, side, channels).permute(0, 3, 1, 2)
        x = self.s1(x)
        x = x.reshape(videos, frames, *x.shape[1:]).transpose(1, 2)
        x = self.sampler(x)
        merged_frames = x.shape[2]
        x = x.transpose(1, 2).flatten(0, 1)
        x = self.s2(x)
        x = x.reshape(videos, merged_frames, *x.shape[1:]).permute(0, 1, 3, 4, 2).flatten(1, 3)
        return self.readout(x)


class MultimoodMLPConnector(nn.Module):
    """Plain `mlp2x_gelu` video projector: every patch of every frame becomes one token, or, with
    `video_frame_pooling="mean"` (the published `temporal_aggregator`), every patch of the frames' average."""

    def __init__(self, config: MultimoodConfig):
        super().__init__()
        self.frame_pooling = config.video_frame_pooling
        self.readout = build_mlp(2, config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(videos, frames, patches, channels) -> (videos, tokens, width)."""
        if self.frame_pooling == "mean":
            return self.readout(features.mean(1))
        return self.readout(features.flatten(1, 2))


class MultimoodHistoryCompressor(nn.Module):
    """Mamba over the history tokens; its hidden states at the `<MEM>` positions become memory tokens.

    The memory tokens are projected to the LLM width and scattered into the `<history>` placeholders,
    so they reach the LLM and receive gradient. The published code computed them and dropped them: with
    `config.inject_history_memory=False` (converted published checkpoints) the model does not run the compressor.
    """

    def __init__(self, config: MultimoodConfig):
        super().__init__()
        self.mem_token_id = config.mem_token_id
        self.mamba = AutoModel.from_config(config.compressor_config)
        self.memory_projection = nn.Linear(config.compressor_config.hidden_size, config.text_config.hidden_size)

    def forward(self, history_input_ids: torch.LongTensor, history_attention_mask: torch.Tensor | None = None):
        """Returns the memory tokens of all rows concatenated in order, and how many each row has."""
        hidden = self.mamba(input_ids=history_input_ids, attention_mask=history_attention_mask).last_hidden_state
        mem_mask = history_input_ids == self.mem_token_id
        if history_attention_mask is not None:
            mem_mask = mem_mask & history_attention_mask.bool()
        memory = self.memory_projection(hidden[mem_mask].to(self.memory_projection.weight.dtype))
        return memory, mem_mask.sum(dim=1)


@dataclass
class MultimoodModelOutputWithPast(ModelOutput):
    """Language-model outputs plus the merged media features, for inspection and for the loss."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    video_features: torch.FloatTensor | None = None
    audio_features: torch.FloatTensor | None = None
    history_features: torch.FloatTensor | None = None


@dataclass
class MultimoodCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class MultimoodPreTrainedModel(PreTrainedModel):
    config_class = MultimoodConfig
    base_model_prefix = "model"
    input_modalities = ("video", "audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Qwen2DecoderLayer",
        "SiglipEncoderLayer",
        "BeatsEncoderLayer",
        "MambaBlock",
        "Mamba2Block",
        "MultimoodSTCConnector",
    ]
    _skip_keys_device_placement = "cache"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs) -> None:
        """As in transformers, but a plain string applies to the attention blocks only (see `MultimoodConfig`)."""
        super().set_attn_implementation(MultimoodConfig.attention_dispatch(attn_implementation), **kwargs)


def _tower_grad_context(tower: nn.Module):
    """Frozen towers run under `no_grad`: no activations are kept for a backward that never comes."""
    return torch.enable_grad() if any(p.requires_grad for p in tower.parameters()) else torch.no_grad()


class MultimoodModel(MultimoodPreTrainedModel):
    """Towers, connectors and the Qwen2 decoder, without the LM head."""

    def __init__(self, config: MultimoodConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        connector = MultimoodSTCConnector if config.mm_projector_type == "stc_connector_v35" else MultimoodMLPConnector
        self.mm_projector = connector(config)
        self.audio_tower = BeatsModel(config.audio_config)
        audio_width, width = config.audio_config.hidden_size, config.text_config.hidden_size
        self.mm_projector_a = (
            nn.Linear(audio_width, width)
            if config.mm_projector_a_type == "linear"
            else build_mlp(2, audio_width, width)
        )
        self.mamba_compressor = MultimoodHistoryCompressor(config) if config.compressor_config is not None else None
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self.vision_tower.requires_grad_(not config.freeze_vision_tower)
        self.audio_tower.requires_grad_(not config.freeze_audio_tower)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_video_features(self, pixel_values_videos: torch.FloatTensor) -> torch.FloatTensor:
        """(videos, frames, 3, H, W) -> (videos, tokens, width): SigLIP features of the selected layer, then the
        connector."""
        videos, frames = pixel_values_videos.shape[:2]
        pixels = pixel_values_videos.flatten(0, 1).to(self.vision_tower.dtype)
        with _tower_grad_context(self.vision_tower):
            outputs = self.vision_tower(pixel_values=pixels, output_hidden_states=True)
            features = outputs.hidden_states[self.config.mm_vision_select_layer]
        features = features.reshape(videos, frames, *features.shape[1:]).to(self.mm_projector_dtype)
        return self.mm_projector(features)

    def get_audio_features(self, input_features: torch.FloatTensor) -> torch.FloatTensor:
        """(clips, fbank frames, mel bins) raw Kaldi filterbanks -> (clips, tokens, width)."""
        with _tower_grad_context(self.audio_tower):
            features = self.audio_tower(input_features=input_features.to(self.audio_tower.dtype)).last_hidden_state
        return self.mm_projector_a(features.to(self.mm_projector_a_dtype))

    def get_history_features(
        self, history_input_ids: torch.LongTensor, history_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.FloatTensor, torch.LongTensor]:
        """Memory tokens of every history row concatenated, and the number of memory tokens per row."""
        if self.mamba_compressor is None:
            raise ValueError(
                "history_input_ids were given but this model has no history compressor (compressor_config=None)"
            )
        return self.mamba_compressor(history_input_ids, history_attention_mask)

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    @property
    def mm_projector_a_dtype(self) -> torch.dtype:
        return next(self.mm_projector_a.parameters()).dtype

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, token_id: int, tokens_per_item: list[int], modality: str
    ) -> torch.BoolTensor:
        """Mask of the `token_id` placeholders, checked against the features sample by sample.

        Items (videos, audio clips, histories) belong, in order, to the samples that hold placeholders
        of their modality; each such sample must hold exactly as many placeholders as its item has
        feature vectors.
        """
        mask = input_ids == token_id
        counts = mask.sum(dim=1).tolist()
        rows = [row for row, count in enumerate(counts) if count]
        if len(rows) != len(tokens_per_item):
            raise ValueError(
                f"{modality}: {len(rows)} sample(s) hold {modality} placeholder tokens (id {token_id}) "
                f"but {len(tokens_per_item)} {modality} input(s) were given"
            )
        for row, expected in zip(rows, tokens_per_item):
            if counts[row] != expected:
                raise ValueError(
                    f"{modality}: sample {row} holds {counts[row]} placeholder tokens (id {token_id}) "
                    f"but its {modality} features have {expected} vectors"
                )
        return mask

    def _merge(
        self, inputs_embeds: torch.Tensor, input_ids: torch.LongTensor, token_id: int, features: torch.Tensor,
        tokens_per_item: list[int], modality: str,
    ) -> torch.Tensor:
        mask = self.get_placeholder_mask(input_ids, token_id, tokens_per_item, modality)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.to(inputs_embeds.dtype))

    def _unused_blocks_term(self, pixel_values_videos, input_features, history_input_ids) -> torch.Tensor:
        """Zero-valued output of every block this batch does not use.

        In distributed training every rank must run the same blocks: ZeRO-3 gathers each block's
        parameters collectively (a rank that skips a text-only batch's vision tower hangs the others)
        and DDP expects a gradient for every trainable parameter. A minimal dummy input through each
        unused block, scaled by zero, keeps all ranks in step without changing the result.
        """
        term = torch.zeros((), device=self.device, dtype=self.mm_projector_a_dtype)
        if pixel_values_videos is None:
            size = self.config.vision_config.image_size
            frames = self.config.connector_downsample[0] if self.config.mm_projector_type == "stc_connector_v35" else 1
            dummy = torch.zeros(1, frames, 3, size, size, device=self.device)
            term = term + self.get_video_features(dummy).sum() * 0
        if input_features is None:
            patch = self.config.audio_config.input_patch_size
            dummy = torch.zeros(1, patch, self.config.audio_config.num_mel_bins, device=self.device)
            term = term + self.get_audio_features(dummy).sum() * 0
        if history_input_ids is None and self.mamba_compressor is not None:
            dummy = torch.full((1, 1), self.config.mem_token_id, device=self.device)
            term = term + self.get_history_features(dummy)[0].sum() * 0
        return term.to(self.get_input_embeddings().weight.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        history_input_ids: torch.LongTensor | None = None,
        history_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimoodModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        has_media = any(x is not None for x in (pixel_values_videos, input_features, history_input_ids))
        if input_ids is None and has_media:
            raise ValueError("Media inputs need input_ids: their placeholder tokens say where the features go")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if history_input_ids is not None and not self.config.inject_history_memory:
            logger.warning_once(
                "history_input_ids are ignored: config.inject_history_memory is False (as in the published model, "
                "whose memory tokens never reached the LLM)"
            )
            history_input_ids = history_attention_mask = None

        video_features = audio_features = history_features = None
        if pixel_values_videos is not None:
            video_features = self.get_video_features(pixel_values_videos)
            inputs_embeds = self._merge(
                inputs_embeds, input_ids, self.config.video_token_id, video_features.flatten(0, 1),
                [video_features.shape[1]] * video_features.shape[0], "video",
            )
        if input_features is not None:
            audio_features = self.get_audio_features(input_features)
            inputs_embeds = self._merge(
                inputs_embeds, input_ids, self.config.audio_token_id, audio_features.flatten(0, 1),
                [audio_features.shape[1]] * audio_features.shape[0], "audio",
            )
        if history_input_ids is not None:
            history_features, per_row = self.get_history_features(history_input_ids, history_attention_mask)
            inputs_embeds = self._merge(
                inputs_embeds, input_ids, self.config.history_token_id, history_features, per_row.tolist(), "history"
            )
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            inputs_embeds = inputs_embeds + self._unused_blocks_term(
                pixel_values_videos, input_features, history_input_ids
            )

        cache = kwargs.get("cache")
        if input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            if not self.config.inject_history_memory and (input_ids == self.config.history_token_id).any():
                raise ValueError(
                    f"input_ids hold <history> placeholders (id {self.config.history_token_id}) but "
                    "config.inject_history_memory is False (a converted published model: its prompts keep "
                    "'<history>' as plain text). Build the prompt with a published prompt_style, or set "
                    "inject_history_memory=True"
                )
            # Placeholders without their inputs would silently feed placeholder embeddings to the LLM.
            for inputs, token_id, modality in (
                (pixel_values_videos, self.config.video_token_id, "video"),
                (input_features, self.config.audio_token_id, "audio"),
                (history_input_ids, self.config.history_token_id, "history"),
            ):
                if inputs is None:
                    self.get_placeholder_mask(input_ids, token_id, [], modality)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        return MultimoodModelOutputWithPast(
            **dict(outputs.items()),
            video_features=video_features,
            audio_features=audio_features,
            history_features=history_features,
        )


class MultimoodForConditionalGeneration(MultimoodPreTrainedModel, GenerationMixin):
    """MultiMood with its LM head: the loss on the four-line target, and generation."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _history_inputs = ("history_input_ids", "history_attention_mask")

    def __init__(self, config: MultimoodConfig):
        super().__init__(config)
        self.model = MultimoodModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # Generated placeholder tokens would be mistaken for media slots when the sequence is re-read.
        self.generation_config.suppress_tokens = [
            config.video_token_id, config.audio_token_id, config.history_token_id, config.mem_token_id
        ]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_video_features(self, pixel_values_videos: torch.FloatTensor) -> torch.FloatTensor:
        return self.model.get_video_features(pixel_values_videos)

    def get_audio_features(self, input_features: torch.FloatTensor) -> torch.FloatTensor:
        return self.model.get_audio_features(input_features)

    def get_history_features(
        self, history_input_ids: torch.LongTensor, history_attention_mask: torch.Tensor | None = None
    ):
        return self.model.get_history_features(history_input_ids, history_attention_mask)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs
    ):
        """Resize the LLM embeddings and, so that both read the same ids, the compressor's."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        compressor = self.model.mamba_compressor
        if compressor is not None:
            compressor.mamba.resize_token_embeddings(embeddings.num_embeddings)
            self.config.compressor_config.vocab_size = embeddings.num_embeddings
        return embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        history_input_ids: torch.LongTensor | None = None,
        history_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MultimoodCausalLMOutputWithPast:
        """`labels` are -100 outside the target; `num_items_in_batch` (from the Trainer) normalises the loss
        over gradient-accumulation steps. Other keyword arguments (the cache, `use_cache`...) go to the LLM."""
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            pixel_values_videos=pixel_values_videos,
            input_features=input_features,
            history_input_ids=history_input_ids,
            history_attention_mask=history_attention_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
            )
        return MultimoodCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Media and history are read at prefill only; later steps reuse the cache."""
        first_step = kwargs.get("is_first_iteration", False) or not kwargs.get("use_cache", True)
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if not first_step:
            for name in self._history_inputs:
                model_inputs.pop(name, None)
        return model_inputs

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Also map AutoModel and AutoModelForMultimodalLM in `auto_map` when saving as remote code."""
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            extra = {
                "AutoModel": f"{module}.MultimoodModel",
                "AutoModelForMultimodalLM": f"{module}.{type(self).__name__}",
            }
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **extra}
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = [
    "MultimoodPreTrainedModel",
    "MultimoodModel",
    "MultimoodForConditionalGeneration",
    "MultimoodSTCConnector",
    "MultimoodHistoryCompressor",
]
