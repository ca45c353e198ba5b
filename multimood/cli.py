"""`multimood` console command: one entry point, a subcommand per job, one error contract.

Every command (`multimood ...`, `multimood-data`, the `run_scripts`) runs through `run_command`: a
failure exits non-zero with one line on stderr, `<command>: error: <message>`, the message naming the
file and line (or record and `Dialogue_ID`), the field and what was expected (see docs/errors.md).
The traceback is shown only with `--debug` or `MULTIMOOD_DEBUG=1`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

from .model.records import MultimoodError

DEBUG_ENV = "MULTIMOOD_DEBUG"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# command: (module, function, help line); the module is imported only when its command runs.
COMMANDS = {
    "quickstart": ("multimood.training.quickstart", "main",
                   "generate sample clips and dialogues, train a tiny model, reload it and predict (no downloads)"),
    "train": ("multimood.training.train", "main",
              "supervised fine-tuning (the seed's finetune.sh flags; see `multimood train --help`)"),
    "grpo": ("multimood.training.grpo", "main",
             "GRPO reinforcement fine-tuning of an SFT model (trl; see `multimood grpo --help`)"),
    "convert": ("multimood.checkpoints.convert_videollama2_to_multimood", "convert_command",
                "convert a published MultiMood / VideoLLaMA 2 checkpoint (or back with --to-published)"),
    "push": ("multimood.checkpoints.hub", "push_main",
             "build the Hub folder (card, remote code, pipeline) of a saved model and upload it"),
    "data": ("multimood.data.dataset_builder", "data_command",
             "convert MESC / ESConv to the record JSONL, validate record files"),
    "predict": ("multimood.evaluation.predict", "predict_main",
                "answer a records JSONL with the pipeline -> predictions JSONL for `multimood evaluate`"),
    "evaluate": ("multimood.evaluation.metrics", "evaluate_command",
                 "paper-compatible and strict metrics of a predictions JSONL"),
    "demo": ("multimood.apps.demo", "main",
             "web demo (Gradio): upload clips and a conversation, see emotions, strategy and response"),
    "serve": ("multimood.apps.serve", "main", "OpenAI-compatible server (transformers serve) of a model folder"),
}


def usage() -> str:
    lines = ["usage: multimood [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<11}  {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", f"On an error a command prints one line; --debug (or {DEBUG_ENV}=1) shows the traceback."]
    return "\n".join(lines)


# Values of the Trainer's own `--debug` flag (transformers' DebugOption): `--debug underflow_overflow` is left alone.
_TRAINER_DEBUG_VALUES = {"underflow_overflow", "tpu_metrics_debug"}


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(debug?, argv without our `--debug`)."""
    kept, debug = [], os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    for i, arg in enumerate(argv):
        trainer_flag = i + 1 < len(argv) and set(argv[i + 1].split()) <= _TRAINER_DEBUG_VALUES and argv[i + 1].strip()
        if arg == "--debug" and not trainer_flag:
            debug = True
        else:
            kept.append(arg)
    return debug, kept


def describe_error(error: BaseException) -> str:
    """One line for an error: our errors as they are, others with their type (and file, for OS errors)."""
    if isinstance(error, MultimoodError):
        text = str(error)
    elif isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, pickle.UnpicklingError):  # never torch's advice to retry without weights_only
        blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        text = "refused to load a pickle that holds objects other than tensors"
        text += f" ({blocked[0]})" if blocked else ""
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def run_command(prog: str, function: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run `function(argv)` under the error contract and return the exit code (0 unless it returns an int)."""
    debug, argv = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        result = function(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:  # argparse has printed its usage line; a text is a message to print
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        if debug:
            raise
        print(f"{prog}: error: {' '.join(str(stop.code).split())}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - the contract: one line, the traceback only on request
        if debug:
            raise
        ours = isinstance(error, (MultimoodError, OSError))
        hint = "" if ours else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {describe_error(error)}{hint}", file=sys.stderr)
        return EXIT_ERROR
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    rest = argv[1:] if debug else argv
    if not rest or rest[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if rest else 2
    command, rest = rest[0], rest[1:]
    if command not in COMMANDS:
        print(f"multimood: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]

    def command_function(args: list[str]):
        return getattr(importlib.import_module(module_name), function_name)(args)

    return run_command(f"multimood {command}", command_function, rest + (["--debug"] if debug else []))


if __name__ == "__main__":
    sys.exit(main())
