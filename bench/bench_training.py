"""Benchmark: training throughput of the tiny MultiMood config on the real data, and how long each step waits for
data.

The real path end to end: MESC records (`shared/data/records/mesc_val_records.jsonl`), the real clips
(`shared/data/media/video`, 720p H.264 + AAC), the real Qwen2 tokenizer, `multimood.training.train.main` with the HF
`Trainer` and `MultimoodDataCollator` (decoding runs in the DataLoader workers), a tiny random model
(`quickstart.tiny_model_config`). Each setting (frames x size, `dataloader_num_workers`) runs in a fresh process:

- training: `Trainer.get_batch_samples` (the `next()` on the epoch iterator, i.e. the time the step waits for its
  batch) is timed separately from the whole step; the first `--warmup` steps (worker start-up, first decode, lazy
  inits) are left out. Reported: samples/s, seconds per step, seconds per step waiting for data, and that share;
- loader only: the same DataLoader (collator, workers, batch size) iterated with no model, i.e. how many samples/s the
  data path can deliver; `capacity` = loader-only samples/s / training samples/s (> 1: the loader keeps up).

    python bench/bench_training.py [--steps 10] [--warmup 2] [--batch-size 2] [--settings 4x56,16x384]
                                   [--workers 0,2] [--rounds 1] [--data ../shared/data]

The machine is shared: the load average before and after is printed; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from multimood.model.processing_multimood import MultimoodDataCollator  # noqa: E402
from multimood.training import quickstart  # noqa: E402
from multimood.training import train as mm_train  # noqa: E402

TINY_VOCAB = 151680  # the real Qwen2 ids plus the four multimood tokens (tests/model_utils.py)


def _argv(args, frames: int, size: int, workers: int, output_dir: str, records: Path) -> list[str]:
    config = quickstart.tiny_model_config(TINY_VOCAB, num_frames=frames, image_size=size)
    return [
        "--model_config", json.dumps(config),
        "--tokenizer_path", str(args.data / "tokenizer" / "qwen2"),
        "--data_path", str(records),
        "--vid_folder", str(args.data / "media" / "video"),
        "--num_frames", str(frames), "--image_size", str(size),
        "--num_k_vid", str(args.num_k_vid), "--k_turn_history", str(args.k_turn_history),
        "--model_max_length", str(args.max_length),
        "--output_dir", output_dir,
        "--per_device_train_batch_size", str(args.batch_size),
        "--max_steps", str(args.steps), "--save_strategy", "no",
        "--learning_rate", "1e-3", "--logging_steps", "1000", "--report_to", "none",
        "--disable_tqdm", "True", "--seed", "0",
        "--dataloader_num_workers", str(workers),
    ]


def run_one(args, frames: int, size: int, workers: int) -> dict:
    """One setting in this process: the loader alone, then training with the data wait timed."""

    n_records = (args.steps + 2) * args.batch_size
    lines = (args.data / "records" / "mesc_val_records.jsonl").read_text().splitlines()[:n_records]
    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    records = tmp / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    argv = _argv(args, frames, size, workers, str(tmp / "out"), records)

    # Loader only: the processor the training run builds, the same DataLoader settings, no model.
    model_args, data_args, training_args = mm_train.parse_args(argv)
    model, processor = mm_train.build_model_and_processor(model_args, data_args, training_args)
    del model
    dataset = mm_train.make_dataset(str(records))
    collator = MultimoodDataCollator(processor, video_folder=str(args.data / "media" / "video"), with_target=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator, num_workers=workers,
                                         shuffle=False, persistent_workers=False)
    marks = []
    for batch in loader:  # noqa: B007 - the last batch is read after the loop
        marks.append(time.perf_counter())
        if len(marks) == args.steps:
            break
    skip = min(args.warmup, len(marks) - 2)
    loader_sps = (len(marks) - 1 - skip) * args.batch_size / (marks[-1] - marks[skip])
    del loader
    tokens = int(batch["input_ids"].shape[1])

    # Training, with the time spent in next() on the epoch iterator recorded per step.
    waits: list[float] = []
    step_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    class TimedTrainer(mm_train.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(StepEnds())

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            start = time.perf_counter()
            result = super().get_batch_samples(epoch_iterator, num_batches, device)
            waits.append(time.perf_counter() - start)
            return result

    original = mm_train.Trainer
    mm_train.Trainer = TimedTrainer  # `multimood.training.train.train` builds its Trainer through this name
    try:
        start = time.perf_counter()
        trainer, result = mm_train.main(argv)
        total = time.perf_counter() - start
    finally:
        mm_train.Trainer = original
    w = args.warmup
    steps = len(step_ends) - w
    window = step_ends[-1] - step_ends[w - 1] if w > 0 else step_ends[-1] - (step_ends[0] - waits[0])
    wait = sum(waits[w:w + steps])
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "frames": frames, "size": size, "workers": workers, "batch_size": args.batch_size, "steps": steps,
        "samples_per_s": steps * args.batch_size / window, "step_s": window / steps, "wait_s": wait / steps,
        "wait_share": wait / window, "loader_samples_per_s": loader_sps,
        "warmup_wait_s": sum(waits[:w]), "process_total_s": total, "tokens_last_batch": tokens,
        "train_loss": result.training_loss,
        "threads": torch.get_num_threads(),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=10, help="training steps per setting (incl. warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the rates")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--settings", default="4x56,16x384", help="frames x size, comma-separated")
    parser.add_argument("--workers", default="0,2", help="dataloader_num_workers values, comma-separated")
    parser.add_argument("--num-k-vid", type=int, default=5, help="client clips per sample (published: 5)")
    parser.add_argument("--k-turn-history", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024, help="text-token budget (published: 2048)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all settings, interleaved; the median is shown")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per setting")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = args.data.resolve()

    if args.one:
        frames, size, workers = (int(x) for x in args.one.split(","))
        print("RESULT " + json.dumps(run_one(args, frames, size, workers)), flush=True)
        return

    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",") if s]
    workers = [int(w) for w in args.workers.split(",") if w]
    print(f"cpus {os.cpu_count()}, load before {_load()}; batch {args.batch_size}, {args.steps} steps "
          f"({args.warmup} warm-up left out), num_k_vid {args.num_k_vid}, k_turn_history {args.k_turn_history}, "
          f"model_max_length {args.max_length}", flush=True)
    runs: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for frames, size in settings:
            for w in workers:
                cmd = [sys.executable, __file__, "--one", f"{frames},{size},{w}", "--data", str(args.data),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                       "--num-k-vid", str(args.num_k_vid), "--k-turn-history", str(args.k_turn_history),
                       "--max-length", str(args.max_length)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{frames}x{size} workers {w}: over {args.timeout} s, skipped", flush=True)
                    continue
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    print(f"{frames}x{size} workers {w}: failed\n{proc.stderr[-3000:]}", flush=True)
                    continue
                row = json.loads(found[-1][len("RESULT "):])
                runs.setdefault((frames, size, w), []).append(row)
                print(f"  round {round_ + 1}: {frames}x{size} workers {w}: {row['samples_per_s']:.2f} samples/s, "
                      f"data wait {100 * row['wait_share']:.1f}% (process {row['process_total_s']:.0f} s, "
                      f"load {_load()})", flush=True)
    rows = [sorted(r, key=lambda x: x["samples_per_s"])[len(r) // 2] for r in runs.values()]

    header = (f"{'frames x size':>13} {'workers':>7} {'samples/s':>9} {'step s':>7} {'wait s':>7} {'compute s':>9} "
              f"{'wait %':>6} {'loader-only/s':>13} {'capacity':>8} {'tokens':>6}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['frames']:>6}x{r['size']:<6} {r['workers']:>7} {r['samples_per_s']:>9.2f} {r['step_s']:>7.2f} "
              f"{r['wait_s']:>7.3f} {r['step_s'] - r['wait_s']:>9.2f} {100 * r['wait_share']:>5.1f}% "
              f"{r['loader_samples_per_s']:>13.2f} "
              f"{r['loader_samples_per_s'] / r['samples_per_s']:>7.1f}x {r['tokens_last_batch']:>6}")
    print()
    for frames, size in settings:
        by_w = {r["workers"]: r for r in rows if (r["frames"], r["size"]) == (frames, size)}
        if 0 in by_w and len(by_w) > 1:
            for w, r in sorted(by_w.items()):
                if w == 0:
                    continue
                speedup = r["samples_per_s"] / by_w[0]["samples_per_s"]
                print(f"{frames}x{size}: workers {w} vs 0: {speedup:.2f}x samples/s, "
                      f"data wait {100 * by_w[0]['wait_share']:.1f}% -> {100 * r['wait_share']:.1f}% of the step")
    print(f"load after {_load()}")
    print("wait = time in next() on the epoch iterator; compute = step - wait; capacity = loader-only samples/s / "
          "training samples/s. samples/s of different processes move with the machine's load (compute s); the wait "
          "share and the capacity are measured within one process.")


if __name__ == "__main__":
    main()
