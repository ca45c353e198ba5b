"""The GPU path in one command: CUDA model tests, a timed training step of the published-size model,
and batched generation throughput. Run it as `bash bench/gpu_check.sh` (see BENCHMARKS.md).

1. `pytest -m gpu tests/test_gpu.py`: bf16 training step against float32, SDPA against eager,
   `flash_attention_2` and the mamba-ssm kernels against the pure-torch path (each skipped with its
   reason where CUDA or the package is missing).
2. One timed training step of `MultimoodConfig()` (the published 2.6B model, random weights, nothing
   downloaded): float32 master weights, bf16 autocast, activation checkpointing, AdamW, towers frozen as
   in the published recipe; per sample 16 frames of 384 px, 30 s of audio (2998 x 128 fbank), a
   `--text_tokens` prompt and 8 history utterances. Reports tokens/s, peak memory and the model FLOPs
   utilisation (MFU) against the GPU's dense bf16 peak.
3. Greedy generation of `--new_tokens` tokens at batch 1 and 8 in bf16 on the same inputs.

Prints one summary table and writes it with every figure to `--json`. Without CUDA it runs the test
collection (every CUDA test skips with its reason), skips 2 and 3 and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from multimood import MultimoodConfig, MultimoodForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s, matched in order
# against `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)
PAD_TOKEN_ID = 151643  # <|endoftext|> of the Qwen2 vocabulary
HISTORY_UTTERANCES, HISTORY_UTTERANCE_TOKENS = 8, 32
TARGET_TOKENS = 128  # labelled tokens at the end of each sample (the four-line answer)


@dataclass
class Row:
    """One line of the summary: which part, what was run, how it went, and its figures."""

    part: str
    name: str
    status: str  # passed, failed, skipped, ok, error
    detail: str = ""
    figures: dict = field(default_factory=dict)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ----------------------------------------------------------------------------------------------
# 1. The CUDA tests
# ----------------------------------------------------------------------------------------------


def run_cuda_tests(junit_path: Path, timeout: int) -> list[Row]:
    """Run `pytest -m gpu tests/test_gpu.py` in a subprocess and read each test's outcome from its JUnit XML."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={junit_path}", str(REPO_ROOT / "tests" / "test_gpu.py")]
    print("[gpu_check] " + " ".join(command), flush=True)
    # The summary reports each skip as a row, so the test suite's CI strict mode (skips fail) is off here.
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MULTIMOOD_TEST_STRICT")}
    try:
        proc = subprocess.run(command, cwd=str(REPO_ROOT), env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [Row("tests", "tests/test_gpu.py", "error", f"timed out after {timeout} s")]
    if not junit_path.is_file():
        return [Row("tests", "tests/test_gpu.py", "error", f"pytest exited {proc.returncode} without a report")]
    rows = []
    for case in ElementTree.parse(junit_path).getroot().iter("testcase"):
        name = case.get("name", "?")
        status, detail = "passed", f"{float(case.get('time', 0)):.1f} s"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else tag
        rows.append(Row("tests", name, status, detail))
    if not rows:
        rows.append(Row("tests", "tests/test_gpu.py", "error", f"pytest exited {proc.returncode}, no test ran"))
    return rows


# ----------------------------------------------------------------------------------------------
# Inputs of the real shapes
# ----------------------------------------------------------------------------------------------


# The published media (the processor's defaults): 16 frames per clip, audio padded to 30 s.
NUM_FRAMES, AUDIO_SECONDS = 16, 30.0
SAMPLING_RATE, FRAME_LENGTH, HOP_LENGTH = 16000, 400, 160  # the Kaldi filterbank: 25 ms windows every 10 ms


def real_shaped_batch(config, batch_size: int, text_tokens: int, device: torch.device | str = "cpu",
                      seed: int = 0, with_labels: bool = True, num_frames: int = NUM_FRAMES,
                      audio_seconds: float = AUDIO_SECONDS) -> dict[str, torch.Tensor]:
    """Random inputs shaped like one training batch of real records for `config`.

    Per sample: `num_frames` frames of the vision tower's image size (one video), the audio padded to
    `audio_seconds` (its filterbank x 128), 8 history utterances of 32 tokens each ending with
    `<MEM>`, and `text_tokens` text tokens around the placeholders; with labels, the last 128 text
    tokens are the target. Every sample has the same length, so no padding is needed.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    video_tokens = config.num_video_tokens(num_frames)
    audio_frames = 1 + (int(audio_seconds * SAMPLING_RATE) - FRAME_LENGTH) // HOP_LENGTH
    audio_tokens = config.num_audio_tokens(audio_frames)
    media = ([config.video_token_id] * video_tokens + [config.audio_token_id] * audio_tokens
             + [config.history_token_id] * HISTORY_UTTERANCES)
    rows, histories = [], []
    for _ in range(batch_size):
        text = torch.randint(0, PAD_TOKEN_ID, (text_tokens,), generator=generator)
        half = text_tokens // 2
        rows.append(torch.cat([text[:half], torch.tensor(media), text[half:]]))
        history = torch.randint(0, PAD_TOKEN_ID, (HISTORY_UTTERANCES, HISTORY_UTTERANCE_TOKENS), generator=generator)
        history[:, -1] = config.mem_token_id
        histories.append(history.flatten())
    input_ids = torch.stack(rows)
    size = config.vision_config.image_size
    mel_bins = config.audio_config.num_mel_bins
    history_tokens = HISTORY_UTTERANCES * HISTORY_UTTERANCE_TOKENS
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(batch_size, num_frames, 3, size, size, generator=generator),
        "input_features": torch.randn(batch_size, audio_frames, mel_bins, generator=generator) * 4 + 10,
        "history_input_ids": torch.stack(histories),
        "history_attention_mask": torch.ones(batch_size, history_tokens, dtype=torch.long),
    }
    if with_labels:
        labels = torch.full_like(input_ids, -100)
        labels[:, -TARGET_TOKENS:] = input_ids[:, -TARGET_TOKENS:]
        batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# 2. Training step
# ----------------------------------------------------------------------------------------------


def count_flops(step) -> int:
    """FLOPs of the matrix products, convolutions and attention that `step()` runs (forward and backward),
    counted by `torch.utils.flop_counter.FlopCounterMode`; elementwise work is not counted."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _memory_text(gib: float | None) -> str:
    return f", peak {gib:.1f} GiB" if gib is not None else ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_published_model(device: torch.device, seed: int = 0):
    """`MultimoodConfig()` with random weights, built directly on `device` in float32."""
    config = MultimoodConfig()
    config.text_config.pad_token_id = PAD_TOKEN_ID
    torch.manual_seed(seed)
    with torch.device(device):
        model = MultimoodForConditionalGeneration(config)
    return model


def llm_6nt_flops(model, tokens: int) -> int:
    """The usual `6 * N * T` estimate for the language model alone (N: its parameters, the tied LM head counted
    once as a matrix product, the embedding lookup not), for comparison with the counted figure."""
    llm = model.model.language_model
    n = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    n += model.lm_head.weight.numel()
    return 6 * n * tokens


def training_benchmark(model, args, device: torch.device) -> Row:
    """Count one sample's training FLOPs (no checkpointing: model FLOPs, no recompute), then time
    `args.steps` steps of the batch with activation checkpointing after one warm-up step."""
    config = model.config
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    one = real_shaped_batch(config, 1, args.text_tokens, device, **media_shape(args))

    def one_step():
        with _autocast(device):
            loss = model(**one).loss
        loss.backward()

    flops_per_sample = count_flops(one_step)
    model.zero_grad(set_to_none=True)

    batch = real_shaped_batch(config, args.batch_size, args.text_tokens, device, seed=1, **media_shape(args))
    tokens = batch["input_ids"].numel()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    def step():
        with _autocast(device):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up: optimizer states, kernel selection
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = flops_per_sample * args.batch_size
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak = args.peak_tflops or peak
    figures = {
        "batch_size": args.batch_size,
        "sequence_tokens": batch["input_ids"].shape[1],
        "text_tokens": args.text_tokens,
        "step_seconds": seconds,
        "step_seconds_all": times,
        "tokens_per_second": tokens / seconds,
        "samples_per_second": args.batch_size / seconds,
        "model_tflop_per_step": flops / 1e12,
        "llm_6nt_tflop_per_step": llm_6nt_flops(model, tokens) / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": flops / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gib": _peak_memory(device),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": float(loss.detach()),
    }
    model.activation_checkpointing_disable()
    model.zero_grad(set_to_none=True)  # the optimizer's states go with this function's frame
    mfu = f", MFU {figures['mfu']:.1%} of {peak:g} TFLOP/s" if peak else " (peak unknown: pass --peak_tflops for MFU)"
    detail = (f"{seconds:.2f} s/step, {figures['tokens_per_second']:,.0f} tokens/s, "
              f"{figures['achieved_tflops']:.0f} TFLOP/s{mfu}{_memory_text(figures['peak_memory_gib'])}")
    name = f"MultimoodConfig() bf16 step, batch {args.batch_size} x {figures['sequence_tokens']} tokens"
    return Row("train", name, "ok", detail, figures)


# ----------------------------------------------------------------------------------------------
# 3. Generation
# ----------------------------------------------------------------------------------------------


def generation_benchmark(model, batch_size: int, args, device: torch.device) -> Row:
    """Greedy generation of exactly `args.new_tokens` tokens (bf16 weights, KV cache): the prefill is timed
    as a 1-token generation, decoding as the rest."""
    inputs = real_shaped_batch(model.config, batch_size, args.text_tokens, device, seed=2, with_labels=False,
                               **media_shape(args))
    kwargs = {"do_sample": False, "pad_token_id": PAD_TOKEN_ID}

    def timed(new_tokens: int) -> tuple[float, torch.Tensor]:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _sync(device)
        return time.perf_counter() - start, out

    timed(2)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, _ = timed(1)
    total, out = timed(args.new_tokens)
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    decode = max(total - prefill, 1e-9)
    figures = {
        "batch_size": batch_size,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "new_tokens": generated,
        "prefill_seconds": prefill,
        "total_seconds": total,
        "decode_tokens_per_second": batch_size * (generated - 1) / decode,
        "new_tokens_per_second": batch_size * generated / total,
        "peak_memory_gib": _peak_memory(device),
    }
    detail = (f"prefill {prefill:.2f} s, decode {figures['decode_tokens_per_second']:,.0f} tokens/s, "
              f"{figures['new_tokens_per_second']:,.0f} new tokens/s end to end"
              f"{_memory_text(figures['peak_memory_gib'])}")
    name = f"batch {batch_size}, {figures['prompt_tokens']} prompt + {generated} new tokens"
    return Row("generate", name, "ok", detail, figures)


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def format_summary(rows: list[Row]) -> str:
    widths = [max(len(getattr(r, name)) for r in rows) for name in ("part", "name", "status")]
    widths = [max(w, len(h)) for w, h in zip(widths, ("part", "check", "status"))]
    lines = [f"{'part':<{widths[0]}}  {'check':<{widths[1]}}  {'status':<{widths[2]}}  result"]
    lines.append("-" * (sum(widths) + 6 + 6))
    for r in rows:
        lines.append(f"{r.part:<{widths[0]}}  {r.name:<{widths[1]}}  {r.status:<{widths[2]}}  {r.detail}")
    return "\n".join(lines)


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device": None}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    for package in ("flash_attn", "mamba_ssm", "causal_conv1d"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "installed")
        except Exception as error:  # noqa: BLE001 - a broken build raises anything; report it
            info[package] = f"not importable ({type(error).__name__})"
    return info


def media_shape(args: argparse.Namespace) -> dict:
    return {"num_frames": args.num_frames, "audio_seconds": args.audio_seconds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", help="where the summary goes")
    parser.add_argument("--batch_size", type=int, default=2, help="training batch (the published recipe: 8 per GPU)")
    parser.add_argument("--text_tokens", type=int, default=2048,
                        help="text tokens per sample, media tokens come on top")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--new_tokens", type=int, default=128, help="generated tokens per sample")
    parser.add_argument("--num_frames", type=int, default=NUM_FRAMES, help="frames per clip (published: 16)")
    parser.add_argument("--audio_seconds", type=float, default=AUDIO_SECONDS, help="padded audio (published: 30)")
    parser.add_argument("--generation_batches", default="1,8", help="comma-separated batch sizes for generation")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU when not in the table")
    parser.add_argument("--skip_tests", action="store_true", help="skip part 1 (the pytest run)")
    parser.add_argument("--tests_timeout", type=int, default=300)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    info = environment()
    print(f"[gpu_check] {json.dumps(info)}", flush=True)
    rows: list[Row] = []
    json_path = Path(args.json).resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if args.skip_tests:
        rows.append(Row("tests", "tests/test_gpu.py -m gpu", "skipped", "--skip_tests"))
    else:
        rows += run_cuda_tests(json_path.with_suffix(".junit.xml"), args.tests_timeout)

    batches = [int(b) for b in args.generation_batches.split(",") if b.strip()]
    if not torch.cuda.is_available():
        reason = "CUDA is not available"
        rows.append(Row("train", "MultimoodConfig() bf16 training step", "skipped", reason))
        rows += [Row("generate", f"batch {b}", "skipped", reason) for b in batches]
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # the published recipe trains with --tf32 True
        torch.backends.cudnn.allow_tf32 = True
        print("[gpu_check] building MultimoodConfig() on the GPU (random weights)", flush=True)
        model = None
        try:
            model = build_published_model(device)
            rows.append(training_benchmark(model, args, device))
        except Exception as error:  # noqa: BLE001 - report the failure in the table, keep going
            message = f"{type(error).__name__}: {error}"[:300]
            rows.append(Row("train", "MultimoodConfig() bf16 training step", "error", message))
        if model is not None:
            model.to(torch.bfloat16).eval()
            model.config.use_cache = True
            torch.cuda.empty_cache()
            for b in batches:
                try:
                    rows.append(generation_benchmark(model, b, args, device))
                except Exception as error:  # noqa: BLE001
                    rows.append(Row("generate", f"batch {b}", "error", f"{type(error).__name__}: {error}"[:300]))
                torch.cuda.empty_cache()

    table = format_summary(rows)
    print("\n" + table, flush=True)
    failed = [r for r in rows if r.status in ("failed", "error")]
    summary = {"environment": info, "arguments": vars(args), "wall_seconds": time.time() - started,
               "rows": [asdict(r) for r in rows], "table": table}
    json_path.write_text(json.dumps(summary, indent=2))
    skipped = sum(r.status == "skipped" for r in rows)
    print(f"[gpu_check] {len(rows)} checks, {len(failed)} failed, {skipped} skipped in {time.time() - started:.0f} s; "
          f"wrote {json_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
