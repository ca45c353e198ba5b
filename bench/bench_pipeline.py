"""Benchmark: the "emotional-support" pipeline with one call of batch 8 against 8 single calls.

Both answer the same 8 real MESC records with real clips, end to end (processor: clip decoding, frames,
filterbanks, prompt; then constrained generation; then decoding and parsing), and must give the same
answers. Rounds interleave the two modes so that load from other processes hits both alike; the median
per mode is reported, as samples/s and the ratio batched / single.

The model is a tiny random MultiMood (every block; the real Qwen2 vocabulary of 151,646 tokens; 4 frames of
56 px; 2 audio windows), as in tests/test_pipeline.py, unless `--model DIR` names a saved model folder
(e.g. one made by `multimood quickstart`).

    python bench/bench_pipeline.py [--rounds 5] [--max_new_tokens 64] [--batch_size 8] [--model DIR]
                                   [--data ../shared/data] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import pipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from multimood import MultimoodForConditionalGeneration  # noqa: E402
from multimood.checkpoints.assembly import build_processor, fit_processor_to_model  # noqa: E402
from multimood.model.pipeline_multimood import TASK, EmotionalSupportPipeline, save_pipeline_files  # noqa: E402
from tests.model_utils import TINY_NUM_FRAMES, tiny_config  # noqa: E402


def tiny_model_folder(data: Path, folder: Path) -> Path:
    """The tiny random model of tests/test_pipeline.py with its processor, saved with the pipeline files."""
    torch.manual_seed(0)
    config = tiny_config(initializer_range=0.2)
    config.text_config.initializer_range = 0.2
    model = MultimoodForConditionalGeneration(config).eval()
    media = {"num_frames": TINY_NUM_FRAMES, "audio_num_windows": 2, "audio_max_seconds": 4.0, "num_k_vid": 2}
    processor = build_processor(data / "tokenizer" / "qwen2", media, k_turn_history=2)
    fit_processor_to_model(processor, config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipeline_files(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--model", default=None, help="a saved model folder (default: the tiny random model)")
    parser.add_argument("--records", default=None, help="records JSONL (default: DATA/records/mesc_val_records.jsonl)")
    parser.add_argument("--video_folder", default=None, help="default: DATA/media/video")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-constrained", dest="constrained", action="store_false")
    parser.add_argument("--flush_denormal", action="store_true",
                        help="torch.set_flush_denormal(True): random tiny models can produce denormal floats")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    data = Path(args.data)
    records_file = Path(args.records) if args.records else data / "records" / "mesc_val_records.jsonl"
    video_folder = args.video_folder or str(data / "media" / "video")
    lines = records_file.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()][: args.batch_size]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or str(tiny_model_folder(data, Path(tmp) / "model"))

        pipe = pipeline(TASK, model=folder, trust_remote_code=True, pipeline_class=EmotionalSupportPipeline,
                        device="cpu")
        kwargs = {"video_folder": video_folder, "max_new_tokens": args.max_new_tokens, "constrained": args.constrained}

        def single():
            return [pipe(record, **kwargs) for record in records]

        def batched():
            return pipe(records, batch_size=len(records), **kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = single()  # warm-up of both paths, and the answers to compare with
            assert batched() == reference, "batched answers differ from one-at-a-time answers"
            times = {"single": [], "batched": []}
            pre = {"single": [], "batched": []}  # where the time goes: the processor alone, per mode
            for _ in range(args.rounds):
                for name, run in (("single", single), ("batched", batched)):
                    start = time.perf_counter()
                    answers = run()
                    times[name].append(time.perf_counter() - start)
                    assert answers == reference, f"{name}: answers changed between rounds"
                start = time.perf_counter()
                for record in records:
                    pipe.preprocess([record], video_folder=video_folder)
                pre["single"].append(time.perf_counter() - start)
                start = time.perf_counter()
                pipe.preprocess(records, video_folder=video_folder)
                pre["batched"].append(time.perf_counter() - start)

    n = len(records)
    generated = [len(pipe.tokenizer(a["generated_text"])["input_ids"]) for a in reference]
    median = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    pre_median = {k: statistics.median(v) for k, v in pre.items()}
    print(f"emotional-support pipeline: {n} records, max_new_tokens={args.max_new_tokens} "
          f"(answers of {min(generated)}-{max(generated)} tokens), "
          f"{'constrained' if args.constrained else 'free'} decoding, "
          f"model {args.model or 'tiny random (Qwen2 vocab)'}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, flush denormal {args.flush_denormal}; "
          f"{args.rounds} interleaved rounds")
    print()
    print(f"| mode | median s for {n} | samples/s (median) | samples/s (best round) | processor alone (s, median) |")
    print("|---|---|---|---|---|")
    for name, label in (("single", f"{n} single calls"), ("batched", f"1 call, batch_size={n}")):
        cells = [median[name], n / median[name], n / best[name], pre_median[name]]
        print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print()
    print(f"speed-up batched / single: {median['single'] / median['batched']:.2f}x median, "
          f"{best['single'] / best['batched']:.2f}x best rounds (same answers: yes)")
    print("all rounds (s): " + json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
