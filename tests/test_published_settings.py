"""Settings that reproduce published behaviours where MultiMood's default differs (docs/fidelity.md):
no memory injection, BEATs layer drop in the frozen tower, frame averaging before an `mlp2x_gelu` projector."""

from __future__ import annotations

import pytest
import torch

from multimood import MultimoodForConditionalGeneration
from multimood.model.modeling_multimood import MultimoodModel
from multimood.model.video_processing_multimood import MultimoodVideoProcessor
from tests.model_utils import TINY_FBANK_FRAMES, TINY_IMAGE_SIZE, TINY_NUM_FRAMES, multimodal_batch, tiny_config


def build(seed: int = 0, **overrides) -> MultimoodForConditionalGeneration:
    torch.manual_seed(seed)
    return MultimoodForConditionalGeneration(tiny_config(**overrides)).eval()


# ---------------------------------------------------------------- memory injection


def test_memory_injection_off_ignores_history_and_refuses_placeholders():
    injecting = build(compressor="mamba")
    published = build(compressor="mamba", inject_history_memory=False)
    published.load_state_dict(injecting.state_dict())
    calls = []
    published.model.mamba_compressor.register_forward_hook(lambda *args: calls.append(1))

    with_slots = multimodal_batch(injecting.config, [{"text": 8, "video": True, "history": 2}])
    with torch.no_grad():
        injecting(**with_slots)  # the default consumes the memory at the <history> placeholders
        with pytest.raises(ValueError, match="inject_history_memory is False"):
            published(**with_slots)

    # a published prompt holds no placeholders; the history inputs are ignored and the compressor never runs
    text_only = multimodal_batch(injecting.config, [{"text": 8, "video": True}])
    history = {k: v for k, v in with_slots.items() if k.startswith("history_")}
    with torch.no_grad():
        expected = injecting(**text_only).logits
        ignored = published(**text_only, **history).logits
    assert torch.equal(ignored, expected) and calls == []


# ---------------------------------------------------------------- BEATs layer drop


def test_frozen_audio_tower_drops_layers_in_train_mode():
    """Published training: BEATs' encoder_layerdrop 0.05 acts although the tower is frozen (it stays in train mode)."""
    fbank = torch.randn(1, TINY_FBANK_FRAMES, 128) * 4 + 10
    model = build(audio_config={**tiny_config().audio_config.to_dict(), "encoder_layerdrop": 1.0}).model
    tower = model.audio_tower
    assert not any(p.requires_grad for p in tower.parameters())
    with torch.no_grad():
        full = model.get_audio_features(fbank)  # eval: no layer is dropped
        # the input of layer 0: what the encoder returns when every layer is skipped
        layer_input = tower(input_features=fbank, output_hidden_states=True).hidden_states[0]
        model.train()
        dropped = model.get_audio_features(fbank)
    assert torch.equal(dropped, model.mm_projector_a(layer_input))
    assert not torch.allclose(dropped, full)


def test_layer_drop_rate_is_the_configured_probability():
    model = build(audio_config={**tiny_config().audio_config.to_dict(), "encoder_layerdrop": 0.05}).model.train()
    encoder = model.audio_tower.encoder
    runs = []
    for layer in encoder.layers:
        layer.register_forward_hook(lambda *args: runs.append(1))
    hidden = torch.randn(1, 8, 32)
    torch.manual_seed(0)
    passes, threads = 400, torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny forwards: thread hand-offs would cost more than the work
    try:
        with torch.no_grad():
            for _ in range(passes):
                encoder(hidden)
    finally:
        torch.set_num_threads(threads)
    dropped = passes * len(encoder.layers) - len(runs)
    assert 20 <= dropped <= 65  # 800 draws at p = 0.05: 40 expected, sd 6.2
    encoder.eval()
    runs.clear()
    with torch.no_grad():
        encoder(hidden)
    assert len(runs) == len(encoder.layers)


def test_default_does_not_drop_layers():
    model = build().model.train()
    fbank = torch.randn(1, TINY_FBANK_FRAMES, 128)
    with torch.no_grad():
        first, second = model.get_audio_features(fbank), model.get_audio_features(fbank)
    assert model.config.audio_config.encoder_layerdrop == 0.0 and torch.equal(first, second)


# ---------------------------------------------------------------- mlp2x_gelu frame averaging


def test_mlp_frame_averaging_as_published():
    per_frame = build(projector="mlp2x_gelu")
    averaged = build(projector="mlp2x_gelu", video_frame_pooling="mean")
    averaged.load_state_dict(per_frame.state_dict())
    config = averaged.config
    patches = (TINY_IMAGE_SIZE // config.vision_config.patch_size) ** 2
    assert config.num_video_tokens(TINY_NUM_FRAMES) == patches
    assert per_frame.config.num_video_tokens(TINY_NUM_FRAMES) == TINY_NUM_FRAMES * patches

    # oracle 1: identical frames average to themselves, so the tokens are those of one frame
    frame = torch.randn(1, 1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    still = frame.expand(1, TINY_NUM_FRAMES, -1, -1, -1)
    with torch.no_grad():
        pooled = averaged.get_video_features(still)
        unpooled = per_frame.get_video_features(still)
    assert pooled.shape == (1, patches, 32)
    torch.testing.assert_close(pooled, unpooled[:, :patches], rtol=1e-5, atol=1e-6)

    # oracle 2: the published temporal_aggregator, mm_projector(frames_features.mean(1)), with the frames'
    # SigLIP features taken one frame at a time
    video = torch.randn(1, TINY_NUM_FRAMES, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    tower = averaged.model.vision_tower
    with torch.no_grad():
        frames = [tower(pixel_values=video[:, i], output_hidden_states=True).hidden_states[-2]
                  for i in range(TINY_NUM_FRAMES)]
        expected = averaged.model.mm_projector.readout(torch.stack(frames, 1).mean(1))
        torch.testing.assert_close(averaged.get_video_features(video), expected, rtol=1e-5, atol=1e-6)

    # the processor counts the same number of <video> placeholders, and the whole forward runs
    processor = MultimoodVideoProcessor(projector_type="mlp2x_gelu", frame_pooling="mean")
    assert processor.num_video_tokens(TINY_NUM_FRAMES, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) == patches
    batch = multimodal_batch(config, [{"text": 6, "video": True, "audio": True}])
    assert (batch["input_ids"] == config.video_token_id).sum() == patches
    with torch.no_grad():
        assert torch.isfinite(averaged(**batch).logits).all()


def test_frame_averaging_needs_the_mlp_projector():
    with pytest.raises(ValueError, match="video_frame_pooling"):
        tiny_config(video_frame_pooling="mean")
    with pytest.raises(ValueError, match="video_frame_pooling"):
        tiny_config(projector="mlp2x_gelu", video_frame_pooling="max")
    assert isinstance(build(projector="mlp2x_gelu", video_frame_pooling="mean").model, MultimoodModel)
