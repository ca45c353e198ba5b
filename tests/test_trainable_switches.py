"""The training switches leave exactly the documented parameters trainable (full fine-tuning and LoRA).

Documented table (README, "Training"): --tune_llm -> the Qwen2 decoder and LM head; --tune_mm_projector ->
the video connector; --tune_audio_projector -> the audio projector; --tune_compressor (seed alias:
--freeze_mamba_compressor, inverted) -> the Mamba compressor and its memory projection; --tune_vision_tower /
--tune_audio_tower -> SigLIP / BEATs (off by default). With --lora_enable the LLM's base weights stay frozen
and only LoRA adapters on its attention/MLP projections train; --tune_llm False with LoRA is an error.
"""

from __future__ import annotations

import pytest
import torch

from multimood import MultimoodForConditionalGeneration
from multimood.training import train as mm_train
from multimood.training.assembly import configure_trainable
from tests.model_utils import tiny_config

# Parameter-name prefix of each switch's block (the tied LM head shares the embedding matrix).
BLOCKS = {
    "tune_llm": "model.language_model.",
    "tune_mm_projector": "model.mm_projector.",
    "tune_audio_projector": "model.mm_projector_a.",
    "tune_compressor": "model.mamba_compressor.",
    "tune_vision_tower": "model.vision_tower.",
    "tune_audio_tower": "model.audio_tower.",
}
DEFAULT_ON = {"tune_llm", "tune_mm_projector", "tune_audio_projector", "tune_compressor"}


def block_of(name: str) -> str:
    matches = [switch for switch, prefix in BLOCKS.items() if name.startswith(prefix)]
    assert len(matches) == 1, name
    return matches[0]


@pytest.fixture(scope="module")
def model() -> MultimoodForConditionalGeneration:
    torch.manual_seed(0)
    return MultimoodForConditionalGeneration(tiny_config())


def parsed(tmp_path, *flags: str):
    return mm_train.parse_args(["--output_dir", str(tmp_path), *flags])


SWITCH_CASES = {
    "defaults": ([], DEFAULT_ON),
    **{f"{switch} False": ([f"--{switch}", "False"], DEFAULT_ON - {switch}) for switch in sorted(DEFAULT_ON)},
    **{
        f"{switch} True": ([f"--{switch}", "True"], DEFAULT_ON | {switch})
        for switch in ("tune_vision_tower", "tune_audio_tower")
    },
    "seed aliases": (
        ["--tune_adapter_llm", "False", "--freeze_mamba_compressor", "True"],
        DEFAULT_ON - {"tune_llm", "tune_compressor"},
    ),
    "only the towers": (
        [
            *(x for s in sorted(DEFAULT_ON) for x in (f"--{s}", "False")),
            "--tune_vision_tower",
            "True",
            "--tune_audio_tower",
            "True",
        ],
        {"tune_vision_tower", "tune_audio_tower"},
    ),
}


@pytest.mark.parametrize("case", list(SWITCH_CASES))
def test_full_fine_tuning_switches(model, tmp_path, case):
    flags, expected = SWITCH_CASES[case]
    model_args, _, _ = parsed(tmp_path, *flags)
    configure_trainable(model, model_args)
    trained = {block_of(n) for n, p in model.named_parameters() if p.requires_grad}
    frozen = {block_of(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert trained == expected and not trained & frozen  # whole blocks, nothing else
    assert model.lm_head.weight.requires_grad == ("tune_llm" in expected)
    assert model.config.freeze_vision_tower == ("tune_vision_tower" not in expected)


LORA_CASES = {
    "defaults": ([], DEFAULT_ON - {"tune_llm"}),
    "projectors frozen": (["--tune_mm_projector", "False", "--tune_audio_projector", "False"], {"tune_compressor"}),
    "vision tower tuned": (["--tune_vision_tower", "True"], DEFAULT_ON - {"tune_llm"} | {"tune_vision_tower"}),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_keeps_the_base_frozen(tmp_path, case):
    """Trainable: LoRA A/B of every attention/MLP projection of the LLM, and full trainable copies of the
    switched-on blocks; every base weight of the LLM and every switched-off block frozen."""
    flags, fully_trained = LORA_CASES[case]
    model_args, _, training_args = parsed(tmp_path, "--lora_enable", "True", "--lora_r", "4", *flags)
    torch.manual_seed(0)
    model = MultimoodForConditionalGeneration(tiny_config())
    configure_trainable(model, model_args)
    peft_model = mm_train.apply_lora(model, model_args, training_args)
    lora, copies, other = set(), set(), []
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if ".lora_A." in name or ".lora_B." in name:
            lora.add(name.split(".lora_")[0])
        elif ".modules_to_save." in name:
            copies.add(block_of(name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")))
        else:
            other.append(name)
    assert not other, other[:5]
    layers = model.config.text_config.num_hidden_layers
    expected_lora = {f"base_model.model.model.language_model.layers.{i}.{part}.{proj}"
                     for i in range(layers) for part, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                     for proj in (f"{p}_proj" for p in projs)}
    assert lora == expected_lora
    assert copies == fully_trained


def test_lora_with_the_llm_frozen_is_an_error(tmp_path):
    """--lora_enable trains adapters on the LLM only; with --tune_llm False it would silently train them anyway."""
    args = parsed(tmp_path, "--lora_enable", "True", "--tune_llm", "False", "--data_path", str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="--lora_enable True .* --tune_llm False"):
        mm_train.train(*args)  # before any model is built or data read
