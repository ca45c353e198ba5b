"""MultiMood's feature paths against hand computations (CPU, tiny seeded configs).

Each oracle is written here from the architecture, not from the model's code: SigLIP run layer by layer up
to `mm_vision_select_layer`; the STC connector from timm's RegStage, an einsum for the 2x2x2 sampler and
F.linear for the readout; each memory token as the last Mamba state of the history prefix that ends at
its `<MEM>`; the full forward as the LLM on embeddings merged by hand, row by row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from multimood import MultimoodConfig
from multimood.model.modeling_multimood import MultimoodSTCConnector
from tests.model_utils import TINY_IMAGE_SIZE, TINY_NUM_FRAMES, multimodal_batch, sensitive_model, tiny_config

ALL_MODALITIES = [
    {"text": 12, "video": True, "audio": True, "history": 3},
    {"text": 9, "video": True, "audio": False, "history": 0},
    {"text": 7, "video": False, "audio": True, "history": 2},
]


def siglip_layer_by_hand(tower: nn.Module, pixels: torch.Tensor, select: int) -> torch.Tensor:
    """The SigLIP hidden state `select` (HF convention: 0 = embeddings, -1 = last layer, no post-LayerNorm)."""
    hidden = tower.embeddings(pixels)
    layers = tower.encoder.layers
    for layer in layers[: select if select >= 0 else len(layers) + 1 + select]:
        out = layer(hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def stc_by_hand(connector: MultimoodSTCConnector, config: MultimoodConfig, features: torch.Tensor) -> torch.Tensor:
    """(videos, frames, patches, C) -> (videos, tokens, width), one video and one frame at a time.

    Per frame: the patch grid (row-major) through RegStage s1. The frames stacked in time, then every
    (kt, kh, kw) block merged by the sampler's weights (an einsum; trailing frames/rows/columns that do not
    fill a block are dropped, as a stride-k conv without padding does) and SiLU. Per merged time slice:
    RegStage s2. Tokens in (time, row, column) order through Linear-GELU-Linear.
    """
    stage_kwargs = {"stride": 1, "dilation": 1, "act_layer": nn.SiLU, "norm_layer": LayerNorm2d}
    vision_width, width = config.vision_config.hidden_size, config.text_config.hidden_size
    s1 = RegStage(depth=config.connector_depth, in_chs=vision_width, out_chs=width, **stage_kwargs).eval()
    s2 = RegStage(depth=config.connector_depth, in_chs=width, out_chs=width, **stage_kwargs).eval()
    s1.load_state_dict(connector.s1.state_dict())
    s2.load_state_dict(connector.s2.state_dict())
    kt, kh, kw = config.connector_downsample
    weight, bias = connector.sampler[0].weight, connector.sampler[0].bias  # (out, in, kt, kh, kw)
    side = int(features.shape[2] ** 0.5)
    videos = []
    for video in features:
        maps = [s1(frame.reshape(side, side, -1).permute(2, 0, 1)[None])[0] for frame in video]
        clip = torch.stack(maps, dim=1)  # (width, frames, side, side)
        t, h, w = clip.shape[1] // kt, side // kh, side // kw
        blocks = clip[:, : t * kt, : h * kh, : w * kw].reshape(width, t, kt, h, kh, w, kw)
        merged = torch.einsum("ctahbwd,ocabd->othw", blocks, weight) + bias[:, None, None, None]
        merged = merged * torch.sigmoid(merged)
        tokens = [s2(merged[:, i][None])[0].permute(1, 2, 0).reshape(h * w, width) for i in range(t)]
        videos.append(torch.cat(tokens))
    x = torch.stack(videos)
    readout = [m for m in connector.readout if isinstance(m, nn.Linear)]
    for i, linear in enumerate(readout):
        x = F.linear(F.gelu(x) if i else x, linear.weight, linear.bias)
    return x


def video_features_by_hand(model, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    inner, config = model.model, model.config
    videos, frames = pixel_values_videos.shape[:2]
    hidden = siglip_layer_by_hand(inner.vision_tower, pixel_values_videos.flatten(0, 1), config.mm_vision_select_layer)
    return stc_by_hand(inner.mm_projector, config, hidden.reshape(videos, frames, *hidden.shape[1:]))


def memory_tokens_by_hand(model, history_input_ids: torch.Tensor, history_attention_mask: torch.Tensor):
    """Per row, in order: the Mamba state after reading the history up to and including each `<MEM>`
    (a separate unpadded run on that prefix, last position), projected to the LLM width."""
    compressor = model.model.mamba_compressor
    projection = compressor.memory_projection
    rows = []
    for ids, mask in zip(history_input_ids, history_attention_mask):
        ids = ids[mask.bool()]
        states = [
            compressor.mamba(input_ids=ids[: position + 1][None]).last_hidden_state[0, -1]
            for position in (ids == model.config.mem_token_id).nonzero().flatten().tolist()
        ]
        rows.append([F.linear(state, projection.weight, projection.bias) for state in states])
    return rows


def logits_by_hand(model, batch: dict) -> torch.Tensor:
    """The Qwen2 decoder and LM head on embeddings where each row's placeholders get its own item's features."""
    inner, config = model.model, model.config
    video = iter(video_features_by_hand(model, batch["pixel_values_videos"]))
    audio_tower = inner.audio_tower(input_features=batch["input_features"]).last_hidden_state
    audio = iter(F.linear(audio_tower, inner.mm_projector_a.weight, inner.mm_projector_a.bias))
    history = iter(memory_tokens_by_hand(model, batch["history_input_ids"], batch["history_attention_mask"]))
    embeds = inner.language_model.embed_tokens(batch["input_ids"]).clone()
    for row, ids in enumerate(batch["input_ids"]):
        for token_id, items in ((config.video_token_id, video), (config.audio_token_id, audio),
                                (config.history_token_id, history)):
            positions = (ids == token_id).nonzero().flatten()
            if len(positions):
                features = next(items)
                for position, feature in zip(positions.tolist(), features, strict=True):
                    embeds[row, position] = feature
    for items in (video, audio, history):
        assert next(items, None) is None  # every item was used
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    return model.lm_head(hidden)


@torch.no_grad()
def test_video_features_equal_siglip_select_layer_then_connector():
    model = sensitive_model()
    config = model.config
    pixels = torch.randn(
        2, TINY_NUM_FRAMES, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1)
    )
    expected = video_features_by_hand(model, pixels)
    assert expected.shape == (2, config.num_video_tokens(TINY_NUM_FRAMES), config.text_config.hidden_size)
    torch.testing.assert_close(model.get_video_features(pixels), expected, atol=1e-5, rtol=1e-5)
    # The oracle tells the layers apart: the last layer's state would give other tokens.
    last_layer = siglip_layer_by_hand(model.model.vision_tower, pixels.flatten(0, 1), -1)
    last = stc_by_hand(model.model.mm_projector, config, last_layer.reshape(2, TINY_NUM_FRAMES, *last_layer.shape[1:]))
    assert config.mm_vision_select_layer != -1 and (last - expected).abs().max() > 1e-2


@pytest.mark.parametrize("image_size, depth", [(56, 1), (70, 2)])
@torch.no_grad()
def test_stc_connector_equals_hand_forward(image_size: int, depth: int):
    """4 or 5 patches a side (the 5th row and column dropped by the sampler, as 27 -> 13 in the published model),
    RegStage depth 1 or 2, vision width 16 != LLM width 32 (s1's first block downsamples)."""
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": 14, "vision_use_head": False}
    config = tiny_config(vision_config=vision, connector_depth=depth)
    torch.manual_seed(0)
    connector = MultimoodSTCConnector(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the LayerNorm2d gains and biases off 1 / 0, so that a swapped norm would show
        for name, param in connector.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    side = image_size // 14
    features = torch.randn(2, TINY_NUM_FRAMES, side * side, 16, generator=generator)
    expected = stc_by_hand(connector, config, features)
    assert expected.shape == (2, TINY_NUM_FRAMES // 2 * (side // 2) ** 2, 32)
    torch.testing.assert_close(connector(features), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compressor", ["mamba2", "mamba"])
@torch.no_grad()
def test_memory_tokens_are_mamba_states_at_each_mem(compressor: str):
    model = sensitive_model(compressor=compressor)
    batch = multimodal_batch(
        model.config, [{"text": 4, "history": 3}, {"text": 4, "history": 1}, {"text": 4, "history": 4}], seed=2
    )
    ids, mask = batch["history_input_ids"], batch["history_attention_mask"]
    assert (mask == 0).any()  # rows of different lengths, right-padded as the processor pads them
    expected = memory_tokens_by_hand(model, ids, mask)
    memory, per_row = model.get_history_features(ids, mask)
    assert per_row.tolist() == [len(row) for row in expected] == [3, 1, 4]
    torch.testing.assert_close(memory, torch.stack([m for row in expected for m in row]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_equals_llm_on_embeddings_merged_by_hand():
    """Every modality in every row pattern: the logits equal the LLM run on hand-merged embeddings."""
    model = sensitive_model()
    batch = multimodal_batch(model.config, ALL_MODALITIES, seed=3)
    expected = logits_by_hand(model, batch)
    logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-4, rtol=1e-4)
