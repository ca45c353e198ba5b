"""`multimood convert` on layouts the published golden lacks: a synthetic checkpoint in the published
VideoLLaMA 2 / MultiMood layout (tiny sizes, published key names, `.bin` shards with an index, a tied head, unknown
and missing tensors, towers in their own files, the VideoLLaMA2.1-AV mlp2x_gelu layout) converts into a multimood
folder whose tensors equal the sources; every source key is converted or reported; missing tensors and towers are
errors that name them; `--to-published` goes back.

The converter's forward oracle is tests/test_published_checkpoint.py: a checkpoint built and run by the published
classes. Here the published names are written out by hand (independently of the converter's own mapping), and the
forward is compared with the model the synthetic checkpoint was made from.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multimood import MultimoodConfig, MultimoodForConditionalGeneration
from multimood.checkpoints.convert_videollama2_to_multimood import REPORT_NAME, ConversionError, convert, main
from multimood.checkpoints.weights import read_beats_checkpoint
from tests.model_utils import TINY_IMAGE_SIZE, TINY_NUM_FRAMES, TINY_VOCAB, multimodal_batch, tiny_config

PUBLISHED_TOKENIZER_LEN = 151647  # Qwen2 (151646) + <MEM>: the size the published compressor was resized to
PUBLISHED_MEM_ID = 151646  # <MEM> was the first token the published code added
PREDICTOR_CLASSES = 5
UNKNOWN_KEY = "model.some_future_block.weight"


def published_name(key: str) -> str:
    """Our key -> the published name (hand-written from the published code; the inverse of the converter)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower."):]
    if key.startswith("model.mm_projector.readout.") and MLP_VIDEO.get("on"):
        return "model.mm_projector." + key[len("model.mm_projector.readout."):]
    key = key.replace("pos_conv.0.parametrizations.weight.original0", "pos_conv.0.weight_g")
    key = key.replace("pos_conv.0.parametrizations.weight.original1", "pos_conv.0.weight_v")
    return key


MLP_VIDEO: dict = {}


def make_reference(seed: int = 0, **overrides) -> MultimoodForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_config(compressor="mamba", **overrides)
    return MultimoodForConditionalGeneration(config).eval()


def published_state(model: MultimoodForConditionalGeneration, mlp_video: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights as the published code's state dict would hold them."""
    MLP_VIDEO["on"] = mlp_video
    config = model.config
    state = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key == "model.audio_tower.encoder.relative_attention_bias.weight":
            for layer in range(config.audio_config.encoder_layers):  # one module aliased into every layer
                state[f"model.audio_tower.encoder.layers.{layer}.self_attn.relative_attention_bias.weight"] = value
            continue
        if key == "model.mamba_compressor.mamba.embeddings.weight":
            # the published compressor was resized to len(tokenizer) and knows <MEM> under its own id
            table = value[:PUBLISHED_TOKENIZER_LEN].clone()
            table[PUBLISHED_MEM_ID] = value[config.mem_token_id]
            state["model.mamba_compressor.mamba.embeddings.weight"] = table
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            state[key] = state["model.embed_tokens.weight"]  # torch.save of a tied model keeps both names
            continue
        state[published_name(key)] = value
    state["model.audio_tower.predictor.weight"] = torch.randn(PREDICTOR_CLASSES, config.audio_config.encoder_embed_dim)
    state["model.audio_tower.predictor.bias"] = torch.randn(PREDICTOR_CLASSES)
    return state


def published_config(model: MultimoodForConditionalGeneration, **extra) -> dict:
    config = model.config
    text = config.text_config.to_dict()
    out = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "transformers_version", "dtype")}
    out.update(
        architectures=["Videollama2Qwen2ForCausalLM"],
        model_type="videollama2_qwen2",
        torch_dtype="float32",
        mm_vision_tower="google/siglip-so400m-patch14-384",
        mm_projector_type=config.mm_projector_type,
        mm_hidden_size=32,
        mm_vision_select_layer=-2,
        image_aspect_ratio="pad",
        num_frames=TINY_NUM_FRAMES,
        mm_audio_tower="BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
        mm_projector_a_type=config.mm_projector_a_type,
        mm_hidden_size_a=32,
        hidden_size_a=32,
        tokenizer_model_max_length=2048,
        use_mm_proj=True,
        tune_mm_mlp_adapter=False,
        some_future_flag=True,
    )
    if config.compressor_config is not None:
        out.update(mamba_compressor="state-spaces/mamba-370m-hf", mem_token_id=PUBLISHED_MEM_ID,
                   tokenizer_len=PUBLISHED_TOKENIZER_LEN, freeze_mamba_compressor=False)
    out.update(extra)
    return out


def write_checkpoint(folder, state: dict, config: dict, shards: int = 2, fmt: str = "bin") -> None:
    """Sharded `.bin` (torch.save) or `.safetensors` files plus an index json, like `save_pretrained` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(state)
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        part = keys[i * size : (i + 1) * size]
        if fmt == "bin":
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k] for k in part}, folder / name)
        else:
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].contiguous().clone() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def siglip_config_folder(folder, config: MultimoodConfig):
    """A SigLIP folder with only its config.json (the tiny width hides the head count from the tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = config.vision_config.to_dict()
    (folder / "config.json").write_text(json.dumps(vision))
    return folder


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return str(shared_data / "tokenizer" / "qwen2")


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer):
    """(reference model, published state, checkpoint folder, SigLIP config folder, converted folder, report)."""
    root = tmp_path_factory.mktemp("convert")
    model = make_reference()
    state = published_state(model)
    state[UNKNOWN_KEY] = torch.randn(3)
    checkpoint = root / "published"
    write_checkpoint(checkpoint, state, published_config(model))
    vision = siglip_config_folder(root / "siglip", model.config)
    out = root / "multimood"
    overrides = json.dumps({"audio_config": {"max_distance": model.config.audio_config.max_distance}})
    code = main([str(checkpoint), str(out), "--tokenizer", tokenizer, "--vision_tower", str(vision),
                 "--config_overrides", overrides, "--verify"])
    assert code == 0
    report = json.loads((out / REPORT_NAME).read_text())
    return model, state, checkpoint, vision, out, report


def test_every_key_is_converted_or_reported(published):
    _, state, _, _, _, report = published
    tensors = report["tensors"]
    accounted = set(tensors["renamed"]) | set(tensors["unused"]) | set(tensors["unknown"])
    assert accounted == set(state)
    assert not set(tensors["renamed"]) & set(tensors["unused"]) and not set(tensors["renamed"]) & set(
        tensors["unknown"]
    )
    assert set(tensors["unknown"]) == {UNKNOWN_KEY}
    assert {"model.audio_tower.predictor.weight", "model.audio_tower.predictor.bias"} <= set(tensors["unused"])
    assert "model.audio_tower.encoder.layers.1.self_attn.relative_attention_bias.weight" in tensors["unused"]
    assert "DIFFERS" not in json.dumps(tensors["unused"])
    assert tensors["unused"]["lm_head.weight"].startswith("tied")  # the tiny model ties its head
    assert tensors["renamed"]["model.audio_tower.encoder.pos_conv.0.weight_g"].endswith(
        "parametrizations.weight.original0"
    )
    assert tensors["renamed"]["model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight"] == (
        "model.audio_tower.encoder.relative_attention_bias.weight"
    )
    assert tensors["renamed"]["model.embed_tokens.weight"] == "model.language_model.embed_tokens.weight"
    assert tensors["renamed"]["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] == (
        "model.vision_tower.post_layernorm.weight"
    )
    assert "some_future_flag" in report["config"]["unknown"] and "tune_mm_mlp_adapter" in report["config"]["ignored"]
    assert report["special_tokens"]["mem_token_id"] == 151649
    assert any("verified" in note for note in report["notes"])


def test_converted_tensors_equal_the_sources(published):
    model, state, _, _, out, report = published
    saved = load_file(str(out / "model.safetensors"))
    mamba = "model.mamba_compressor.mamba.embeddings.weight"
    for source, target in report["tensors"]["renamed"].items():
        if target == mamba:
            continue
        assert torch.equal(saved[target], state[source]), (source, target)
    # the compressor's table: extended to the LLM vocabulary, <MEM> moved to the processor's id
    table = saved[mamba]
    assert table.shape[0] == TINY_VOCAB and set(report["tensors"]["adjusted"]) == {mamba}
    assert "mean" in report["tensors"]["adjusted"][mamba] and "<MEM>" in report["tensors"]["adjusted"][mamba]
    assert torch.equal(table[:PUBLISHED_TOKENIZER_LEN], state[mamba])
    assert torch.equal(table[151649], state[mamba][PUBLISHED_MEM_ID])
    assert torch.allclose(table[PUBLISHED_TOKENIZER_LEN + 5], state[mamba].mean(0))
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "multimood"
        and config["compressor_config"]["_name_or_path"] == "state-spaces/mamba-370m-hf"
    )
    assert config["compressor_config"]["vocab_size"] == TINY_VOCAB and config["mem_token_id"] == 151649
    assert config["connector_depth"] == 1 and config["mm_projector_a_type"] == "linear"
    # frames and frame size are the processor's (config.json's num_frames, the vision tower's image size)
    assert "num_frames" not in config and "image_size" not in config
    video = json.loads((out / "processor_config.json").read_text())["video_processor"]
    assert video["num_frames"] == TINY_NUM_FRAMES and video["image_aspect_ratio"] == "pad"
    assert video["size"] == {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    assert config["audio_config"]["encoder_attention_heads"] == 4 and config["auto_map"]["AutoModelForCausalLM"]
    for name in (
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "modeling_multimood.py",
        "modeling_beats.py",
    ):
        assert (out / name).is_file(), name


def test_converted_forward_equals_the_reference(published):
    """Tied-head, sharded layout; memory injection switched on (a converted folder has it off) to cover the
    compressor."""
    reference, *_, out, _ = published
    converted = MultimoodForConditionalGeneration.from_pretrained(out, inject_history_memory=True).eval()
    batch = multimodal_batch(reference.config, [{"text": 6, "video": True, "audio": True, "history": 2}, {"text": 9}])
    with torch.no_grad():
        expected = reference(**batch).logits
        actual = converted(**batch).logits
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_missing_required_tensor_is_named(published, tmp_path, tokenizer):
    model, state, _, vision, *_ = published
    broken = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    write_checkpoint(tmp_path / "ckpt", broken, published_config(model), shards=1)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(tmp_path / "ckpt", tmp_path / "out", tokenizer=tokenizer, vision_tower=vision)
    code = main(
        [str(tmp_path / "ckpt"), str(tmp_path / "out2"), "--tokenizer", tokenizer, "--vision_tower", str(vision)]
    )
    assert code == 1


def test_unknown_key_fails_with_strict(published, tmp_path, tokenizer):
    _, _, checkpoint, vision, *_ = published
    with pytest.raises(ConversionError, match=re.escape(UNKNOWN_KEY)):
        convert(checkpoint, tmp_path / "out", tokenizer=tokenizer, vision_tower=vision, strict=True)


def test_towers_from_their_own_files(published, tmp_path, tokenizer):
    """Without SigLIP / BEATs in the checkpoint: an error naming what is missing, then the towers' own files."""
    model, state, *_ = published
    bare = {k: v for k, v in state.items()
            if not k.startswith(("model.vision_tower.", "model.audio_tower.")) and k != UNKNOWN_KEY}
    write_checkpoint(tmp_path / "ckpt", bare, published_config(model), shards=1)
    with pytest.raises(ConversionError, match=r"no vision tower.*--vision_tower"):
        convert(tmp_path / "ckpt", tmp_path / "out", tokenizer=tokenizer)
    siglip = tmp_path / "siglip"
    model.model.vision_tower.save_pretrained(siglip)  # a SigLIP vision folder: config and weights
    with pytest.raises(ConversionError, match=r"no audio tower.*--audio_tower"):
        convert(tmp_path / "ckpt", tmp_path / "out", tokenizer=tokenizer, vision_tower=siglip)
    beats = {published_name(f"model.audio_tower.{k}")[len("model.audio_tower."):]: v
             for k, v in model.model.audio_tower.state_dict().items()}
    bias = beats.pop("encoder.relative_attention_bias.weight")
    for layer in range(model.config.audio_config.encoder_layers):
        beats[f"encoder.layers.{layer}.self_attn.relative_attention_bias.weight"] = bias
    beats["predictor.weight"] = torch.randn(PREDICTOR_CLASSES, 32)
    cfg = {"encoder_layers": 2, "max_distance": model.config.audio_config.max_distance, "finetuned_model": True}
    torch.save({"model": beats, "cfg": cfg}, tmp_path / "BEATs.pt")
    report = convert(tmp_path / "ckpt", tmp_path / "out", tokenizer=tokenizer, vision_tower=siglip,
                     audio_tower=tmp_path / "BEATs.pt")
    assert report.other_sources == {"vision_tower": str(siglip), "audio_tower": str(tmp_path / "BEATs.pt")}
    assert "BEATs.pt:predictor.weight" in report.other_sources_unused
    converted = MultimoodForConditionalGeneration.from_pretrained(tmp_path / "out", inject_history_memory=True).eval()
    batch = multimodal_batch(model.config, [{"text": 5, "video": True, "audio": True, "history": 1}])
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_videollama2_av_layout(tmp_path, tokenizer):
    """VideoLLaMA2.1-AV-like: mlp2x_gelu video and audio projectors, untied head, safetensors shards, no compressor."""
    torch.manual_seed(1)
    text = dict(tiny_config().text_config.to_dict(), tie_word_embeddings=False, vocab_size=PUBLISHED_TOKENIZER_LEN)
    config = tiny_config(compressor=None, projector="mlp2x_gelu", mm_projector_a_type="mlp2x_gelu", text_config=text,
                         audio_config=dict(tiny_config().audio_config.to_dict(), max_distance=800))
    model = MultimoodForConditionalGeneration(config).eval()
    state = published_state(model, mlp_video=True)
    assert "model.mm_projector.0.weight" in state and "model.mm_projector_a.2.weight" in state
    write_checkpoint(
        tmp_path / "ckpt", state, published_config(model, mm_projector_type="mlp2x_gelu"), fmt="safetensors"
    )
    siglip = siglip_config_folder(tmp_path / "siglip", config)
    report = convert(tmp_path / "ckpt", tmp_path / "out", tokenizer=tokenizer, vision_tower=siglip, dtype="bfloat16")
    assert set(report.renamed) | set(report.unused) == set(state) and not report.unknown
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert report.dtype == "bfloat16" and all(v.dtype == torch.bfloat16 for v in saved.values())
    saved = {k: v.float() for k, v in saved.items()}
    state = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    assert torch.equal(saved["model.mm_projector.readout.2.weight"], state["model.mm_projector.2.weight"])
    assert torch.equal(saved["model.mm_projector_a.0.weight"], state["model.mm_projector_a.0.weight"])
    # the vocabulary grows to the processor's 151650 tokens; new rows are the mean
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        assert saved[key].shape[0] == 151650 and key in report.adjusted
    source = state["lm_head.weight"]
    assert torch.equal(saved["lm_head.weight"][:PUBLISHED_TOKENIZER_LEN], source)
    loaded = MultimoodForConditionalGeneration.from_pretrained(tmp_path / "out", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert loaded.config.mm_projector_type == "mlp2x_gelu" and loaded.config.compressor_config is None
    assert not loaded.config.tie_word_embeddings
    # the published temporal_aggregator averages the frames before an mlp2x_gelu projector: one frame of tokens
    assert loaded.config.video_frame_pooling == "mean" and report.profile["video_frame_pooling"] == "mean"
    assert loaded.config.num_video_tokens(TINY_NUM_FRAMES) == (56 // 14) ** 2
    processor_config = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert processor_config["video_processor"]["frame_pooling"] == "mean"  # its token count follows the model


def test_round_trip_to_published(published, tmp_path):
    _, state, *_, out, report = published
    code = main(["--to-published", str(out), str(tmp_path / "back")])
    assert code == 0
    back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "videollama2_qwen2" and config["mem_token_id"] == 151649
    assert config["mm_projector_type"] == "stc_connector_v35" and config["hidden_size"] == 32
    assert config["num_frames"] == TINY_NUM_FRAMES and config["image_aspect_ratio"] == "pad"  # from the processor
    expected = set(state) - {UNKNOWN_KEY, "model.audio_tower.predictor.weight", "model.audio_tower.predictor.bias"}
    assert set(back) == expected
    mamba = "model.mamba_compressor.mamba.embeddings.weight"
    for key in expected - {mamba}:
        assert torch.equal(back[key], state[key]), key
    # and the exported folder converts again
    shutil.copyfile(out / "tokenizer.json", tmp_path / "back" / "tokenizer.json")
    again = convert(tmp_path / "back", tmp_path / "again", vision_tower=published[3],
                    config_overrides={"audio_config": {"max_distance": 64}, "num_k_vid": 3})
    assert not again.unknown and set(again.unused) == {
        "model.audio_tower.encoder.layers.1.self_attn.relative_attention_bias.weight", "lm_head.weight"
    }
    # a processor setting among the overrides goes to the processor, not the config
    assert "num_k_vid" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert json.loads((tmp_path / "again" / "processor_config.json").read_text())["video_processor"]["num_k_vid"] == 3


def test_read_beats_checkpoint_reports_unused(tmp_path):
    state = {
        "model.audio_tower.encoder.pos_conv.0.weight_g": torch.ones(1, 1, 4),
        "model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight": torch.ones(8, 2),
        "model.audio_tower.encoder.layers.1.self_attn.relative_attention_bias.weight": torch.zeros(8, 2),
        "model.audio_tower.predictor.weight": torch.ones(3, 4),
    }
    torch.save(state, tmp_path / "audio_tower.bin")
    unused: dict = {}
    converted, cfg = read_beats_checkpoint(tmp_path / "audio_tower.bin", unused)
    assert cfg == {}
    assert set(converted) == {
        "encoder.pos_conv.0.parametrizations.weight.original0",
        "encoder.relative_attention_bias.weight",
    }
    assert set(unused) == {"predictor.weight", "encoder.layers.1.self_attn.relative_attention_bias.weight"}
    assert "DIFFERS" in unused["encoder.layers.1.self_attn.relative_attention_bias.weight"]
