"""Model assembly from component checkpoints (LLM, SigLIP, Mamba, BEATs) saved locally, as from the Hub; the
processor owns the media settings."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, Qwen2ForCausalLM, SiglipVisionModel
from transformers.testing_utils import CaptureLogger

from multimood import BeatsModel, MultimoodConfig
from multimood.model import configuration_multimood
from multimood.training import quickstart
from multimood.training.train import build_model_and_processor, parse_args
from tests.model_utils import TINY_VOCAB, tiny_config


def test_components_are_loaded_into_the_assembled_model(tmp_path, shared_data):
    tiny = tiny_config(compressor="mamba2")
    torch.manual_seed(0)
    text_config = tiny.text_config
    text_config.tie_word_embeddings = False
    llm = Qwen2ForCausalLM(text_config)
    llm.save_pretrained(tmp_path / "llm")
    vision = SiglipVisionModel(tiny.vision_config)
    vision.save_pretrained(tmp_path / "siglip")
    compressor_config = tiny.compressor_config
    compressor_config.vocab_size = 1000  # smaller than the LLM's: the pretrained rows are kept
    mamba = AutoModel.from_config(compressor_config)
    mamba.save_pretrained(tmp_path / "mamba")
    beats = BeatsModel(tiny.audio_config)
    published = {f"model.audio_tower.{k}": v for k, v in beats.state_dict().items()}
    weight = published.pop("model.audio_tower.encoder.pos_conv.0.parametrizations.weight.original0")
    published["model.audio_tower.encoder.pos_conv.0.weight_g"] = weight
    weight = published.pop("model.audio_tower.encoder.pos_conv.0.parametrizations.weight.original1")
    published["model.audio_tower.encoder.pos_conv.0.weight_v"] = weight
    bias = published.pop("model.audio_tower.encoder.relative_attention_bias.weight")
    for layer in range(tiny.audio_config.encoder_layers):
        published[f"model.audio_tower.encoder.layers.{layer}.self_attn.relative_attention_bias.weight"] = bias
    cfg = {k: v for k, v in tiny.audio_config.to_dict().items() if k != "model_type"}
    torch.save({"cfg": cfg, "model": published}, tmp_path / "beats.pt")

    model_args, data_args, training_args = parse_args([
        "--model_path", str(tmp_path / "llm"), "--tokenizer_path", str(shared_data / "tokenizer" / "qwen2"),
        "--vision_tower", str(tmp_path / "siglip"), "--mamba_compressor", str(tmp_path / "mamba"),
        "--audio_tower", str(tmp_path / "beats.pt"), "--model_config", '{"connector_depth": 1}',
        "--num_frames", "4", "--output_dir", str(tmp_path / "out"),
    ])
    model, processor = build_model_and_processor(model_args, data_args, training_args)
    inner = model.model

    def same(module, reference):
        mine = module.state_dict()
        assert set(reference) <= set(mine), sorted(set(reference) - set(mine))[:5]
        return all(torch.equal(mine[k], v) for k, v in reference.items())

    assert same(
        inner.language_model, {k[len("model.") :]: v for k, v in llm.state_dict().items() if k.startswith("model.")}
    )
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    assert same(inner.vision_tower, vision.state_dict())
    assert same(inner.audio_tower, beats.state_dict())
    loaded_mamba = inner.mamba_compressor.mamba.state_dict()
    for name, value in mamba.state_dict().items():
        if "embed" in name:
            assert torch.equal(loaded_mamba[name][:1000], value), name
        else:
            assert torch.equal(loaded_mamba[name], value), name
    assert model.config.video_token_id == processor.video_token_id == 151646
    assert model.config.compressor_config.vocab_size == model.config.text_config.vocab_size


# What configs of earlier versions held and the processor now owns (their field list, written out by hand).
EARLIER_CONFIG_MEDIA_KEYS = {
    "num_frames", "image_size", "image_aspect_ratio", "num_k_vid", "audio_num_windows", "audio_window_seconds",
    "audio_max_seconds", "audio_sampling_rate", "history_max_tokens", "max_memory_slots",
}


def test_media_settings_go_to_the_processor(tmp_path, shared_data):
    """`--model_config` may still carry the media settings configs used to hold: they set the processor (a flag
    wins over them) and never reach the config; the frames take the vision tower's size."""
    model_config = quickstart.tiny_model_config(TINY_VOCAB, num_frames=4, image_size=56)
    assert model_config["audio_num_windows"] == 2 and model_config["audio_max_seconds"] == 4.0
    flags = ["--tokenizer_path", str(shared_data / "tokenizer" / "qwen2"), "--model_config", json.dumps(model_config),
             "--output_dir", str(tmp_path / "out"), "--num_frames", "2", "--num_k_vid", "3"]
    model, processor = build_model_and_processor(*parse_args(flags))
    video, audio = processor.video_processor, processor.feature_extractor
    assert video.num_frames == 2 and video.num_k_vid == audio.num_k_vid == processor.num_k_vid == 3
    assert (audio.num_windows, audio.max_seconds) == (2, 4.0)
    assert (video.size.height, video.size.width) == (56, 56)
    assert not EARLIER_CONFIG_MEDIA_KEYS & set(model.config.to_dict())
    # 2 frames of 56 px: 4x4 patches of 14 px, merged 2x2x2 by the STC connector -> 1 x 2 x 2 tokens
    assert video.num_video_tokens() == model.config.num_video_tokens(2) == 4
    with pytest.raises(ValueError, match="vision tower's image size 56"):
        build_model_and_processor(*parse_args(flags + ["--image_size", "28"]))


def test_config_json_of_earlier_versions_loads(tmp_path):
    """A config.json that still carries the media settings loads: they are dropped with a warning, not kept as
    attributes and not written again."""
    config = tiny_config()
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    earlier = {"num_frames": 16, "image_size": 384, "image_aspect_ratio": "pad", "num_k_vid": 5, "audio_num_windows": 8,
               "audio_window_seconds": 2.0, "audio_max_seconds": 30.0, "audio_sampling_rate": 16000,
               "history_max_tokens": 512, "max_memory_slots": None}
    assert set(earlier) == EARLIER_CONFIG_MEDIA_KEYS
    path.write_text(json.dumps({**json.loads(path.read_text()), **earlier}))
    with CaptureLogger(configuration_multimood.logger) as captured:
        loaded = MultimoodConfig.from_pretrained(tmp_path)
    assert "num_frames" in captured.out and "processor" in captured.out
    assert not any(hasattr(loaded, key) for key in earlier)
    assert loaded.num_video_tokens(4) == config.num_video_tokens(4)
    loaded.save_pretrained(tmp_path / "again")
    assert not EARLIER_CONFIG_MEDIA_KEYS & set(json.loads((tmp_path / "again" / "config.json").read_text()))
