"""Tests of the BEATs audio encoder (`multimood.model.modeling_beats`) on tiny configs, CPU only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from multimood.model.configuration_multimood import BeatsConfig
from multimood.model.modeling_beats import BeatsModel, relative_position_bucket

FRAMES = 160  # 1.6 s of 10 ms filterbank frames -> 10 x 8 = 80 tokens


def tiny_config(**overrides) -> BeatsConfig:
    kwargs = dict(
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        conv_pos=8,
        conv_pos_groups=4,
        embed_dim=16,
        input_patch_size=16,
        num_buckets=32,
        max_distance=64,
    )
    kwargs.update(overrides)
    return BeatsConfig(**kwargs)


def randomise_(model: BeatsModel, seed: int = 0) -> BeatsModel:
    """Move the parameters away from their structured init (unit gates, unit LayerNorms, zero biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("grep_a"):
                param.copy_(noise.abs() + 0.5)
            elif "layer_norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or "relative_attention_bias" in name:
                param.copy_(0.3 * noise)
    return model


def make_model(seed: int = 0, **overrides) -> BeatsModel:
    torch.manual_seed(seed)
    return randomise_(BeatsModel(tiny_config(**overrides)), seed).eval()


def fbank(batch: int = 2, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 128, generator=generator) * 4.0 + 15.0


@pytest.mark.parametrize("frames", [160, 170, 333])
def test_token_count_matches_config(frames: int) -> None:
    model = make_model()
    with torch.no_grad():
        out = model(fbank(1, frames)).last_hidden_state
    assert out.shape == (1, model.config.num_output_tokens(frames), 32)
    # Published setting: 30 s -> 2998 frames -> 187 patches in time x 8 in frequency.
    assert BeatsConfig().num_output_tokens(2998) == 187 * 8 == 1496


def test_relative_position_bucket_hand_computed() -> None:
    # 32 buckets, bidirectional: 16 per direction, the first max_exact = 8 distances exact, log-spaced to 64.
    distance = torch.tensor([0, -1, 1, -7, 7, -8, -16, 16, -63, -64, -1000, 1000])
    expected = [
        0,  # same position
        1,  # key one step before the query
        16 + 1,  # key one step after: upper half
        7,
        16 + 7,
        8,  # 8 + floor(log(8/8) / log(64/8) * 8)
        10,  # 8 + floor(log(2) / log(8) * 8) = 8 + floor(2.67)
        16 + 10,
        15,  # 8 + floor(log(63/8) / log(8) * 8) = 8 + 7
        15,  # 8 + 8 = 16, clipped to the last bucket of the half
        15,
        31,
    ]
    assert relative_position_bucket(distance, num_buckets=32, max_distance=64).tolist() == expected
    # Published setting (320 buckets, max distance 800): 80 exact distances, far ones share bucket 159 / 319.
    published = relative_position_bucket(torch.tensor([-79, -80, -1495, 1495]), num_buckets=320, max_distance=800)
    assert published.tolist() == [79, 80, 159, 319]


def test_position_bias_is_one_shared_module_used_by_every_layer() -> None:
    model = make_model()
    encoder = model.encoder
    bias_keys = [key for key in model.state_dict() if "relative_attention_bias" in key]
    assert bias_keys == ["encoder.relative_attention_bias.weight"]
    assert not any(hasattr(layer.self_attn, "relative_attention_bias") for layer in encoder.layers)

    # One bias tensor is computed per forward and handed to every layer.
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[1])) for layer in encoder.layers]
    with torch.no_grad():
        model(fbank())
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(encoder.layers) and all(bias is seen[0] for bias in seen)

    # Every layer's output depends on the shared table. (A constant shift of the table would not show:
    # the gate is constant along each attention row, so it cancels in the softmax.)
    hidden = torch.randn(2, 80, 32)
    with torch.no_grad():
        before = encoder.compute_position_bias(80)
        encoder.relative_attention_bias.weight.add_(torch.randn(32, 4))
        after = encoder.compute_position_bias(80)
        for layer in encoder.layers:
            assert (layer(hidden, before) - layer(hidden, after)).abs().max() > 1e-3
    # Entry [h, i, j] depends on j - i only (Toeplitz per head).
    assert torch.equal(after[0, :, 1:, 1:], after[0, :, :-1, :-1])


def test_positional_conv_is_weight_normed_over_kernel_axis() -> None:
    model = make_model()
    conv = model.encoder.pos_conv[0]
    assert parametrize.is_parametrized(conv, "weight")
    state = model.state_dict()
    magnitude = state["encoder.pos_conv.0.parametrizations.weight.original0"]
    direction = state["encoder.pos_conv.0.parametrizations.weight.original1"]
    assert magnitude.shape == (1, 1, 8)  # one gain per kernel tap
    assert direction.shape == (32, 32 // 4, 8)
    expected = magnitude * direction / direction.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    torch.testing.assert_close(conv.weight, expected)
    # At init the reparametrisation is the identity: g = ||v||.
    fresh = BeatsModel(tiny_config()).encoder.pos_conv[0]
    torch.testing.assert_close(fresh.weight, fresh.parametrizations.weight.original1)


def naive_layer(
    layer, hidden: torch.Tensor, position_bias: torch.Tensor, key_padding: torch.Tensor | None, num_layers: int
):
    """Textbook softmax(QK^T * scale + gated bias) V followed by the DeepNet post-LN residuals."""
    attn = layer.self_attn
    batch, length, dim = hidden.shape
    heads = attn.num_heads
    head_dim = dim // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, length, heads, head_dim).permute(0, 2, 1, 3)

    q, k, v = split(attn.q_proj(hidden)), split(attn.k_proj(hidden)), split(attn.v_proj(hidden))
    gates = torch.sigmoid(attn.grep_linear(q).view(batch, heads, length, 2, 4).sum(-1))
    gate_a, gate_b = gates[..., :1], gates[..., 1:]
    gate = gate_a * (gate_b * attn.grep_a - 1.0) + 2.0
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + gate * position_bias
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
    context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, length, dim)
    alpha = (2 * num_layers) ** 0.25
    hidden = layer.self_attn_layer_norm(alpha * hidden + attn.out_proj(context))
    ffn = layer.fc2(F.gelu(layer.fc1(hidden)))
    return layer.final_layer_norm(alpha * hidden + ffn)


@pytest.mark.parametrize("padded", [False, True])
def test_layer_matches_naive_attention(padded: bool) -> None:
    model = make_model()
    layer = model.encoder.layers[1]
    hidden = torch.randn(2, 80, 32, generator=torch.Generator().manual_seed(1))
    bias = model.encoder.compute_position_bias(80)
    key_padding = None
    if padded:
        key_padding = torch.zeros(2, 80, dtype=torch.bool)
        key_padding[1, 50:] = True
    with torch.no_grad():
        ours = layer(hidden, bias, key_padding)
        reference = naive_layer(layer, hidden, bias, key_padding, num_layers=2)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_padding_mask_blocks_padded_frames() -> None:
    model = make_model()
    features = fbank()
    padding = torch.zeros(2, FRAMES, dtype=torch.bool)
    padding[1, 128:] = True  # last 2 of 10 patches in time -> tokens 64..79 of item 1
    token_mask = model.token_padding_mask(padding, 80)
    assert token_mask[0].sum() == 0 and token_mask[1].tolist() == [False] * 64 + [True] * 16
    # The (batch, frames, mel) form that MultiMood passes reduces over mel bins.
    assert torch.equal(model.token_padding_mask(padding[..., None].expand(-1, -1, 128), 80), token_mask)

    changed = features.clone()
    changed[1, 128:] = torch.randn(32, 128) * 10
    with torch.no_grad():
        masked = model(features, padding_mask=padding).last_hidden_state
        masked_changed = model(changed, padding_mask=padding).last_hidden_state
        unmasked = model(features).last_hidden_state
        unmasked_changed = model(changed).last_hidden_state
    # With the mask, real tokens ignore whatever sits in the padded frames ...
    torch.testing.assert_close(masked[1, :64], masked_changed[1, :64], atol=1e-5, rtol=1e-5)
    # ... without it they see it; and the unpadded item is unaffected by the other item's mask.
    assert (unmasked[1, :64] - unmasked_changed[1, :64]).abs().max() > 1e-2
    torch.testing.assert_close(masked[0], unmasked[0], atol=1e-5, rtol=1e-5)


def test_input_is_normalised_with_config_statistics() -> None:
    z = torch.randn(1, FRAMES, 128)
    model = make_model()
    identity = make_model(fbank_mean=0.0, fbank_std=0.5)  # (x - 0) / (2 * 0.5) = x
    identity.load_state_dict(model.state_dict())
    with torch.no_grad():
        raw = model(model.config.fbank_mean + 2 * model.config.fbank_std * z).last_hidden_state
        normalised = identity(z).last_hidden_state
    torch.testing.assert_close(raw, normalised, atol=1e-4, rtol=1e-4)


def test_hidden_states_and_tuple_output() -> None:
    model = make_model()
    with torch.no_grad():
        out = model(fbank(), output_hidden_states=True)
        as_tuple = model(fbank(), return_dict=False)
    assert len(out.hidden_states) == model.config.encoder_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert torch.equal(as_tuple[0], out.last_hidden_state) and len(as_tuple) == 1
    with pytest.raises(ValueError):
        model(torch.randn(1, 128, FRAMES))  # (batch, mel, frames) is a layout mistake


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_parameter(checkpointing: bool) -> None:
    model = make_model().train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
    model(fbank()).last_hidden_state.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model(fbank()).last_hidden_state.square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)


def test_bfloat16_forward() -> None:
    model = make_model()
    with torch.no_grad():
        reference = model(fbank()).last_hidden_state
        out = model.to(torch.bfloat16)(fbank()).last_hidden_state  # float32 input, cast inside
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().mean() < 0.05


def expected_parameter_count(config: BeatsConfig) -> int:
    """Parameter count from the layer shapes (the AudioSet `predictor` excluded)."""
    embed, dim, ffn = config.embed_dim, config.encoder_embed_dim, config.encoder_ffn_embed_dim
    heads, kernel, patch = config.encoder_attention_heads, config.conv_pos, config.input_patch_size
    patch_embedding = embed * patch * patch + (embed if config.conv_bias else 0)
    front = patch_embedding + 2 * embed + (embed * dim + dim if embed != dim else 0)
    pos_conv = kernel + dim * (dim // config.conv_pos_groups) * kernel + dim  # g, v, bias
    encoder = pos_conv + 2 * dim + config.num_buckets * heads
    attention = 4 * (dim * dim + dim) + (dim // heads * 8 + 8) + heads  # q, k, v, out, grep_linear, grep_a
    layer = attention + (dim * ffn + ffn) + (ffn * dim + dim) + 2 * 2 * dim
    return front + encoder + config.encoder_layers * layer


def test_default_model_on_meta_has_published_parameter_count() -> None:
    config = BeatsConfig()
    with torch.device("meta"):
        model = BeatsModel(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameter_count(config)
    # The published BEATs_iter3+ checkpoint has 90,717,055 parameters, of which the predictor
    # (Linear 768 -> 527) holds 768 * 527 + 527 = 405,263.
    assert count == 90_717_055 - (768 * 527 + 527)
    assert expected_parameter_count(tiny_config()) == sum(p.numel() for p in BeatsModel(tiny_config()).parameters())


def test_save_and_reload_keeps_weights(tmp_path) -> None:
    model = make_model()
    model.save_pretrained(tmp_path)
    reloaded = BeatsModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(fbank()).last_hidden_state, model(fbank()).last_hidden_state)
