"""BEATs audio encoder (Chen et al., 2022, https://arxiv.org/abs/2212.09058) as used by MultiMood.

A re-implementation of the `microsoft/unilm` BEATs encoder that MultiMood (via VideoLLaMA 2.1-AV) uses
as its audio tower. In eval mode it computes the same function as the published code; the differences
are in form only:

* attention runs through `torch.nn.functional.scaled_dot_product_attention`; the published code
  subtracts the row maximum of the logits (times 32) before adding the position bias, which changes
  nothing after the softmax;
* the T5-style relative position embedding is one `encoder.relative_attention_bias` module (the
  published code shares layer 0's module with every layer, so its state dict repeats it per layer);
* the positional convolution uses `torch.nn.utils.parametrizations.weight_norm`, so its weight-norm
  parameters are named `encoder.pos_conv.0.parametrizations.weight.original0/original1` instead of
  `weight_g/weight_v`. The published fork adds 1e-6 under the square root of the norm; with the
  checkpoint's weights that is a relative change far below float32 resolution of the outputs;
* the AudioSet classifier (`predictor`) is absent (MultiMood never uses it);
* `layer_wise_gradient_decay_ratio` of the published code only rescales gradients flowing between
  layers during BEATs pre-training; it is omitted (the forward pass is identical).

Inputs are raw 128-bin Kaldi filterbanks (`torchaudio.compliance.kaldi.fbank`, 25 ms / 10 ms, of the
waveform scaled by 2**15); the model normalises them itself.

This file is also loaded as Hugging Face Hub remote code: flat relative sibling imports only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .configuration_multimood import BeatsConfig


def _gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU computed in float32, as the published code does for the FFN activation."""
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "gelu": _gelu_fp32,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def _deep_norm_beta(config: BeatsConfig) -> float:
    """DeepNet init gain (8N)^(-1/4) for N encoder layers (1 without deep norm)."""
    return (8 * config.encoder_layers) ** -0.25 if config.deep_norm else 1.0


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> torch.Tensor:
    """Map signed key-minus-query distances to T5-style buckets.

    With `bidirectional`, half of the buckets are for keys at or before the query and half (offset by
    `num_buckets // 2`) for keys after it. In each half, the first `max_exact = half // 2` distances get
    their own bucket; larger distances share logarithmically wider buckets up to `max_distance`, and
    anything farther falls into the last bucket of the half.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Same float32 expression (and truncation) as the published code, so bucket edges match bit for bit.
    # clamp(min=1) only keeps log() finite where the result is discarded by `is_small` anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class BeatsSamePad(nn.Module):
    """Drop the last time step when the positional conv kernel is even, so output length == input length."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, :, : -self.remove] if self.remove > 0 else hidden_states


class BeatsPositionalConvEmbedding(nn.Sequential):
    """Grouped Conv1d over time with weight norm (over the kernel axis), same-padding and GELU.

    A `Sequential` so that the conv sits at index 0, like `encoder.pos_conv.0` in the published checkpoint.
    """

    def __init__(self, config: BeatsConfig) -> None:
        dim = config.encoder_embed_dim
        conv = nn.Conv1d(
            dim, dim, kernel_size=config.conv_pos, padding=config.conv_pos // 2, groups=config.conv_pos_groups
        )
        # dim=2: one magnitude per kernel tap, shared over all channels (as in wav2vec 2.0 / BEATs).
        if not is_deepspeed_zero3_enabled():
            conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
            super().__init__(conv, BeatsSamePad(config.conv_pos), nn.GELU())
            return
        # ZeRO-3 partitions the weight as soon as the conv is built: weight-norm the gathered weight, and let this
        # module's forward gather (g, v), which live on the parametrization that nothing calls.
        import deepspeed  # noqa: PLC0415 - optional heavy dependency, installed only where ZeRO-3 runs

        with deepspeed.zero.GatheredParameters(conv.weight, modifier_rank=0):
            conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        super().__init__(conv, BeatsSamePad(config.conv_pos), nn.GELU())
        deepspeed.zero.register_external_parameter(self, conv.parametrizations.weight.original0)
        deepspeed.zero.register_external_parameter(self, conv.parametrizations.weight.original1)
        if conv.bias is not None:  # the CPU path of `forward` reads the bias without calling the conv module
            deepspeed.zero.register_external_parameter(self, conv.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, dim) -> (batch, tokens, dim).

        On the CPU the conv runs in float32 whatever the model dtype or autocast: on CPUs with AMX-BF16,
        oneDNN computes grouped bfloat16 Conv1d with few channels per group wrongly (relative error ~1 for
        32 channels, 4 groups, kernel 8 in torch 2.14). One conv per forward, so float32 costs little.
        """
        hidden_states = hidden_states.transpose(1, 2)
        if hidden_states.device.type != "cpu":
            return super().forward(hidden_states).transpose(1, 2)
        conv, same_pad, activation = self
        with torch.autocast("cpu", enabled=False):
            bias = conv.bias.float() if conv.bias is not None else None
            out = F.conv1d(
                hidden_states.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups
            )
            out = activation(same_pad(out))
        return out.to(hidden_states.dtype).transpose(1, 2)


class BeatsAttention(nn.Module):
    """Multi-head self-attention with a gated relative position bias (the `gru_rel_pos` of WavLM/BEATs)."""

    def __init__(self, config: BeatsConfig) -> None:
        super().__init__()
        self.embed_dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"encoder_embed_dim ({self.embed_dim}) must be divisible by encoder_attention_heads ({self.num_heads})"
            )
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)
        # DeepNet initialisation (read by `_init_weights`): q/k keep gain 1, v/out get (8N)^(-1/4).
        beta = _deep_norm_beta(config)
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, beta), (self.out_proj, beta)):
            proj.xavier_gain = gain
        self.gru_rel_pos = config.gru_rel_pos
        if self.gru_rel_pos:
            # 8 outputs summed in two groups of 4 give the two gates (a, b) per head and query position.
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def attention_bias(
        self, query: torch.Tensor, position_bias: torch.Tensor | None, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Additive (batch, heads, q_len, k_len) bias for SDPA, or None when there is nothing to add.

        `query` is the projected, unscaled query in (batch, heads, q_len, head_dim). The gate depends on the
        query content, so each layer rescales the shared bias per head and query position:
        gate = a * (b * grep_a - 1) + 2 with a, b in (0, 1); at grep_a = 1 it lies in (1, 2).
        """
        bias = None
        if position_bias is not None:
            bias = position_bias.to(query.dtype)
            if self.gru_rel_pos:
                batch, heads, length, _ = query.shape
                gates = torch.sigmoid(self.grep_linear(query).view(batch, heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        if key_padding_mask is not None:
            if bias is None:
                bias = query.new_zeros(query.shape[0], 1, 1, key_padding_mask.shape[-1])
            # finfo.min rather than -inf: a fully padded row stays finite instead of turning into NaN.
            bias = bias.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(bias.dtype).min)
        return bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (batch, length, dim); position_bias (1, heads, length, length); mask True = padded key."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        bias = self.attention_bias(query, position_bias, key_padding_mask)
        attn = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scaling,
        )
        attn = attn.transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(attn)


class BeatsEncoderLayer(GradientCheckpointingLayer):
    """Transformer layer; post-LN with DeepNet residual scaling (x = LN(alpha * x + f(x))) by default."""

    def __init__(self, config: BeatsConfig) -> None:
        super().__init__()
        if config.activation_fn not in _ACTIVATIONS:
            raise ValueError(
                f"Unsupported activation_fn {config.activation_fn!r}; expected one of {sorted(_ACTIVATIONS)}"
            )
        dim = config.encoder_embed_dim
        self.self_attn = BeatsAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.fc1.xavier_gain = self.fc2.xavier_gain = _deep_norm_beta(config)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation_fn = _ACTIVATIONS[config.activation_fn]
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.layer_norm_first = config.layer_norm_first
        # DeepNet: residual branch scaled by (2N)^(1/4) so post-LN stays stable with N layers.
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_dropout(self.activation_fn(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.layer_norm_first:
            # Pre-LN variant (no DeepNet scaling): kept for configs other than the published one.
            attn = self.self_attn(self.self_attn_layer_norm(hidden_states), position_bias, key_padding_mask)
            hidden_states = hidden_states + self.dropout(attn)
            return hidden_states + self._feed_forward(self.final_layer_norm(hidden_states))
        attn = self.self_attn(hidden_states, position_bias, key_padding_mask)
        hidden_states = self.self_attn_layer_norm(hidden_states * self.residual_scale + self.dropout(attn))
        return self.final_layer_norm(hidden_states * self.residual_scale + self._feed_forward(hidden_states))


class BeatsEncoder(nn.Module):
    """Positional conv, (post-)LayerNorm and the transformer layers sharing one relative position bias."""

    def __init__(self, config: BeatsConfig) -> None:
        super().__init__()
        if config.deep_norm and config.layer_norm_first:
            raise ValueError("deep_norm applies to post-LN layers only; set layer_norm_first=False")
        self.config = config
        self.pos_conv = BeatsPositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.encoder_embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layerdrop = config.encoder_layerdrop
        self.layers = nn.ModuleList(BeatsEncoderLayer(config) for _ in range(config.encoder_layers))
        if config.relative_position_embedding:
            # One table for all layers (the published code aliases layer 0's table into every layer).
            self.relative_attention_bias = nn.Embedding(config.num_buckets, config.encoder_attention_heads)
        else:
            self.relative_attention_bias = None

    def compute_position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, length, length) bias; entry [h, i, j] depends on the distance j - i only."""
        weight = self.relative_attention_bias.weight
        positions = torch.arange(length, device=weight.device)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None], self.config.num_buckets, self.config.max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        if padding_mask is not None:
            # Padded tokens must not leak into their neighbours through the positional convolution.
            hidden_states = hidden_states.masked_fill(padding_mask[..., None], 0.0)
        hidden_states = hidden_states + self.pos_conv(hidden_states)
        if not self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        position_bias = None
        if self.relative_attention_bias is not None:
            position_bias = self.compute_position_bias(hidden_states.shape[1])

        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            if self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop:
                continue
            # Positional arguments: required for reentrant gradient checkpointing to see the tensors.
            hidden_states = layer(hidden_states, position_bias, padding_mask)

        if self.config.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
            return hidden_states, tuple(all_hidden_states)
        return hidden_states, None


class BeatsPreTrainedModel(PreTrainedModel):
    config_class = BeatsConfig
    config: BeatsConfig
    base_model_prefix = "beats"
    main_input_name = "input_features"
    input_modalities = "audio"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BeatsEncoderLayer"]
    _supports_sdpa = True

    @staticmethod
    def _torch_default_init(module: nn.Linear | nn.Conv2d) -> None:
        """PyTorch's own Linear/Conv default (kaiming-uniform, a=sqrt(5)), which the published code keeps."""
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(module.bias, -bound, bound)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise like the published code.

        Dispatches on the modules that own parameters directly: for code outside the transformers
        package, `PreTrainedModel.initialize_weights` skips modules without direct parameters (all of
        their zero parameters count as initialised), so e.g. a branch on `BeatsEncoderLayer` would
        never run. Projections that the published code re-initialises carry an `xavier_gain` attribute.
        Their biases start at zero (the published code zeroes `out_proj.bias` and leaves the others
        at PyTorch's default).
        """
        if isinstance(module, nn.Linear) and hasattr(module, "xavier_gain"):
            init.xavier_normal_(module.weight, gain=module.xavier_gain)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            self._torch_default_init(module)
        elif isinstance(module, parametrize.ParametrizationList) and hasattr(module, "original1"):
            # (g, v) of the weight-normed positional conv, on the module that owns them (so that ZeRO-3's per-module
            # gathering covers them): v (dim, dim / groups, kernel) ~ N(0, 4 / (kernel * dim)), g = ||v|| per
            # kernel tap, so the reparametrised weight starts equal to v.
            direction = module.original1
            std = math.sqrt(4.0 / (direction.shape[2] * direction.shape[0]))
            init.normal_(direction, mean=0.0, std=std)
            init.copy_(module.original0, torch.norm_except_dim(direction, 2, 2))
        elif isinstance(module, nn.Conv1d) and parametrize.is_parametrized(module, "weight"):
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # the shared relative position bias table
            init.xavier_normal_(module.weight)
        elif isinstance(module, BeatsAttention) and module.gru_rel_pos:
            init.ones_(module.grep_a)


class BeatsModel(BeatsPreTrainedModel):
    """BEATs encoder: filterbank (batch, frames, mel) -> token features (batch, tokens, encoder_embed_dim).

    Tokens are 16x16 (time x mel) patches in time-major order: token t * (mel // 16) + f covers frames
    [16 t, 16 t + 16) and mel bins [16 f, 16 f + 16). Trailing frames that do not fill a patch are dropped.
    """

    def __init__(self, config: BeatsConfig) -> None:
        super().__init__(config)
        patch = config.input_patch_size
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        if config.embed_dim != config.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(config.embed_dim, config.encoder_embed_dim)
        else:
            self.post_extract_proj = None
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = BeatsEncoder(config)
        self.post_init()

    def token_padding_mask(self, padding_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Frame-level padding mask (True = padded) -> token-level mask, exactly as the published code does.

        The published code drops `frames % num_tokens` trailing frames and splits the rest into
        `num_tokens` consecutive groups; a token is padded when its whole group is. With 16x16 patches
        over 128 mel bins each group is 2 frames inside the token's own 16-frame patch, so for padding
        at the end (the only kind MultiMood produces) whole padded patches are masked exactly.
        """
        if padding_mask.dim() == 3:  # (batch, frames, mel), as MultiMood builds it
            padding_mask = padding_mask.all(-1)
        padding_mask = padding_mask.bool()
        frames = padding_mask.shape[1] - padding_mask.shape[1] % num_tokens
        return padding_mask[:, :frames].reshape(padding_mask.shape[0], num_tokens, -1).all(-1)

    def forward(
        self,
        input_features: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
    ) -> BaseModelOutput | tuple[torch.Tensor, ...]:
        """Encode raw Kaldi filterbanks.

        Args:
            input_features: (batch, frames, num_mel_bins) un-normalised log-mel filterbank.
            padding_mask: optional (batch, frames) or (batch, frames, num_mel_bins) bool, True = padded frame
                (the published BEATs convention, the opposite of an HF `attention_mask`).
            output_hidden_states: also return the input of every layer and the final output.
            return_dict: return a `BaseModelOutput` (default) or a plain tuple.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        if input_features.dim() != 3 or input_features.shape[-1] != self.config.num_mel_bins:
            raise ValueError(
                f"input_features must be (batch, frames, {self.config.num_mel_bins}), got {tuple(input_features.shape)}"
            )

        # The checkpoint was trained on filterbanks normalised with AudioSet statistics (note the 2 * std).
        fbank = (input_features.float() - self.config.fbank_mean) / (2 * self.config.fbank_std)
        fbank = fbank.to(self.patch_embedding.weight.dtype)
        features = self.patch_embedding(fbank.unsqueeze(1))  # (batch, embed_dim, frames // 16, mel // 16)
        features = features.flatten(2).transpose(1, 2)  # time-major token order, as in the checkpoint
        features = self.layer_norm(features)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        features = self.dropout_input(features)

        if padding_mask is not None:
            padding_mask = self.token_padding_mask(padding_mask.to(features.device), features.shape[1])

        last_hidden_state, hidden_states = self.encoder(features, padding_mask, output_hidden_states)
        if not return_dict:
            return tuple(v for v in (last_hidden_state, hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=last_hidden_state, hidden_states=hidden_states)


__all__ = ["BeatsModel", "BeatsPreTrainedModel"]
