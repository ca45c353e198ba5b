"""Tiny random configurations of the real MultiMood architecture and inputs that match them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from multimood import MultimoodConfig, MultimoodForConditionalGeneration

TINY_VOCAB = 151680  # the real Qwen2 ids plus the four multimood special tokens fit below this
TINY_NUM_FRAMES = 4  # frames per clip in the tiny inputs (a processor setting: the config does not hold it)
TINY_IMAGE_SIZE = 56  # the tiny SigLIP's image size


def tiny_config(
    compressor: str | None = "mamba2", projector: str = "stc_connector_v35", **overrides
) -> MultimoodConfig:
    """A MultiMood config with every block of the published model, a few thousand parameters each."""
    compressor_config = None
    if compressor == "mamba2":
        compressor_config = {
            "model_type": "mamba2", "vocab_size": TINY_VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
            "expand": 2, "num_heads": 4, "head_dim": 16, "n_groups": 1, "state_size": 16, "chunk_size": 32,
        }
    elif compressor == "mamba":
        compressor_config = {
            "model_type": "mamba", "vocab_size": TINY_VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
            "state_size": 8, "expand": 2,
        }
    kwargs = dict(
        text_config={
            "model_type": "qwen2", "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
        },
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "image_size": TINY_IMAGE_SIZE, "patch_size": 14, "vision_use_head": False,
        },
        audio_config={
            "embed_dim": 16, "encoder_embed_dim": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
            "encoder_ffn_embed_dim": 64, "conv_pos": 8, "conv_pos_groups": 4, "num_buckets": 32, "max_distance": 64,
        },
        compressor_config=compressor_config,
        mm_projector_type=projector,
        connector_depth=1,
    )
    kwargs.update(overrides)
    return MultimoodConfig(**kwargs)


SENSITIVE_INIT_STD = 0.2


def sensitive_model(seed: int = 0, **overrides) -> MultimoodForConditionalGeneration:
    """A seeded tiny model in eval mode whose generations depend on every input.

    At the default init (std 0.02) a 32-wide Qwen2 with tied embeddings just repeats its last prompt
    token, whatever the video, audio or history: generation tests on it cannot fail. With std 0.2 for the
    LLM, SigLIP and the connectors, changing any one input changes the greedy tokens.
    """
    config = tiny_config(**overrides)
    for sub in (config, config.text_config, config.vision_config):
        sub.initializer_range = SENSITIVE_INIT_STD
    torch.manual_seed(seed)
    return MultimoodForConditionalGeneration(config).eval()


TINY_FBANK_FRAMES = 48  # 3 x 8 patches of 16x16 -> 24 audio tokens


def multimodal_batch(config: MultimoodConfig, layout: list[dict], seed: int = 0, padding_side: str = "right") -> dict:
    """Token ids with placeholders and random media for samples described by `layout`.

    Each entry: {"text": n_text_tokens, "video": bool, "audio": bool, "history": n_mem or 0}.
    """
    generator = torch.Generator().manual_seed(seed)
    video_tokens = config.num_video_tokens(TINY_NUM_FRAMES)
    audio_tokens = config.num_audio_tokens(TINY_FBANK_FRAMES)
    rows, videos, audios, histories = [], [], [], []
    for sample in layout:
        text = torch.randint(0, 151000, (sample["text"],), generator=generator).tolist()
        ids = text[: len(text) // 2]
        if sample.get("video"):
            ids += [config.video_token_id] * video_tokens
            side = config.vision_config.image_size
            videos.append(torch.randn(TINY_NUM_FRAMES, 3, side, side, generator=generator))
        if sample.get("audio"):
            ids += [config.audio_token_id] * audio_tokens
            audios.append(torch.randn(TINY_FBANK_FRAMES, 128, generator=generator) * 4 + 10)
        if sample.get("history"):
            ids += [config.history_token_id] * sample["history"]
            history = []
            for _ in range(sample["history"]):
                history += torch.randint(0, 151000, (3,), generator=generator).tolist() + [config.mem_token_id]
            histories.append(history)
        rows.append(ids + text[len(text) // 2 :])
    pad = config.text_config.pad_token_id
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    if audios:
        batch["input_features"] = torch.stack(audios)
    if histories:
        hist_width = max(len(h) for h in histories)
        batch["history_input_ids"] = torch.full((len(histories), hist_width), pad, dtype=torch.long)
        batch["history_attention_mask"] = torch.zeros((len(histories), hist_width), dtype=torch.long)
        for i, h in enumerate(histories):
            batch["history_input_ids"][i, : len(h)] = torch.tensor(h)
            batch["history_attention_mask"][i, : len(h)] = 1
    return batch


def run_in_clean_process(script: str, *args: Any, cwd: str | os.PathLike) -> Any:
    """Run `script` as someone without multimood would: `python -I` (no PYTHONPATH, no user site), offline, with a
    private modules cache under `cwd`. Fails with the process's stderr; returns the JSON after its last `RESULT `
    line (None when it prints none)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-I", "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(results[-1][len("RESULT "):]) if results else None
