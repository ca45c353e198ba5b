"""Model assembly from component checkpoints (LLM, SigLIP, Mamba, BEATs) saved locally, as from the Hub."""

from __future__ import annotations

import torch
from transformers import AutoModel, Qwen2ForCausalLM, SiglipVisionModel

from multimood import BeatsModel
from multimood.training.train import build_model_and_processor, parse_args
from tests.model_utils import tiny_config


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
