"""`multimood quickstart`: train a tiny MultiMood end to end on a fresh machine, with no downloads.

1. writes a handful of short clips (a drawn face that nods and talks, with a voice-like tone track;
   one clip has no audio track) with PyAV into `DIR_data/videos`,
2. copies the sample dialogues shipped with the package (`multimood/sample_data/`: 161 training turns in
   `dialogues.jsonl`, 32 turns of other dialogues in `heldout.jsonl`; made by `write_dialogues.py`),
3. trains a small byte-level BPE tokenizer on the training turns with `tokenizers` (Qwen2-style specials),
   unless `--tokenizer PATH` names a real one,
4. builds a tiny random MultiMood (every block of the published architecture, about 0.3M parameters;
   4 frames of 56 px) and trains it 300 steps of 4 turns with the real `Trainer` (about 2 minutes on 2
   idle cores; the 60 steps of earlier versions only learned the label priors),
5. saves the complete model folder as `DIR`, reloads it with `AutoModelForCausalLM` / `AutoProcessor`
   (`trust_remote_code=True`), answers the held-out turns with the pipeline and prints a few of them
   (gold and predicted labels with probabilities, responses) and each label's accuracy next to the
   majority-label baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import av
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from ..checkpoints.model_folder import is_multimood_folder
from ..model.pipeline_multimood import EmotionalSupportPipeline
from ..model.processing_multimood import DEFAULT_SYSTEM_PROMPT
from ..model.records import LABEL_FIELDS, LABEL_SETS
from . import train as multimood_train

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_FILE, HELDOUT_FILE = "dialogues.jsonl", "heldout.jsonl"  # in multimood/sample_data (write_dialogues.py)

# (file name, seconds, hue, has audio, pitch Hz)
SAMPLE_CLIPS = [
    ("clip_a.mp4", 2.0, (220, 180, 150), True, 140.0),
    ("clip_b.mp4", 2.5, (200, 160, 130), True, 210.0),
    ("clip_c.mp4", 1.5, (180, 140, 120), False, 0.0),
    ("clip_d.mp4", 2.0, (235, 200, 170), True, 110.0),
    ("clip_e.mp4", 3.0, (190, 150, 110), True, 180.0),
]


DEFAULT_STEPS, DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATE = 300, 4, 5e-3


def tiny_model_config(vocab_size: int, num_frames: int = 4, image_size: int = 56, text_hidden_size: int = 64,
                      text_layers: int = 2) -> dict:
    """`--model_config` of a tiny random model (the architecture of tests/model_utils.py): MultimoodConfig kwargs
    plus the processor's audio windows and frames, which training routes to the processor."""
    return {
        "text_config": {
            "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": text_hidden_size,
            "intermediate_size": 2 * text_hidden_size, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": True,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": image_size, "patch_size": 14, "vision_use_head": False,
        },
        "audio_config": {
            "embed_dim": 16, "encoder_embed_dim": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
            "encoder_ffn_embed_dim": 64, "conv_pos": 8, "conv_pos_groups": 4, "num_buckets": 32, "max_distance": 64,
        },
        "compressor_config": {
            "model_type": "mamba2", "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
            "expand": 2, "num_heads": 4, "head_dim": 16, "n_groups": 1, "state_size": 16, "chunk_size": 32,
        },
        "connector_depth": 1,
        "audio_num_windows": 2,  # 2 windows of 2 s padded to 4 s: 24 x 8 audio tokens instead of 187 x 8
        "audio_max_seconds": 4.0,
        "num_frames": num_frames,
        "image_size": image_size,
    }


# ----------------------------------------------------------------------------------------------
# Sample media
# ----------------------------------------------------------------------------------------------


def _face_frame(t: float, width: int, height: int, skin: tuple[int, int, int], talking: float) -> np.ndarray:
    """An RGB frame: a face (head, eyes, blinking, a mouth that opens with the voice) that sways."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.empty((height, width, 3), np.uint8)
    frame[...] = (40 + 20 * math.sin(t), 60, 90)
    cx = width / 2 + width * 0.08 * math.sin(2 * math.pi * 0.7 * t)
    cy = height / 2 + height * 0.04 * math.sin(2 * math.pi * 1.1 * t)
    rx, ry = width * 0.3, height * 0.38
    head = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    frame[head] = skin
    blink = 0.15 if (t % 1.7) < 0.12 else 1.0
    for side in (-1, 1):
        ex, ey = cx + side * rx * 0.4, cy - ry * 0.25
        eye = ((xx - ex) / (rx * 0.13)) ** 2 + ((yy - ey) / (ry * 0.09 * blink)) ** 2 <= 1
        frame[eye] = (30, 30, 40)
    mouth_open = 0.03 + 0.12 * talking
    mouth = ((xx - cx) / (rx * 0.35)) ** 2 + ((yy - (cy + ry * 0.45)) / (ry * mouth_open)) ** 2 <= 1
    frame[mouth] = (120, 30, 40)
    return frame


def _voice(seconds: float, rate: int, pitch: float, seed: int) -> np.ndarray:
    """A voice-like signal: a harmonic tone with vibrato, gated into syllables, plus a little breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.05 * np.sin(2 * np.pi * 5 * t) + 0.08 * np.sin(2 * np.pi * 0.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * 3.2 * t + rng.uniform(0, 6)) * 1.5, 0, 1)
    signal = 0.25 * tone * syllables + 0.01 * rng.standard_normal(t.shape)
    return signal.astype(np.float32)


def write_clip(path: Path, seconds: float, skin=(220, 180, 150), audio: bool = True, pitch: float = 150.0,
               size: int = 64, fps: int = 12, sample_rate: int = 16000, seed: int = 0) -> Path:
    """Write one talking-face clip (H.264 video, AAC mono audio unless `audio=False`) with PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    voice = _voice(seconds, sample_rate, pitch, seed) if audio else None
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(fps), "preset": "ultrafast"}
        audio_stream = None
        if audio:
            audio_stream = container.add_stream("aac", rate=sample_rate)
            audio_stream.layout = "mono"
        for i in range(int(seconds * fps)):
            t = i / fps
            talking = 0.0
            if voice is not None:
                window = voice[int(t * sample_rate): int((t + 1 / fps) * sample_rate)]
                talking = float(min(1.0, np.abs(window).mean() * 8)) if window.size else 0.0
            frame = av.VideoFrame.from_ndarray(_face_frame(t, size, size, skin, talking), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            chunk = 1024
            samples = voice
            for start in range(0, len(samples), chunk):
                piece = samples[start: start + chunk][None, :]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="flt", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                for packet in audio_stream.encode(frame):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
    return path


def write_sample_data(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write the sample clips and dialogues (training turns, and `heldout.jsonl` beside them);
    returns (training records file, video folder)."""
    data_dir = Path(data_dir)
    video_dir = data_dir / "videos"
    for seed, (name, seconds, skin, audio, pitch) in enumerate(SAMPLE_CLIPS):
        write_clip(video_dir / name, seconds, skin, audio, pitch or 150.0, seed=seed)
    for name in (TRAIN_FILE, HELDOUT_FILE):
        source = resources.files("multimood").joinpath(f"sample_data/{name}")
        (data_dir / name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return data_dir / TRAIN_FILE, video_dir


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _tokenizer_corpus(records: list[dict]) -> list[str]:
    labels = [" ".join(LABEL_SETS["mesc"]["emotion_labels"]), " ".join(LABEL_SETS["mesc"]["strategy_labels"])]
    texts = [
        DEFAULT_SYSTEM_PROMPT,
        *labels,
        "Problem type: Situation: Client's video and voice: Earlier conversation (memory):",
        "Client emotion: Therapist emotion: Strategy: Response: Client: Therapist:",
        "Answer in exactly four lines: one of the labels, the therapist's reply.",
    ]
    for record in records:
        for value in record.values():
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                for item in value:
                    texts.append(item["content"] if isinstance(item, dict) else str(item))
    return texts


def train_tokenizer(records: list[dict], output_dir: str | os.PathLike, vocab_size: int = 1200):
    """A small byte-level BPE tokenizer (Qwen2-style specials) trained on the sample dialogues."""
    corpus = _tokenizer_corpus(records)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(output_dir))  # vocab.json + merges.txt
    vocab = json.loads((output_dir / "vocab.json").read_text())
    added = {}
    for token in SPECIAL_TOKENS:
        added[str(len(vocab) + len(added))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    (output_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "errors": "replace", "model_max_length": 32768,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "added_tokens_decoder": added,
    }, indent=2))
    return AutoTokenizer.from_pretrained(str(output_dir))


# ----------------------------------------------------------------------------------------------
# The quickstart
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimood quickstart", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output_dir",
        default="outputs/quickstart",
        help="model folder to write (replaced if it holds an earlier model)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="use this tokenizer (e.g. a Qwen2 folder) instead of training one"
    )
    parser.add_argument("--max_steps", type=int, default=DEFAULT_STEPS, help="training steps (tests use a few)")
    parser.add_argument("--learning_rate", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--num_frames", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=56)
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="where the sample data goes (default DIR_data beside DIR)")
    return parser


def gold_answer(processor, record: dict) -> dict[str, str | None]:
    """The record's labels and response, spelled as the model answers them."""
    return processor.parse_output(processor.format_target(record))


def heldout_report(answers: list[dict], golds: list[dict], train_golds: list[dict]) -> dict[str, dict[str, float]]:
    """Per label field: accuracy of `answers` on the held-out turns, and of always answering the training
    data's most frequent label (the majority-label baseline)."""
    report = {}
    for field in LABEL_FIELDS:
        majority = Counter(g[field] for g in train_golds).most_common(1)[0][0]
        report[field] = {
            "accuracy": sum(a[field] == g[field] for a, g in zip(answers, golds)) / len(golds),
            "majority_baseline": sum(g[field] == majority for g in golds) / len(golds),
            "majority_label": majority,
        }
    return report


def example_rows(golds: list[dict], count: int = 6) -> list[int]:
    """Indices of up to `count` held-out turns with different gold client emotions (first of each, in order)."""
    rows, seen = [], set()
    for i, gold in enumerate(golds):
        if gold["client_emotion"] not in seen:
            rows.append(i)
            seen.add(gold["client_emotion"])
    return rows[:count]


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(records: list[dict], answers: list[dict], golds: list[dict], rows: list[int]) -> str:
    """A plain-text table: client words, gold -> predicted labels (with the predicted label's probability)."""
    lines = []
    for i in rows:
        answer, gold = answers[i], golds[i]
        scores = answer.get("label_scores", {})
        lines.append(f"client: {_cut(' '.join(records[i]['utt_user_most_recent']), 96)}")
        for field, name in (("client_emotion", "client emotion"), ("therapist_emotion", "therapist emotion"),
                            ("strategy", "strategy")):
            probability = scores.get(field, {}).get(answer[field])
            mark = "ok" if answer[field] == gold[field] else "--"
            shown = f"{answer[field]} ({probability:.2f})" if probability is not None else str(answer[field])
            lines.append(f"  {mark} {name:<17} gold {gold[field]:<22} predicted {shown}")
        lines.append(f"     response          gold {_cut(gold['response'], 70)}")
        lines.append(f"                       predicted {_cut(answer['response'] or '', 70)}")
    return "\n".join(lines)


def _prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, Path, str]:
    """(model folder, data folder, training records, video folder, tokenizer): the sample data written, an earlier
    quickstart model replaced, a tokenizer trained unless `--tokenizer` names one."""
    output_dir = Path(args.output_dir).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else output_dir.with_name(output_dir.name + "_data")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not is_multimood_folder(str(output_dir)):
            raise SystemExit(f"{output_dir} exists and is not a multimood model folder: choose another --output_dir")
        shutil.rmtree(output_dir)  # an earlier quickstart's model: replace it
    print(f"[quickstart] writing sample clips and dialogues to {data_dir}", flush=True)
    records_path, video_dir = write_sample_data(data_dir)
    tokenizer_path = args.tokenizer
    if not tokenizer_path:
        tokenizer_path = str(data_dir / "tokenizer")
        tokenizer = train_tokenizer(list(multimood_train.load_records(records_path)), tokenizer_path)
        print(f"[quickstart] trained a byte-level BPE tokenizer ({len(tokenizer)} tokens)", flush=True)
    return output_dir, data_dir, records_path, video_dir, tokenizer_path


def train_argv(args: argparse.Namespace, tokenizer_path: str, records_path: Path, video_dir: Path,
               output_dir: Path) -> list[str]:
    """The `multimood train` flags of the tiny model."""
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_path)) + 4  # + <video> <audio> <history> <MEM>
    vocab_size = -(-vocab_size // 8) * 8
    model_config = tiny_model_config(vocab_size, args.num_frames, args.image_size)
    return [
        "--model_config", json.dumps(model_config),
        "--tokenizer_path", tokenizer_path,
        "--data_path", str(records_path),
        "--vid_folder", str(video_dir),
        "--num_frames", str(args.num_frames),
        "--image_size", str(args.image_size),
        "--num_k_vid", "2",
        "--k_turn_history", "2",
        "--output_dir", str(output_dir),
        "--max_steps", str(args.max_steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--warmup_ratio", "0.05",
        "--lr_scheduler_type", "cosine",
        "--weight_decay", "0.0",
        "--logging_steps", str(max(1, args.max_steps // 10)),
        "--save_strategy", "no",
        "--report_to", "none",
        "--model_max_length", "4096",  # the position range: long real records (MESC) still fit at inference
        "--seed", str(args.seed),
        "--dataloader_num_workers", "0",
        "--disable_tqdm", "True",
    ]


def _print_heldout(heldout: list[dict], answers: list[dict], golds: list[dict], rows: list[int], report: dict) -> None:
    dialogues = len({r["Dialogue_ID"] for r in heldout})
    print("[quickstart] predictions on held-out turns (dialogues not seen in training; ok = matches gold):", flush=True)
    print(format_table(heldout, answers, golds, rows))
    print(f"[quickstart] accuracy on the {len(heldout)} held-out turns of {dialogues} dialogues "
          "(majority-label baseline in brackets):")
    for field, item in report.items():
        print(
            f"  {field:<18} {item['accuracy']:.2f}   "
            f"(always {item['majority_label']!r}: {item['majority_baseline']:.2f})"
        )


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start = time.time()
    output_dir, data_dir, records_path, video_dir, tokenizer_path = _prepare(args)
    records = list(multimood_train.load_records(records_path))
    heldout = list(multimood_train.load_records(records_path.with_name(HELDOUT_FILE)))
    print(f"[quickstart] training a tiny MultiMood on {len(records)} turns for {args.max_steps} steps "
          f"of {args.batch_size}", flush=True)
    trainer, result = multimood_train.main(train_argv(args, tokenizer_path, records_path, video_dir, output_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer
    if (output_dir / "checkpoints").exists():
        shutil.rmtree(output_dir / "checkpoints")
    if losses:
        print(f"[quickstart] loss {losses[0]:.2f} -> {losses[-1]:.2f} in {result.metrics['train_runtime']:.0f} s",
              flush=True)

    print(f"[quickstart] reloading {output_dir} with AutoModelForCausalLM / AutoProcessor", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(output_dir), trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(str(output_dir), trust_remote_code=True)
    # The pipeline constrains the three label lines to the label sets, as `multimood predict` does.
    support = EmotionalSupportPipeline(model=model.eval(), processor=processor, device="cpu")
    answers = support(heldout, video_folder=str(video_dir), batch_size=8, max_new_tokens=48, return_label_scores=True)
    golds = [gold_answer(processor, r) for r in heldout]
    report = heldout_report(answers, golds, [gold_answer(processor, r) for r in records])
    rows = example_rows(golds)
    _print_heldout(heldout, answers, golds, rows, report)
    wall = time.time() - start
    print(f"[quickstart] done in {wall:.0f} s: model folder {output_dir}, sample data {data_dir}", flush=True)
    return {
        "output_dir": str(output_dir),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_runtime_s": round(result.metrics.get("train_runtime", float("nan")), 1),
        "wall_time_s": round(wall, 1),
        "heldout_accuracy": report,
        "examples": [{"client": " ".join(heldout[i]["utt_user_most_recent"]), "gold": golds[i],
                      "prediction": {k: answers[i][k] for k in (*LABEL_FIELDS, "response")},
                      "label_scores": answers[i].get("label_scores")} for i in rows],
        "prediction": {k: answers[0][k] for k in (*LABEL_FIELDS, "response")},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
