"""`multimood predict`: answer every record of a JSONL file with the "emotional-support" pipeline.

    multimood predict --model DIR --data records.jsonl --video_folder clips/ --output preds.jsonl \\
        [--batch_size 8] [--max_new_tokens 256] [--constrained | --no-constrained] [--limit N] \\
        [--max_length 4096] [--skip_errors] [--device cuda:0] [--dtype bfloat16] [--prompt_style published-eval]

Each output line holds `index` (the record's position in the input), `Dialogue_ID` (when the record
has one), `prediction` (the generated four-line answer), `reference` (the gold answer from the
processor's `format_target` in the answer format of the prompt style, when the record has its targets),
the parsed `client_emotion`, `therapist_emotion`, `strategy`, `response`, and `unknown_labels` when a
label is missing or outside the label sets. The file is what `multimood evaluate` reads. Lines are
written as batches finish. The prompt style is the saved processor's `prompt_style` unless
`--prompt_style` overrides it.

Decoding defaults come from the model folder, so a folder written by `multimood convert` is decoded as the
published evaluation did with no flags:
- `--max_new_tokens`: the folder's `generation_config.json` (a converted published checkpoint holds the published
  2048, greedy), else 256;
- `--constrained`: on for the `multimood` prompt style (the label lines are forced to the label sets), off for the
  published styles (the published evaluation generates freely);
- `--dtype auto`: the checkpoint's dtype; with a published prompt style on a GPU, float16 (the published
  evaluation's dtype). On CPU the checkpoint's dtype is kept: float16 on CPU is slow and less accurate.
Each flag overrides its default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .dataset_builder import iter_records
from .pipeline_multimood import ANSWER_FIELDS, TASK, EmotionalSupportPipeline
from .processing_multimood import PROMPT_STYLES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimood predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved MultiMood model folder (model + processor)")
    parser.add_argument("--data", required=True, help="records: JSONL (one record per line) or a JSON list")
    parser.add_argument("--video_folder", default=None, help="folder the records' clip names are relative to")
    parser.add_argument("--output", required=True, help="predictions JSONL to write")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="default: the model folder's generation_config (2048 for a converted published "
                             "checkpoint), else 256")
    parser.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=None,
                        help="force the label lines to the label sets; default: on for the multimood prompt style, "
                             "off for the published styles (the published evaluation decodes freely)")
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N records")
    parser.add_argument("--max_length", type=int, default=None,
                        help="prompt token budget (default: the saved processor's model_max_length); the oldest "
                             "history is cut first, a record that does not fit without history is an error")
    parser.add_argument("--prompt_style", default=None, choices=PROMPT_STYLES,
                        help="prompt layout (default: the saved processor's prompt_style; a converted published "
                             "checkpoint saves published-eval)")
    parser.add_argument("--device", default=None,
                        help="as in transformers: -1 / cpu / 0 / cuda:1 (default: GPU 0 if any)")
    parser.add_argument("--device_map", default=None, help="as in transformers, e.g. auto")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the checkpoint's dtype; float16 for a published prompt style on a GPU), "
                             "float32, bfloat16, float16")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_errors", action="store_true",
                        help="leave out (and report) records that cannot be processed instead of stopping")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _device(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def load_pipeline(model: str, device=None, device_map=None, dtype="auto") -> EmotionalSupportPipeline:
    """The pipeline of a saved folder (its model and processor code, this package's pipeline class)."""
    from transformers import pipeline  # noqa: PLC0415

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None:
        kwargs["device"] = device
    if device_map is not None:
        kwargs["device_map"] = device_map
    return pipeline(TASK, model=model, trust_remote_code=True, pipeline_class=EmotionalSupportPipeline, **kwargs)


def is_published_style(prompt_style: str) -> bool:
    return prompt_style.startswith("published")


def apply_published_dtype(pipe: EmotionalSupportPipeline, prompt_style: str) -> None:
    """`--dtype auto` with a published prompt style: float16 on a GPU, as the published evaluation; the checkpoint's
    dtype on CPU (float16 there is slow and less accurate)."""
    if is_published_style(prompt_style) and pipe.model.device.type == "cuda" and pipe.model.dtype != torch.float16:
        pipe.model.to(torch.float16)


def reference_of(processor, record: dict, index: int, prompt_style: str | None = None) -> str | None:
    """The gold four-line answer of a record (in the answer format of `prompt_style`, default the
    processor's), or None when it lacks targets."""
    if not all(record.get(k) for k in ("get_emotion_user_most_recent", "Emotion", "Strategy", "Utterance")):
        return None
    try:
        return processor.format_target(record, index=index, **({"prompt_style": prompt_style} if prompt_style else {}))
    except ValueError:
        return None


def output_line(index: int, record: dict, answer: dict, reference: str | None) -> dict:
    line: dict[str, Any] = {"index": index}
    if isinstance(record, dict) and record.get("Dialogue_ID") is not None:
        line["Dialogue_ID"] = record["Dialogue_ID"]
    line["prediction"] = answer["generated_text"]
    if reference is not None:
        line["reference"] = reference
    for field in ANSWER_FIELDS:
        line[field] = answer.get(field)
    if answer.get("unknown_labels"):
        line["unknown_labels"] = answer["unknown_labels"]
    return line


def predict_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be >= 1")
    from tqdm.auto import tqdm  # noqa: PLC0415
    from transformers import set_seed  # noqa: PLC0415

    records = list(iter_records(args.data, require_targets=False))  # validated; targets optional
    if args.limit is not None:
        records = records[: args.limit]
    set_seed(args.seed)
    start = time.time()
    pipe = load_pipeline(args.model, _device(args.device), args.device_map, args.dtype)
    prompt_style = args.prompt_style or getattr(pipe.processor, "prompt_style", None) or "multimood"
    if args.dtype == "auto":
        apply_published_dtype(pipe, prompt_style)
    constrained = not is_published_style(prompt_style) if args.constrained is None else args.constrained
    generate_kwargs: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    if args.do_sample:
        generate_kwargs["do_sample"] = True
    for name in ("temperature", "top_p", "num_beams"):
        if getattr(args, name) is not None:
            generate_kwargs[name] = getattr(args, name)
    call_kwargs = {"video_folder": args.video_folder, "constrained": constrained, **generate_kwargs}
    if args.max_length is not None:
        call_kwargs["processor_kwargs"] = {"max_length": args.max_length}
    if args.prompt_style is not None:
        call_kwargs["prompt_style"] = args.prompt_style

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = unknown = 0
    errors: list[str] = []
    load_time = time.time() - start
    with output.open("w", encoding="utf-8") as handle, tqdm(
        total=len(records), unit="record", desc="predict", disable=args.quiet
    ) as bar:
        for begin in range(0, len(records), args.batch_size):
            chunk = records[begin : begin + args.batch_size]
            indices = list(range(begin, begin + len(chunk)))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*answers have labels.*")
                try:
                    answers = pipe(chunk, batch_size=len(chunk), **call_kwargs)
                    pairs = list(zip(indices, chunk, answers))
                except (ValueError, OSError, RuntimeError):
                    pairs = []
                    for index, record in zip(indices, chunk):  # find the records that fail
                        try:
                            pairs.append((index, record, pipe(record, **call_kwargs)))
                        except (ValueError, OSError, RuntimeError) as single_error:
                            message = f"record {index} of {args.data}: {single_error}"
                            if not args.skip_errors:
                                raise SystemExit(
                                    f"multimood predict: {message}\n(--skip_errors leaves out such records; "
                                    f"{written} predictions were written to {output})"
                                ) from single_error
                            errors.append(message)
            for index, record, answer in pairs:
                line = output_line(index, record, answer, reference_of(pipe.processor, record, index, args.prompt_style))
                unknown += bool(line.get("unknown_labels"))
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            handle.flush()
            bar.update(len(chunk))
    elapsed = time.time() - start - load_time
    summary = (
        f"[predict] wrote {written} predictions to {output} in {elapsed:.1f} s "
        f"({written / max(elapsed, 1e-9):.2f} records/s, batch_size {args.batch_size}, "
        f"{prompt_style} prompts, {'constrained' if constrained else 'free'} decoding, dtype "
        f"{str(pipe.model.dtype).replace('torch.', '')})"
    )
    if unknown:
        summary += f"; {unknown} with labels outside the label sets (see `unknown_labels`)"
    if errors:
        summary += f"; {len(errors)} record(s) skipped"
    print(summary, file=sys.stderr)
    for message in errors:
        print(f"[predict] skipped {message}", file=sys.stderr)
    return 0


main = predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
