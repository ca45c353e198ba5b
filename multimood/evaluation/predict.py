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

Bad input fails before the model loads where it can (flags, the model folder, the records file), with
one line naming the file, line, record and field (docs/errors.md); `--output` may not be the input.
Records whose targets are present must name the model's label sets (they give the `reference`).
`--skip_errors` leaves out records that cannot be read or answered (malformed lines included) and lists
them; `index` stays the record's position in the file.

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
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import pipeline, set_seed

from ..checkpoints.model_folder import ModelFolderError, check_model_folder
from ..cli import run_command
from ..data.record_files import SplitReport, iter_located_records
from ..model.pipeline_multimood import TASK, EmotionalSupportPipeline
from ..model.records import ANSWER_FIELDS, PROMPT_STYLES, TARGET_FIELDS, MultimoodError, MultimoodRecordError


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
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N records of the file")
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


def check_flags(args: argparse.Namespace) -> None:
    """Flag values and files that make no sense, found before anything loads (`MultimoodError`)."""
    at_least_one = ("batch_size", "max_new_tokens", "limit", "max_length", "num_beams")
    for name in at_least_one:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MultimoodError(f"--{name} must be >= 1, got {value}")
    if args.temperature is not None and not args.temperature > 0:
        raise MultimoodError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MultimoodError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not os.path.isfile(args.data):
        problem = "is a folder, expected a records file" if os.path.isdir(args.data) else "no such file"
        raise MultimoodError(f"--data {args.data}: {problem}")
    output = Path(args.output)
    if output.is_dir():
        raise MultimoodError(f"--output {args.output}: is a folder, expected a file name")
    if output.resolve() == Path(args.data).resolve() or (output.exists() and os.path.samefile(output, args.data)):
        raise MultimoodError(f"--output {args.output} is the --data file: predictions would overwrite the records; "
                             "choose another output path")
    if args.video_folder is not None and not os.path.isdir(args.video_folder):
        raise MultimoodError(f"--video_folder {args.video_folder}: no such folder")


def load_pipeline(model: str, device=None, device_map=None, dtype="auto") -> EmotionalSupportPipeline:
    """The pipeline of a saved folder (its model and processor code, this package's pipeline class).

    A damaged folder (missing files, truncated weights) raises `ModelFolderError` naming the file.
    """
    folder = check_model_folder(model)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None:
        kwargs["device"] = device
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return pipeline(TASK, model=model, trust_remote_code=True, pipeline_class=EmotionalSupportPipeline, **kwargs)
    except (OSError, ValueError) as error:
        if folder is None:  # `owner/name` that is neither a local folder nor a reachable Hub repo
            raise ModelFolderError(f"{model}: no such local folder, and as a Hub repo id it could not be loaded "
                                   f"({' '.join(str(error).split()[:40])})") from error
        raise


def is_published_style(prompt_style: str) -> bool:
    return prompt_style.startswith("published")


def apply_published_dtype(pipe: EmotionalSupportPipeline, prompt_style: str) -> None:
    """`--dtype auto` with a published prompt style: float16 on a GPU, as the published evaluation; the checkpoint's
    dtype on CPU (float16 there is slow and less accurate)."""
    if is_published_style(prompt_style) and pipe.model.device.type == "cuda" and pipe.model.dtype != torch.float16:
        pipe.model.to(torch.float16)


def reference_of(processor, record: dict, index: int, prompt_style: str | None = None) -> str | None:
    """The gold four-line answer of a record (its targets checked against the label sets) in the answer
    format of `prompt_style` (default: the processor's), or None when it lacks targets."""
    if not all(record.get(k) is not None for k in TARGET_FIELDS):
        return None
    checked = processor.check_record(record, index, with_target=True)
    return processor.format_target(checked, index=index, prompt_style=prompt_style)


_BATCH_RECORD_NAME = re.compile(r"^(record \d+( \(Dialogue_ID=[^)]*\))?|Dialogue_ID=[^:]*): ")


def _problem(error: Exception) -> str:
    """An error's text without the name of the record in its batch that the processor and the media
    readers put in front (the caller names the record by its file, line and position)."""
    if isinstance(error, MultimoodRecordError):
        return error.problem
    return _BATCH_RECORD_NAME.sub("", " ".join(str(error).split()), count=1)


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


def _where(data: str, index: int, location: str, record: dict) -> str:
    """The name of a record in messages: file, line and position (and Dialogue_ID when it has one)."""
    dialogue = f", Dialogue_ID={record['Dialogue_ID']}" if record.get("Dialogue_ID") is not None else ""
    return f"{data} {location} (record {index}{dialogue})"


def read_records(args: argparse.Namespace) -> tuple[list[tuple[int, str, dict]], list[str]]:
    """((index, location, record) of the records to answer, problems of the lines left out by --skip_errors)."""
    read = SplitReport(files=[args.data])
    located = [
        (index, location, record)
        for index, location, record in iter_located_records(args.data, False, args.skip_errors, read)
        if args.limit is None or index < args.limit
    ]
    return located, list(read.problems)


def gold_references(pipe: EmotionalSupportPipeline, located: list[tuple[int, str, dict]], args: argparse.Namespace,
                    errors: list[str]) -> tuple[dict[int, str | None], list[tuple[int, str, dict]]]:
    """(reference answer per record index, the records kept): the targets must name the model's label sets,
    checked before generating since it is cheap; a record that fails is an error, or left out and listed in
    `errors` with --skip_errors."""
    references: dict[int, str | None] = {}
    kept = []
    for index, location, record in located:
        try:
            references[index] = reference_of(pipe.processor, record, index, args.prompt_style)
        except MultimoodError as error:
            message = f"{_where(args.data, index, location, record)}: {_problem(error)}"
            if not args.skip_errors:
                raise MultimoodError(message + " (--skip_errors leaves out such records)") from None
            errors.append(message)
            continue
        kept.append((index, location, record))
    return references, kept


def pipeline_kwargs(args: argparse.Namespace, constrained: bool) -> dict[str, Any]:
    """The pipeline call's arguments from the flags: only the decoding flags given override the folder's."""
    call_kwargs: dict[str, Any] = {"video_folder": args.video_folder, "constrained": constrained}
    if args.max_new_tokens is not None:
        call_kwargs["max_new_tokens"] = args.max_new_tokens
    if args.do_sample:
        call_kwargs["do_sample"] = True
    for name in ("temperature", "top_p", "num_beams"):
        if getattr(args, name) is not None:
            call_kwargs[name] = getattr(args, name)
    if args.max_length is not None:
        call_kwargs["processor_kwargs"] = {"max_length": args.max_length}
    if args.prompt_style is not None:
        call_kwargs["prompt_style"] = args.prompt_style
    return call_kwargs


def answer_batch(pipe: EmotionalSupportPipeline, chunk: list[tuple[int, str, dict]], call_kwargs: dict[str, Any],
                 args: argparse.Namespace, errors: list[str], written_note: str) -> list[tuple[tuple, dict]]:
    """((index, location, record), answer) for a batch; when the batch fails, its records are answered one by
    one to find the ones that fail (an error naming the record, or left out and listed with --skip_errors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*answers have labels.*")
        try:
            answers = pipe([record for _, _, record in chunk], batch_size=len(chunk), **call_kwargs)
            return list(zip(chunk, answers))
        except (ValueError, OSError, RuntimeError):
            pass
        done = []
        for item in chunk:
            index, location, record = item
            try:
                done.append((item, pipe(record, **call_kwargs)))
            except (ValueError, OSError, RuntimeError) as single_error:
                message = f"{_where(args.data, index, location, record)}: {_problem(single_error)}"
                if not args.skip_errors:
                    raise MultimoodError(
                        f"{message} (--skip_errors leaves out such records; {written_note})"
                    ) from single_error
                errors.append(message)
        return done


def predict_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    check_model_folder(args.model)
    located, errors = read_records(args)

    set_seed(args.seed)
    start = time.time()
    pipe = load_pipeline(args.model, _device(args.device), args.device_map, args.dtype)
    prompt_style = args.prompt_style or getattr(pipe.processor, "prompt_style", None) or "multimood"
    if args.dtype == "auto":
        apply_published_dtype(pipe, prompt_style)
    constrained = not is_published_style(prompt_style) if args.constrained is None else args.constrained
    references, kept = gold_references(pipe, located, args, errors)
    call_kwargs = pipeline_kwargs(args, constrained)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = unknown = 0
    load_time = time.time() - start
    with output.open("w", encoding="utf-8") as handle, tqdm(
        total=len(kept), unit="record", desc="predict", disable=args.quiet
    ) as bar:
        for begin in range(0, len(kept), args.batch_size):
            chunk = kept[begin : begin + args.batch_size]
            written_note = f"{written} predictions were written to {output}"
            for (index, _, record), answer in answer_batch(pipe, chunk, call_kwargs, args, errors, written_note):
                line = output_line(index, record, answer, references[index])
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


def main(argv: list[str] | None = None) -> int:
    """`multimood predict` under the error contract (one line, exit 1; --debug for the traceback)."""
    return run_command("multimood predict", predict_main, argv)


if __name__ == "__main__":
    sys.exit(main())
