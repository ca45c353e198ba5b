"""bfloat16 on the CPU against float32, for every convolution the model runs.

On CPUs with AMX-BF16, torch 2.14's oneDNN computes grouped bf16 Conv1d with few channels per group wrongly
(e.g. 32 channels, 4 groups, kernel 8: relative error ~1; correct with ONEDNN_MAX_CPU_ISA=AVX512_CORE). The
model must give bf16 results close to float32 on any CPU. On a CPU without the bug these tests pass with or
without the workaround; on an AMX CPU the BEATs positional-conv tests fail without it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multimood import MultimoodConfig, MultimoodForConditionalGeneration
from multimood.model.configuration_multimood import BeatsConfig
from multimood.model.modeling_beats import BeatsModel, BeatsPositionalConvEmbedding
from multimood.model.modeling_multimood import MultimoodSTCConnector
from tests.model_utils import TINY_NUM_FRAMES, multimodal_batch, sensitive_model, tiny_config

# bf16 keeps 8 bits of mantissa: rounding inputs and weights gives ~0.3-1 % relative error in these blocks.
BF16_TOLERANCE = 0.02


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def bf16_errors(module: nn.Module, *inputs: torch.Tensor) -> tuple[float, float]:
    """Relative error of the float32 module under CPU autocast (as the Trainer runs with --bf16) and of the
    module cast to bf16 (in place), against the float32 module."""
    module = module.eval()
    with torch.no_grad():
        reference = module(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = module(*inputs)
        cast = module.to(torch.bfloat16)(*(x.bfloat16() if x.is_floating_point() else x for x in inputs))
    if not isinstance(reference, torch.Tensor):
        reference, autocast, cast = reference[0], autocast[0], cast[0]
    return relative_error(cast, reference), relative_error(autocast, reference)


@pytest.mark.parametrize(
    "channels, groups, kernel",
    [(32, 4, 8), (16, 2, 8), (64, 16, 16), (768, 16, 128)],  # wrong in bf16 on AMX CPUs ... published shape
)
def test_beats_positional_conv_bf16_matches_float32(channels: int, groups: int, kernel: int):
    config = BeatsConfig(encoder_embed_dim=channels, conv_pos=kernel, conv_pos_groups=groups)
    torch.manual_seed(0)
    embedding = BeatsPositionalConvEmbedding(config)
    hidden = torch.randn(2, 160, channels, generator=torch.Generator().manual_seed(0))
    cast, autocast = bf16_errors(embedding, hidden)
    assert cast < BF16_TOLERANCE and autocast < BF16_TOLERANCE, (cast, autocast)


def test_tiny_beats_bf16_matches_float32():
    """The tiny BEATs of the model tests (32 channels, 4 groups, kernel 8) end to end."""
    torch.manual_seed(0)
    model = BeatsModel(tiny_config().audio_config)
    fbank = torch.randn(2, 160, 128, generator=torch.Generator().manual_seed(0)) * 4 + 15
    cast, autocast = bf16_errors(model, fbank)
    assert cast < 2 * BF16_TOLERANCE and autocast < 2 * BF16_TOLERANCE, (cast, autocast)


def test_tiny_stc_connector_bf16_matches_float32():
    config = tiny_config()
    torch.manual_seed(0)
    features = torch.randn(2, TINY_NUM_FRAMES, 16, config.vision_config.hidden_size)
    cast, autocast = bf16_errors(MultimoodSTCConnector(config), features)
    assert cast < BF16_TOLERANCE and autocast < BF16_TOLERANCE, (cast, autocast)


@pytest.mark.parametrize("compressor", ["mamba2", "mamba"])
def test_tiny_model_features_bf16_match_float32(compressor: str):
    """Video, audio and history features of the whole tiny model (all its convolutions) in bf16."""
    model = sensitive_model(compressor=compressor)
    batch = multimodal_batch(model.config, [{"text": 6, "video": True, "audio": True, "history": 3}])
    for name, args in (
        ("get_video_features", (batch["pixel_values_videos"],)),
        ("get_audio_features", (batch["input_features"],)),
        ("get_history_features", (batch["history_input_ids"], batch["history_attention_mask"])),
    ):
        cast, autocast = bf16_errors(_Method(model.float(), name), *args)
        assert cast < 3 * BF16_TOLERANCE and autocast < 3 * BF16_TOLERANCE, (name, cast, autocast)


class _Method(nn.Module):
    """One feature method of the model as a module (so that `bf16_errors` can cast and copy it)."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *args):
        return getattr(self.model, self.name)(*args)


def _published_convs() -> dict[tuple, str]:
    """Every distinct convolution shape of the published model (built on the meta device), but BEATs'
    positional conv, which the model runs in float32 on the CPU (tested above through its module)."""
    with torch.device("meta"):
        model = MultimoodForConditionalGeneration(MultimoodConfig())
    convs = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not name.endswith("pos_conv.0"):
            key = (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size,
                   module.stride, module.padding, module.groups)
            convs.setdefault(key, name)
    return convs


PUBLISHED_CONVS = _published_convs()


@pytest.mark.parametrize("shape", list(PUBLISHED_CONVS), ids=list(PUBLISHED_CONVS.values()))
def test_published_conv_shapes_bf16_match_float32(shape):
    """The RegStage depthwise 3x3 and 1x1 convs, the STC sampler, the patch embeddings and Mamba's depthwise
    causal conv at their published sizes: the raw oneDNN kernels are right in bf16 for these shapes."""
    kind, in_channels, out_channels, kernel, stride, padding, groups = shape
    conv_class = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}[kind]
    torch.manual_seed(0)
    conv = conv_class(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups)
    size = [max(2 * k, 13) for k in kernel] if kind != "Conv3d" else [4, 6, 6]
    if kind == "Conv1d":
        size = [max(2 * kernel[0], 200)]
    x = torch.randn(1, in_channels, *size)
    cast, autocast = bf16_errors(conv, x)
    assert cast < BF16_TOLERANCE and autocast < BF16_TOLERANCE, (cast, autocast)
