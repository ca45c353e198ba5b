"""MultimoodForConditionalGeneration on tiny random configs of the real architecture (CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModel, AutoModelForCausalLM, MambaModel, Qwen2Model, SiglipVisionModel

from multimood import MultimoodConfig, MultimoodForConditionalGeneration, MultimoodModel
from tests.model_utils import (
    TINY_FBANK_FRAMES,
    TINY_IMAGE_SIZE,
    TINY_NUM_FRAMES,
    multimodal_batch,
    sensitive_model,
    tiny_config,
)

ALL_MODALITIES = [
    {"text": 12, "video": True, "audio": True, "history": 3},
    {"text": 9, "video": True, "audio": False, "history": 0},
    {"text": 7, "video": False, "audio": False, "history": 2},
]


def build(config=None, seed: int = 0, **kwargs) -> MultimoodForConditionalGeneration:
    torch.manual_seed(seed)
    return MultimoodForConditionalGeneration(config or tiny_config(**kwargs)).eval()


def with_labels(batch: dict) -> dict:
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, : labels.shape[1] // 2] = -100
    return {**batch, "labels": labels}


@pytest.mark.parametrize("compressor", ["mamba2", "mamba"])
def test_forward_backward_reaches_trainable_blocks_only(compressor):
    model = build(compressor=compressor).train()
    batch = with_labels(multimodal_batch(model.config, ALL_MODALITIES))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()

    def grads(module):
        return [p.grad for p in module.parameters() if p.requires_grad]

    inner = model.model
    for name in ("mm_projector", "mm_projector_a", "language_model"):
        assert any(g is not None and g.abs().sum() > 0 for g in grads(getattr(inner, name))), name
    compressor_grads = {n: p.grad for n, p in inner.mamba_compressor.named_parameters()}
    assert compressor_grads["memory_projection.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in compressor_grads.items() if n.startswith("mamba."))
    for tower in (inner.vision_tower, inner.audio_tower):
        assert all(not p.requires_grad and p.grad is None for p in tower.parameters())


def test_history_reaches_the_llm():
    """Changing only the history changes the logits: the memory tokens are really scattered in."""
    model = build()
    batch = multimodal_batch(model.config, [{"text": 6, "history": 2}])
    base = model(**batch).logits
    changed = dict(batch, history_input_ids=batch["history_input_ids"].clone())
    changed["history_input_ids"][0, 0] += 1
    assert not torch.allclose(base, model(**changed).logits)


def test_text_only_and_mixed_batches():
    model = build()
    text_only = multimodal_batch(model.config, [{"text": 8}, {"text": 5}])
    assert model(**text_only).logits.shape[:2] == text_only["input_ids"].shape
    mixed = multimodal_batch(model.config, [{"text": 8}, {"text": 5, "audio": True}])
    assert torch.isfinite(model(**mixed).logits).all()


def test_placeholder_mismatch_is_a_clear_error():
    model = build()
    batch = multimodal_batch(model.config, [{"text": 6, "video": True, "audio": True}])
    video_positions = (batch["input_ids"][0] == model.config.video_token_id).nonzero()
    broken = dict(batch, input_ids=batch["input_ids"].clone())
    broken["input_ids"][0, video_positions[0]] = 5
    expected = model.config.num_video_tokens(TINY_NUM_FRAMES)
    with pytest.raises(
        ValueError, match=rf"video: sample 0 holds {expected - 1} placeholder tokens .* {expected} vectors"
    ):
        model(**broken)
    with pytest.raises(ValueError, match="audio: 1 sample.* but 2 audio input"):
        model(**dict(batch, input_features=batch["input_features"].repeat(2, 1, 1)))
    no_audio_inputs = {k: v for k, v in batch.items() if k != "input_features"}
    with pytest.raises(ValueError, match="audio: 1 sample.* but 0 audio input"):
        model(**no_audio_inputs)


def test_token_counts_follow_config_and_shapes():
    config = tiny_config()
    model = build(config)
    video = torch.randn(2, TINY_NUM_FRAMES, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert model.get_video_features(video).shape == (2, config.num_video_tokens(TINY_NUM_FRAMES), 32)
    fbank = torch.randn(1, TINY_FBANK_FRAMES, 128)
    assert model.get_audio_features(fbank).shape == (1, config.num_audio_tokens(TINY_FBANK_FRAMES), 32)
    mlp = build(projector="mlp2x_gelu")
    assert mlp.get_video_features(video).shape[1] == TINY_NUM_FRAMES * (TINY_IMAGE_SIZE // 14) ** 2


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def regstage_params(depth: int, cin: int, cout: int) -> int:
    """RegNet Y bottleneck (group width 1, SE 0.25 of the block input) with LayerNorm2d, counted by hand."""
    total = 0
    for block in range(depth):
        c_in = cin if block == 0 else cout
        se = int(round(c_in * 0.25))
        total += c_in * cout + 2 * cout  # conv1 1x1 + norm
        total += cout * 9 + 2 * cout  # conv2 depthwise 3x3 + norm
        total += cout * se + se + se * cout + cout  # squeeze-excitation
        total += cout * cout + 2 * cout  # conv3 1x1 + norm
        if block == 0 and c_in != cout:
            total += c_in * cout + 2 * cout  # downsample 1x1 + norm
    return total


def beats_params(cfg) -> int:
    d, f, heads, layers = (
        cfg.encoder_embed_dim,
        cfg.encoder_ffn_embed_dim,
        cfg.encoder_attention_heads,
        cfg.encoder_layers,
    )
    patch = cfg.embed_dim * cfg.input_patch_size**2 + 2 * cfg.embed_dim + cfg.embed_dim * d + d
    pos_conv = d * (d // cfg.conv_pos_groups) * cfg.conv_pos + cfg.conv_pos + d  # weight_v, weight_g (per tap), bias
    layer = 4 * (d * d + d) + (d // heads) * 8 + 8 + heads + d * f + f + f * d + d + 4 * d
    return patch + pos_conv + cfg.num_buckets * heads + 2 * d + layers * layer


def test_published_config_on_meta_device():
    """`MultimoodConfig()` is the published model: token counts and parameter counts per block."""
    config = MultimoodConfig()
    assert config.num_video_tokens(16) == 1352 and config.num_audio_tokens(2998) == 1496
    with torch.device("meta"):
        model = MultimoodForConditionalGeneration(config)
        video = model.get_video_features(torch.empty(1, 16, 3, 384, 384))
        audio = model.get_audio_features(torch.empty(1, 2998, 128))
        reference = {
            "language_model": count(Qwen2Model(config.text_config)),
            "vision_tower": count(SiglipVisionModel(config.vision_config)),
            "mamba": count(MambaModel(config.compressor_config)),
            "s1": count(RegStage(4, 1152, 1536, 1, 1, act_layer=torch.nn.SiLU, norm_layer=LayerNorm2d)),
        }
    assert video.shape == (1, 1352, 1536) and audio.shape == (1, 1496, 1536)
    inner = model.model
    assert count(inner.language_model) == reference["language_model"] == 1_543_714_304
    assert count(inner.vision_tower) == reference["vision_tower"]
    assert count(inner.mamba_compressor.mamba) == reference["mamba"]
    assert count(inner.mm_projector.s1) == reference["s1"] == regstage_params(4, 1152, 1536)
    assert count(inner.mm_projector.s2) == regstage_params(4, 1536, 1536)
    assert count(inner.mm_projector.sampler) == 1536 * 1536 * 8 + 1536
    assert count(inner.mm_projector.readout) == 2 * (1536 * 1536 + 1536)
    assert count(inner.audio_tower) == beats_params(config.audio_config)
    assert count(inner.mm_projector_a) == 768 * 1536 + 1536
    assert count(inner.mamba_compressor.memory_projection) == 1024 * 1536 + 1536
    assert model.lm_head.weight is inner.language_model.embed_tokens.weight


def greedy(model, batch, steps: int = 6, **kwargs):
    """Greedy generation with the raw logits of every step."""
    return model.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=151643, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


def new_tokens(output, batch) -> torch.Tensor:
    return output.sequences[:, batch["input_ids"].shape[1] :]


def assert_same_generation(got, expected, got_rows=slice(None), expected_rows=slice(None)) -> None:
    """Equal tokens, and at every step logits close to those of the oracle run."""
    torch.testing.assert_close(
        got.sequences[got_rows, -len(got.logits) :],
        expected.sequences[expected_rows, -len(expected.logits) :],
        rtol=0,
        atol=0,
    )
    assert len(got.logits) == len(expected.logits)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a[got_rows], b[expected_rows], atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_generation_cache_matches_no_cache():
    """Cached decoding (media read once at prefill) equals re-reading the whole sequence at every step."""
    model = sensitive_model()
    batch = multimodal_batch(model.config, [ALL_MODALITIES[0]])
    with_cache = greedy(model, batch, use_cache=True)
    without_cache = greedy(model, batch, use_cache=False)
    assert with_cache.sequences.shape[1] == batch["input_ids"].shape[1] + 6
    assert len(set(new_tokens(with_cache, batch)[0].tolist())) > 1  # not a model that repeats one token
    assert_same_generation(with_cache, without_cache)


def test_batched_generation_matches_one_by_one():
    """Left-padded batch of every modality pattern == each sample alone, tokens and step logits."""
    model = sensitive_model()
    batch = multimodal_batch(model.config, ALL_MODALITIES, padding_side="left")
    batched = greedy(model, batch)
    media_index = {m: 0 for m in ("video", "audio", "history")}
    for i, sample in enumerate(ALL_MODALITIES):
        keep = batch["attention_mask"][i].bool()
        one = {
            "input_ids": batch["input_ids"][i : i + 1, keep],
            "attention_mask": batch["attention_mask"][i : i + 1, keep],
        }
        if sample.get("video"):
            one["pixel_values_videos"] = batch["pixel_values_videos"][media_index["video"]][None]
        if sample.get("audio"):
            one["input_features"] = batch["input_features"][media_index["audio"]][None]
        if sample.get("history"):
            row = batch["history_attention_mask"][media_index["history"]].bool()
            one["history_input_ids"] = batch["history_input_ids"][media_index["history"]][row][None]
            one["history_attention_mask"] = torch.ones_like(one["history_input_ids"])
        for modality in media_index:
            media_index[modality] += bool(sample.get(modality))
        assert_same_generation(greedy(model, one), batched, expected_rows=slice(i, i + 1))


@pytest.mark.parametrize("modality", ["video", "audio", "history"])
def test_each_input_changes_the_output(modality):
    """Another video, audio clip or chat history (same placeholders) changes the next-token logits clearly."""
    model = sensitive_model()
    batch = multimodal_batch(model.config, [ALL_MODALITIES[0]], seed=4)
    other = multimodal_batch(model.config, [ALL_MODALITIES[0]], seed=5)
    names = {"video": ["pixel_values_videos"], "audio": ["input_features"],
             "history": ["history_input_ids", "history_attention_mask"]}[modality]
    changed = {**batch, **{name: other[name] for name in names}}
    with torch.no_grad():
        base, moved = model(**batch).logits[0, -1], model(**changed).logits[0, -1]
    assert (moved - base).norm() > 0.05 * base.norm()


def test_sdpa_and_eager_agree():
    model = build()
    batch = multimodal_batch(model.config, ALL_MODALITIES)
    model.set_attn_implementation("sdpa")
    sdpa = model(**batch).logits
    model.set_attn_implementation("eager")
    eager = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(sdpa[mask], eager[mask], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = with_labels(multimodal_batch(tiny_config(), ALL_MODALITIES))

    def gradients(checkpointing: bool) -> dict:
        model = build().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_loss_normalised_by_num_items_in_batch():
    """Under gradient accumulation the Trainer passes the token count of all micro-batches."""
    model = build()
    batch = with_labels(multimodal_batch(model.config, ALL_MODALITIES))
    mean_loss = model(**batch).loss
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    summed = model(**batch, num_items_in_batch=torch.tensor(4 * n_items)).loss
    torch.testing.assert_close(summed * 4, mean_loss)


def test_resize_token_embeddings_keeps_compressor_in_step():
    model = build()
    model.resize_token_embeddings(TINY := model.config.text_config.vocab_size + 64)
    assert model.model.mamba_compressor.mamba.get_input_embeddings().num_embeddings == TINY
    assert model.config.compressor_config.vocab_size == TINY == model.lm_head.out_features


CLEAN_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["multimood"] = None  # the package must not be importable: only the saved remote code
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    folder, inputs = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "MultimoodModel"
    batch = torch.load(inputs)
    with torch.no_grad():
        torch.save(model(**batch).logits, inputs + ".logits")
    """
)


@pytest.mark.slow
def test_save_and_load_in_clean_process(tmp_path):
    model = build()
    batch = multimodal_batch(model.config, ALL_MODALITIES)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    files = sorted(os.listdir(folder))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"modeling_multimood.py", "configuration_multimood.py", "modeling_beats.py"} <= set(files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForMultimodalLM"}
    torch.save(batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run(
        [sys.executable, "-c", CLEAN_LOAD, str(folder), str(tmp_path / "batch.pt")],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    reloaded = MultimoodForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        expected, original = reloaded(**batch).logits, model(**batch).logits
    clean = torch.load(tmp_path / "batch.pt.logits")
    assert torch.equal(clean, expected)
    # Loaded weights sit at other memory alignments, so BLAS may round differently from the original tensors.
    torch.testing.assert_close(clean, original, atol=1e-5, rtol=1e-5)


def test_auto_classes_in_process(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), MultimoodForConditionalGeneration)
    assert isinstance(AutoModel.from_config(model.config), MultimoodModel)


def test_initialisation_is_complete():
    """Every parameter is initialised by `_init_weights` (no uninitialised memory), Mamba's A_log/D included."""
    model = build(compressor="mamba")
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    mixer = model.model.mamba_compressor.mamba.layers[0].mixer
    state = model.config.compressor_config.state_size
    expected_a = torch.log(torch.arange(1, state + 1, dtype=torch.float32)).expand_as(mixer.A_log)
    torch.testing.assert_close(mixer.A_log.float(), expected_a)
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def _ddp_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = build().train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        # Rank 0 sees every modality, rank 1 a text-only batch: both must run the same blocks.
        layout = [ALL_MODALITIES[0]] if rank == 0 else [{"text": 10}]
        for step in range(2):
            batch = with_labels(multimodal_batch(model.config, layout, seed=step))
            ddp(**batch).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        torch.save({n: g is not None for n, g in grads.items()}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_with_different_modalities_stay_in_step(tmp_path):
    """A text-only batch on one rank and a multimodal batch on another: no hang, no DDP error."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        has_grad = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(has_grad.values()), [n for n, ok in has_grad.items() if not ok][:5]
